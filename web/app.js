// app.js — wires the pieces together: lobby → join → call → leave, and the test hook.
//
//   signaling.js  WebSocket + JSON messages          media.js        camera, mic, screen
//   sfu.js        one peer connection to the SFU     mesh.js         one per other participant
//   peer.js       perfect negotiation (both use it)  stats.js        getStats → tiles
//   ui.js         all DOM work                       audio-level.js  speaking highlight
//
// The page lives at /room/{name}; `?mode=mesh` asks for a mesh room (it only matters to whoever
// creates the room).

import { Signaling, signalingUrl } from "/signaling.js";
import { LocalMedia, describeMediaError } from "/media.js";
import { SfuSession } from "/sfu.js";
import { MeshSession } from "/mesh.js";
import { StatsMonitor } from "/stats.js";
import { AudioLevels } from "/audio-level.js";
import { UI } from "/ui.js";

const $ = (id) => document.getElementById(id);

/** Human messages for the server's error codes (protocol.rs `ErrorCode`). */
const ERROR_TEXT = {
  "room-full": "This room is full. Try again later or pick another room.",
  "server-full": "The server is at capacity right now. Try again in a moment.",
  "invalid-name":
    "That room or display name is not accepted. Use letters, digits, '-' or '_' (and keep it short).",
  "connection-failed": "The media connection to the server failed.",
  unauthorized: "This server needs a valid invitation link for this room (its token is missing, expired or for another room).",
  "not-allowed": "Your invitation does not allow that.",
  "server-draining": "The server is restarting. Try again in a moment.",
  removed: "You were removed from the room.",
};

const RECONNECT_DELAYS_MS = [1000, 2000, 4000, 8000, 8000, 8000];
// How long the media connection may stay down (restarting ICE) before the client joins anew.
const MEDIA_RECOVERY_MS = 12000;
// Seconds without media from an unmuted participant before its tile says the connection stalls.
const STALL_AFTER_S = 3;
// Resuming after the signaling socket dropped (media goes on meanwhile): tries at these delays,
// then every 7 s with jitter, for as long as the server keeps the session (20 s by default).
const RESUME_DELAYS_MS = [0, 300, 1200, 2700, 4800];
const RESUME_EVERY_MS = 7000;
const RESUME_WINDOW_MS = 18000;
// Redirects followed for one join (a cluster sends a client to the node hosting its room).
const MAX_REDIRECTS = 3;

const ui = new UI();
const media = new LocalMedia();
const levels = new AudioLevels();

const state = {
  phase: "lobby", // lobby | joining | call | left
  connection: "idle", // idle | connecting | connected | reconnecting | failed
  error: null, // {code, message} of the last problem shown to the user
  room: roomFromPath(),
  mode: new URLSearchParams(location.search).get("mode") === "mesh" ? "mesh" : undefined,
  // `?relay=1`: every connection goes through the TURN server (checks TURN from a network
  // that allows everything).
  relayOnly: new URLSearchParams(location.search).get("relay") === "1",
  // `?token=`: the access token the application minted for this user and room (servers with
  // API keys refuse joins without one).
  token: new URLSearchParams(location.search).get("token") || null,
  // `?codec=h264` (or vp8, vp9, av1): the video codec to send with, where the browser has it.
  videoCodec: new URLSearchParams(location.search).get("codec") || null,
  roomMode: null, // what the server says the room is
  name: "",
  selfId: null,
  resumeToken: null, // from `joined` / `resumed`: takes the session up again on a new socket
  resumes: 0, // how often the session was taken up again on a new socket
  participants: new Map(), // id -> {id, name}
  chat: [], // {from, name, text, self}
  sharing: false,
  chatReady: false,
  mediaReady: false, // the first camera/mic request has finished (one way or another)
};

let signaling = null;
let session = null;
let reconnecting = null; // {attempt, timer} while trying to get back in
let resuming = null; // {attempt, timer, since} while the socket is down and media goes on
let mediaLost = null; // timer: the media connection is down; a rejoin follows if it stays so
const stats = new StatsMonitor({
  getPeers: () => session?.peers() ?? [],
  getTiles: () => [...ui.tiles.values()],
  onTile: (tile, s, text) => {
    tile.setStats(s, text);
    // Mute badges come from signaling (`participant-updated`); media that stops arriving
    // although it is not muted (nor paused by the server) is a stall, shown as such.
    if (!tile.local && tile.kind === "camera") {
      const p = state.participants.get(tile.participantId);
      const audioStalled = p && !p.audio_muted && s.audioQuietFor >= STALL_AFTER_S;
      const videoStalled = p && !p.video_muted && !tile.videoPaused && s.videoQuietFor >= STALL_AFTER_S;
      tile.setStalled(!!(audioStalled || videoStalled));
    }
  },
});

function roomFromPath() {
  const m = location.pathname.match(/^\/room\/([^/]+)\/?$/);
  return m ? decodeURIComponent(m[1]) : "";
}

// ---- lobby --------------------------------------------------------------------------------

async function initLobby() {
  ui.setRoom(state.room, state.mode);
  ui.showLobby();
  $("room-field").hidden = !!state.room;
  $("room-input").value = state.room;
  $("name-input").value = localStorage.getItem("switchboard.name") || `Guest ${Math.floor(100 + Math.random() * 900)}`;
  $("mode-note").textContent = state.mode === "mesh" ? "Mesh mode: media goes directly between participants." : "";
  // The AudioContext may only start after a gesture; any first click or key will do.
  const unlock = () => levels.unlock();
  document.addEventListener("pointerdown", unlock, { once: true });
  document.addEventListener("keydown", unlock, { once: true });

  $("join-form").addEventListener("submit", (e) => {
    e.preventDefault();
    join();
  });
  $("lobby-mic").addEventListener("click", () => toggleMic());
  $("lobby-cam").addEventListener("click", () => toggleCamera());
  for (const [select, kind] of [["camera-select", "video"], ["mic-select", "audio"]]) {
    $(select).addEventListener("change", async (e) => {
      try {
        await media.selectDevice(kind, e.target.value);
      } catch (err) {
        ui.setLobbyError(describeMediaError(err, kind === "audio" ? "microphone" : "camera"));
      }
    });
  }
  navigator.mediaDevices?.addEventListener?.("devicechange", refreshDevices);

  media.on("tracks", onLocalTracks);
  await media.start();
  state.mediaReady = true;
  reportMediaErrors();
  await refreshDevices();
}

function reportMediaErrors() {
  const { audio, video } = media.errors;
  let text = null;
  if (audio && video && audio.name === video.name) text = describeMediaError(audio);
  else if (video) text = describeMediaError(video, "camera");
  else if (audio) text = describeMediaError(audio, "microphone");
  if (text) {
    state.error = { code: "media", message: text };
    ui.showBanner("warn", text);
  }
}

async function refreshDevices() {
  const { cameras, mics } = await media.listDevices();
  ui.setDevices("camera-select", cameras, media.currentDeviceId("video"));
  ui.setDevices("mic-select", mics, media.currentDeviceId("audio"));
}

/** Camera/mic tracks changed: preview, own tile, meter and senders follow. */
function onLocalTracks() {
  ui.setPreview(media.stream, { camOn: media.camOn, micOn: media.micOn });
  levels.watch("local", media.audioTrack, (level) => {
    ui.setMicMeter(media.micOn ? level : 0);
    ui.tiles.get("local")?.setLevel(media.micOn ? level : 0);
  });
  const tile = ui.tiles.get("local");
  if (tile) {
    tile.setStream(media.stream);
    tile.setMicOff(!media.micOn);
    tile.setCamOff(!media.camOn || !media.videoTrack);
  }
  session?.syncLocalTracks();
  sendMuteState();
  renderControls();
}

/**
 * Tells the others (through the server) when our microphone or camera goes off or on: whatever
 * differs from what the server last took (a message lost with a dropped socket goes again).
 */
function sendMuteState() {
  if (!signaling || !state.sentMute) return;
  const now = { audio: !media.micOn, video: !media.camOn || !media.videoTrack };
  for (const kind of ["audio", "video"]) {
    if (state.sentMute[kind] === now[kind]) continue;
    if (signaling.send({ type: "set-muted", kind, muted: now[kind] })) state.sentMute[kind] = now[kind];
  }
}

/** A participant's mute state (from `joined`, `participant-joined/updated`, `resumed`). */
function applyMuteState(p) {
  for (const tile of ui.tilesOf(p.id)) {
    if (tile.local || tile.kind !== "camera") continue;
    tile.setMicOff(!!p.audio_muted);
    tile.setCamOff(!!p.video_muted);
  }
}

// ---- joining ------------------------------------------------------------------------------

async function join() {
  const room = state.room || $("room-input").value.trim();
  const name = $("name-input").value.trim();
  if (!room || !name) {
    ui.setLobbyError("Enter a room and a display name.");
    return;
  }
  levels.unlock();
  localStorage.setItem("switchboard.name", name);
  state.name = name;
  if (!state.room) {
    state.room = room;
    history.replaceState(null, "", `/room/${encodeURIComponent(room)}${location.search}`);
    ui.setRoom(room, state.mode);
  }
  ui.setLobbyError(null);
  ui.setJoinBusy(true);
  state.phase = "joining";
  setConnection("connecting");
  try {
    await connectAndJoin("joining");
  } catch (err) {
    if (state.phase !== "joining") return;
    state.phase = "lobby";
    const short = { unreachable: "Server unreachable", "room-full": "Room full", "server-full": "Server full" };
    setConnection("failed", short[err.code] ?? "Could not join");
    state.error = { code: err.code ?? "unreachable", message: err.userText ?? err.message };
    ui.setLobbyError(state.error.message);
  } finally {
    ui.setJoinBusy(false);
  }
}

/**
 * Opens the socket, sends `join` and enters the call on `joined`. Throws an Error with
 * `userText` (and `code` for server errors) when that does not work out. `phase` is the phase
 * we expect to still be in when the answer comes (the user may have left meanwhile).
 */
async function connectAndJoin(phase, url = signalingUrl(), redirects = 0) {
  const sig = new Signaling(url);
  try {
    await sig.connect();
  } catch (err) {
    throw Object.assign(err, {
      code: "unreachable",
      userText: `Cannot reach the Switchboard server at ${new URL(url).host}. Check your connection and try again.`,
    });
  }
  // Messages that follow `joined` (an early server offer, say) wait here until the session
  // exists; nothing may be lost between the two.
  const early = [];
  const offEarly = sig.on("message", (msg) => early.push(msg));
  // Protocol 3: simulcast layers, tile sizes, dynacast, session resume (src/signal/protocol.rs).
  sig.send({
    type: "join",
    room: state.room,
    name: state.name,
    protocol: 3,
    ...(state.mode ? { mode: state.mode } : {}),
    ...(state.token ? { token: state.token } : {}),
  });
  let reply;
  try {
    reply = await sig.waitFor((m) => ["joined", "error", "redirect"].includes(m.type), 10000);
  } catch (err) {
    offEarly();
    sig.close();
    throw Object.assign(err, { code: "unreachable", userText: `The server did not let us in: ${err.message}.` });
  }
  offEarly();
  if (state.phase !== phase) {
    sig.close();
    throw Object.assign(new Error("cancelled"), { code: "cancelled", userText: "Cancelled." });
  }
  if (reply.type === "error") {
    sig.close();
    throw Object.assign(new Error(reply.message), {
      code: reply.code,
      userText: ERROR_TEXT[reply.code] ?? `The server refused to let us in: ${reply.message}`,
    });
  }
  // In a cluster the room may live on another node: join there (a few hops at most).
  if (reply.type === "redirect") {
    sig.close();
    if (redirects >= MAX_REDIRECTS) {
      throw Object.assign(new Error("too many redirects"), { code: "unreachable", userText: "The servers kept sending us elsewhere; try again." });
    }
    console.info(`[app] room ${reply.room} is on node ${reply.node}: joining at ${reply.url}`);
    return connectAndJoin(phase, reply.url, redirects + 1);
  }
  state.signalingUrl = url;
  const after = early.slice(early.indexOf(reply) + 1);
  enterCall(sig, reply, after);
}

function enterCall(sig, joined, pending) {
  signaling = sig;
  state.phase = "call";
  state.error = null;
  state.selfId = joined.participant_id;
  state.resumeToken = joined.resume_token ?? null;
  state.roomMode = joined.mode;
  state.participants = new Map(joined.participants.map((p) => [p.id, { ...p }]));
  state.sentMute = { audio: false, video: false }; // what a new participant starts as
  reconnecting = null;
  ui.hideBanner();
  ui.setRoom(state.room, joined.mode);
  ui.showCall();

  const local = ui.addTile({ id: "local", participantId: state.selfId, name: state.name, kind: "camera", local: true });
  local.setStream(media.stream);
  local.setMicOff(!media.micOn);
  local.setCamOff(!media.camOn || !media.videoTrack);
  // Viewers (WHEP players) only watch: no tile for them.
  for (const p of state.participants.values()) if (!p.viewer) addParticipantTile(p);

  session =
    joined.mode === "mesh"
      ? new MeshSession({ signaling: sig, media, selfId: state.selfId, selfName: state.name, iceServers: joined.ice_servers ?? [], relayOnly: state.relayOnly, videoCodec: state.videoCodec })
      : new SfuSession({ signaling: sig, media, tracks: joined.tracks ?? [], iceServers: joined.ice_servers ?? [], relayOnly: state.relayOnly, videoCodec: state.videoCodec });
  session.on("stream", onRemoteStream);
  session.on("stream-changed", ({ key }) => ui.tiles.get(tileIdForStream(key))?.refresh());
  session.on("stream-ended", onRemoteStreamEnded);
  session.on("chat", (msg) => addChat({ ...msg, self: false }));
  session.on("chat-ready", (ready) => {
    state.chatReady = ready;
    ui.setChatEnabled(ready);
  });
  session.on("state", onMediaState);
  session.on("subscription", ({ key, kind, layer, paused }) => {
    const tile = kind === "video" ? ui.tiles.get(tileIdForStream(key)) : null;
    if (!tile) return;
    tile.videoLayer = layer;
    tile.setVideoPaused(paused);
  });
  ui.setChatEnabled(false);
  sig.on("message", onMessage);
  sig.on("close", onSignalingClosed);

  if (session.mode === "mesh") session.start(joined.participants);
  else session.start();
  if (state.sharing && media.screen) addOwnScreenTile(media.screen);
  for (const msg of pending) onMessage(msg);
  sendMuteState(); // joined with the mic or camera already off

  stats.start();
  renderControls();
  addChat({ system: true, text: `You joined ${state.room}${joined.mode === "mesh" ? " (mesh)" : ""}.` });
}

function onMessage(msg) {
  switch (msg.type) {
    case "participant-joined": {
      const p = { ...msg.participant };
      state.participants.set(p.id, p);
      if (!p.viewer) addParticipantTile(p);
      addChat({ system: true, text: p.viewer ? `${p.name} is watching.` : `${p.name} joined.` });
      break;
    }
    case "participant-updated": {
      const p = { ...msg.participant };
      if (!state.participants.has(p.id)) break;
      state.participants.set(p.id, p);
      applyMuteState(p);
      break;
    }
    case "participant-left": {
      const p = state.participants.get(msg.participant_id);
      state.participants.delete(msg.participant_id);
      session?.participantLeft(msg.participant_id);
      for (const tile of ui.tilesOf(msg.participant_id)) {
        if (!tile.local) {
          levels.unwatch(tile.id);
          ui.removeTile(tile.id);
        }
      }
      if (p) addChat({ system: true, text: `${p.name} left.` });
      break;
    }
    case "offer":
    case "answer":
    case "candidate":
    case "track-published":
    case "track-unpublished":
    case "subscription-state":
    case "publisher-layers":
      session?.handle(msg);
      break;
    case "active-speakers":
      state.activeSpeakers = msg.participants;
      ui.setActiveSpeakers(msg.participants);
      break;
    case "muted": {
      // An administrator muted one of our tracks: the server drops it until they unmute it.
      // Turn it off here too; turning it back on after an unmute is the user's choice.
      const what = msg.kind === "audio" ? "microphone" : "camera";
      if (msg.muted) {
        const off = msg.kind === "audio" ? media.setMic(false) : media.setCamera(false);
        Promise.resolve(off).catch((err) => console.warn("[app] muting", err));
        ui.showBanner("warn", `An administrator muted your ${what}.`);
      } else {
        ui.showBanner("info", `An administrator let your ${what} back on.`);
      }
      break;
    }
    case "server-draining":
      // The socket closes after the deadline; the usual reconnect then joins again (a load
      // balancer sends us to another server).
      ui.showBanner("warn", `The server is restarting: this call ends within ${msg.deadline_secs} s, then we reconnect.`);
      addChat({ system: true, text: "The server is restarting." });
      break;
    case "error":
      console.warn("[app] server error", msg);
      // A tile reported just as its track went away: nothing for the user to see.
      if (msg.code === "unknown-track") break;
      state.error = { code: msg.code, message: msg.message };
      if (msg.code === "connection-failed") {
        startReconnect(ERROR_TEXT["connection-failed"]);
      } else if (msg.code === "removed") {
        // Taken out by an administrator: back to the lobby, no resume, no rejoin.
        leave();
        ui.showBanner("error", ERROR_TEXT.removed);
      } else {
        ui.showBanner("error", ERROR_TEXT[msg.code] ?? `Server error: ${msg.message}`);
      }
      break;
    case "pong":
    case "left":
    case "joined":
    case "resumed":
      break;
    default:
      console.debug("[app] unhandled message", msg.type);
  }
}

// ---- remote media ---------------------------------------------------------------------------

const streamTiles = new Map(); // session stream key -> tile id

function tileIdForStream(key) {
  return streamTiles.get(key);
}

function addParticipantTile(p) {
  const tile = ui.addTile({ id: `p:${p.id}`, participantId: p.id, name: p.name, kind: "camera" });
  tile.setMicOff(!!p.audio_muted);
  tile.setCamOff(!!p.video_muted);
  return tile;
}

function onRemoteStream({ key, participantId, stream, screen }) {
  const p = state.participants.get(participantId) ?? { id: participantId, name: "Participant" };
  if (!state.participants.has(participantId)) console.warn("[app] media from unknown participant", participantId);
  const tile = screen
    ? ui.addTile({ id: `s:${key}`, participantId, name: p.name, kind: "screen" })
    : addParticipantTile(p);
  streamTiles.set(key, tile.id);
  tile.setStream(stream);
  // SFU: the server sends the layer that fits this tile, and nothing while it is out of sight.
  session?.watchTile?.(key, tile.video);
  watchRemoteAudio(tile, stream);
  stream.addEventListener("addtrack", () => watchRemoteAudio(tile, stream));
}

function watchRemoteAudio(tile, stream) {
  const track = stream.getAudioTracks()[0];
  if (!track) return;
  const receiver = session
    ?.peers()
    .flatMap(({ pc }) => pc.getReceivers())
    .find((r) => r.track === track);
  levels.watch(tile.id, track, (level) => tile.setLevel(level), receiver);
}

function onRemoteStreamEnded({ key, screen }) {
  const id = streamTiles.get(key);
  streamTiles.delete(key);
  session?.unwatchTile?.(key);
  if (!id) return;
  levels.unwatch(id);
  ui.tiles.get(id)?.setVideoPaused(null);
  if (screen) ui.removeTile(id);
  else ui.tiles.get(id)?.setStream(null); // the person stays, their camera is gone
}

// ---- connection state -------------------------------------------------------------------------

function setConnection(connection, text) {
  state.connection = connection;
  ui.setStatus(connection, text);
}

function onMediaState(mediaState) {
  if (state.phase !== "call" || reconnecting) return;
  if (mediaState !== "failed" && mediaState !== "reconnecting") {
    clearTimeout(mediaLost);
    mediaLost = null;
  }
  if (resuming) return; // the status says "reconnecting" until resumed
  if (mediaState === "failed" || mediaState === "reconnecting") {
    // The connection restarts ICE by itself (peer.js); only if that does not bring it back
    // does the SFU client join anew.
    setConnection("reconnecting", "Reconnecting…");
    if (session?.mode !== "mesh" && !mediaLost) {
      mediaLost = setTimeout(() => {
        mediaLost = null;
        startReconnect("The media connection to the server failed.");
      }, MEDIA_RECOVERY_MS);
    }
    if (session?.mode === "mesh" && mediaState === "failed") {
      ui.showBanner("warn", "The connection to at least one participant failed; trying to restore it.");
    }
    return;
  }
  if (mediaState !== "closed") setConnection(mediaState);
}

function onSignalingClosed({ intentional }) {
  if (intentional || state.phase !== "call") return;
  if (state.resumeToken && !reconnecting) startResume();
  else startReconnect("Lost the connection to the server.");
}

/**
 * The signaling socket dropped but the media connection may well be fine: keep the call as it
 * is and take the session up again on a new socket (`resume`), with growing pauses. Only when
 * the server no longer knows the session (or the time it keeps it is over) do we join anew.
 */
function startResume() {
  if (resuming) return;
  console.warn("[app] signaling lost; resuming");
  signaling = null;
  setConnection("reconnecting", "Reconnecting…");
  ui.showBanner("warn", "Lost the connection to the server. Reconnecting… (your call goes on meanwhile)");
  resuming = { attempt: 0, timer: null, since: Date.now() };
  const attempt = async () => {
    if (!resuming) return;
    try {
      const { sig, reply, after } = await resumeOnce();
      if (!resuming || state.phase !== "call") {
        sig.close();
        return;
      }
      resuming = null;
      onResumed(sig, reply, after);
    } catch (err) {
      if (!resuming) return;
      const late = Date.now() - resuming.since > RESUME_WINDOW_MS;
      // A node we were redirected to that cannot be reached twice running has most likely
      // died with our session: join anew through the entry URL (the load balancer).
      const nodeGone =
        !err.code && state.signalingUrl && state.signalingUrl !== signalingUrl() && resuming.attempt >= 2;
      if (err.code === "resume-failed" || late || nodeGone) {
        resuming = null;
        startReconnect("Lost the connection to the server.");
        return;
      }
      const n = resuming.attempt++;
      const delay = RESUME_DELAYS_MS[n] ?? RESUME_EVERY_MS + Math.round((Math.random() - 0.5) * 2000);
      console.info(`[app] resume attempt ${n + 1} failed (${err.message}); next in ${delay} ms`);
      resuming.timer = setTimeout(attempt, delay);
    }
  };
  resuming.timer = setTimeout(attempt, RESUME_DELAYS_MS[resuming.attempt++]);
}

/** One `resume` on a new socket: resolves with the socket, `resumed` and what followed it. */
async function resumeOnce() {
  // The node that holds the session (a redirect may have sent us to it).
  const sig = new Signaling(state.signalingUrl ?? signalingUrl());
  await sig.connect(5000);
  const early = [];
  const offEarly = sig.on("message", (msg) => early.push(msg));
  sig.send({ type: "resume", token: state.resumeToken });
  let reply;
  try {
    reply = await sig.waitFor((m) => m.type === "resumed" || m.type === "error", 5000);
  } finally {
    offEarly();
  }
  if (reply.type === "error") {
    sig.close();
    throw Object.assign(new Error(reply.message), { code: reply.code });
  }
  return { sig, reply, after: early.slice(early.indexOf(reply) + 1) };
}

/** Back on a socket: the room as it is now replaces what we knew (messages may have been lost). */
function onResumed(sig, resumed, after) {
  signaling = sig;
  state.resumeToken = resumed.resume_token;
  state.resumes += 1;
  sig.on("message", onMessage);
  sig.on("close", onSignalingClosed);
  const now = new Map(resumed.participants.map((p) => [p.id, p]));
  for (const id of [...state.participants.keys()]) {
    if (!now.has(id)) onMessage({ type: "participant-left", participant_id: id });
  }
  for (const p of now.values()) {
    const type = state.participants.has(p.id) ? "participant-updated" : "participant-joined";
    onMessage({ type, participant: p });
  }
  session?.resumed(sig, resumed);
  for (const msg of after) onMessage(msg);
  sendMuteState();
  ui.hideBanner();
  setConnection("connected");
  addChat({ system: true, text: "Reconnected." });
}

/** Drops the current session and joins again with growing pauses, then gives up. */
function startReconnect(reason) {
  if (reconnecting) return;
  if (resuming) {
    clearTimeout(resuming.timer);
    resuming = null;
  }
  console.warn("[app] reconnecting:", reason);
  teardownSession();
  setConnection("reconnecting", "Reconnecting…");
  ui.showBanner("warn", `${reason} Reconnecting…`);
  reconnecting = { attempt: 0, timer: null };
  const attempt = async () => {
    if (!reconnecting) return;
    try {
      await connectAndJoin("call");
      addChat({ system: true, text: "Reconnected." });
    } catch (err) {
      if (!reconnecting) return;
      // A refusal (room full, ...) will not change by retrying; an unreachable server might.
      const refused = err.code && err.code !== "unreachable";
      const delay = RECONNECT_DELAYS_MS[reconnecting.attempt++];
      if (refused || delay === undefined) {
        reconnecting = null;
        state.error = { code: err.code ?? "unreachable", message: err.userText ?? err.message };
        setConnection("failed", "Disconnected");
        ui.showBanner("error", `${reason} Could not get back in: ${err.userText ?? err.message} Leave and join again to retry.`);
        return;
      }
      reconnecting.timer = setTimeout(attempt, delay);
    }
  };
  reconnecting.timer = setTimeout(attempt, 500);
}

/** Closes socket + peer connections and forgets remote tiles; local media stays. */
function teardownSession() {
  clearTimeout(mediaLost);
  mediaLost = null;
  stats.stop();
  session?.close();
  session = null;
  if (signaling) {
    signaling.close();
    signaling = null;
  }
  for (const tile of [...ui.tiles.values()]) {
    tile.setStats(null, "");
    if (tile.local) continue;
    levels.unwatch(tile.id);
    ui.removeTile(tile.id);
  }
  streamTiles.clear();
  state.participants.clear();
  state.chatReady = false;
}

function leave() {
  if (reconnecting) clearTimeout(reconnecting.timer);
  reconnecting = null;
  if (resuming) clearTimeout(resuming.timer);
  resuming = null;
  state.resumeToken = null;
  signaling?.send({ type: "leave" });
  teardownSession();
  if (state.sharing) stopScreenShare();
  ui.clearTiles();
  ui.clearChat();
  state.chat = [];
  state.phase = "lobby";
  state.selfId = null;
  setConnection("idle", "Left the call");
  ui.showLobby();
  ui.showBanner("info", "You left the call.");
}

// ---- local controls ---------------------------------------------------------------------------

async function toggleMic() {
  try {
    await media.setMic(!media.micOn);
  } catch (err) {
    ui.showBanner("warn", describeMediaError(err, "microphone"));
  }
}

async function toggleCamera() {
  try {
    await media.setCamera(!media.camOn);
  } catch (err) {
    ui.showBanner("warn", describeMediaError(err, "camera"));
  }
}

async function toggleScreenShare() {
  if (state.sharing) {
    stopScreenShare();
    return;
  }
  let screen;
  try {
    screen = await media.startScreen();
  } catch (err) {
    if (err.name === "NotAllowedError") ui.showBanner("info", "Screen sharing was cancelled.");
    else ui.showBanner("warn", describeMediaError(err, "screen"));
    return;
  }
  state.sharing = true;
  session?.startScreen(screen);
  addOwnScreenTile(screen);
  renderControls();
}

function addOwnScreenTile(screen) {
  const tile = ui.addTile({ id: "local-screen", participantId: state.selfId, name: state.name, kind: "screen", local: true });
  tile.setStream(screen);
}

function stopScreenShare() {
  const screen = media.screen;
  if (screen) session?.stopScreen(screen);
  media.stopScreen();
  state.sharing = false;
  ui.removeTile("local-screen");
  renderControls();
}

function renderControls() {
  ui.setControls({
    micOn: media.micOn,
    camOn: media.camOn,
    sharing: state.sharing,
    canShare: !!navigator.mediaDevices?.getDisplayMedia,
  });
}

function addChat(entry) {
  if (!entry.system) state.chat.push({ from: entry.from ?? state.selfId, name: entry.name, text: entry.text, self: !!entry.self });
  ui.addChat(entry);
}

function sendChat(e) {
  e.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text) return;
  if (!session?.sendChat(text)) {
    ui.showBanner("warn", "Chat is not connected yet; the message was not sent.");
    return;
  }
  addChat({ from: state.selfId, name: state.name, text, self: true });
  input.value = "";
}

$("btn-mic").addEventListener("click", toggleMic);
$("btn-cam").addEventListener("click", toggleCamera);
$("btn-screen").addEventListener("click", toggleScreenShare);
$("btn-leave").addEventListener("click", leave);
$("chat-form").addEventListener("submit", sendChat);
media.on("screen-ended", () => state.sharing && stopScreenShare());
// Closing the tab: tell the server right away so the others see us go.
window.addEventListener("pagehide", () => {
  signaling?.close();
  session?.close();
});

// ---- test hook ------------------------------------------------------------------------------

/**
 * `window.switchboard.state()` — a plain snapshot for tests and debugging: who is here, which
 * tiles exist (and whether they are in the DOM) and each tile's latest stats.
 */
window.switchboard = {
  state() {
    return {
      phase: state.phase,
      connection: state.connection,
      resumes: state.resumes,
      iceRestarts: session?.iceRestarts?.() ?? 0,
      error: state.error,
      room: state.room,
      mode: state.roomMode ?? state.mode ?? "sfu",
      participantId: state.selfId,
      participants: [...state.participants.values()],
      sharing: state.sharing,
      activeSpeakers: state.activeSpeakers ?? [],
      micOn: media.micOn,
      camOn: media.camOn,
      media: {
        ready: state.mediaReady,
        audio: !!media.audioTrack,
        video: !!media.videoTrack,
        errors: { audio: media.errors.audio?.name ?? null, video: media.errors.video?.name ?? null },
      },
      chatReady: state.chatReady,
      chat: state.chat.map((c) => ({ ...c })),
      tiles: [...ui.tiles.values()].map((t) => ({
        id: t.id,
        participantId: t.participantId,
        kind: t.kind,
        local: t.local,
        name: t.name,
        inDom: t.el.isConnected,
        hasVideo: t.hasLiveVideo(),
        videoSize: [t.video.videoWidth, t.video.videoHeight],
        speaking: t.speaking,
        micOff: t.micOff,
        camOff: t.camOff,
        stalled: t.stalled,
        videoPaused: t.videoPaused,
        videoLayer: t.videoLayer ?? null, // the simulcast layer (rid) the server sends us
        stats: t.stats,
      })),
    };
  },
  leave,
  /**
   * The RTP streams of our peer connections from getStats(): inbound video (decoded size per
   * track) and outbound video (per simulcast rid: whether it is active and the size it sends).
   */
  async rtp() {
    const out = [];
    for (const { pc } of session?.peers() ?? []) {
      const report = await pc.getStats();
      for (const s of report.values()) {
        if (s.kind !== "video") continue;
        if (s.type === "inbound-rtp") {
          out.push({ type: "inbound", trackIdentifier: s.trackIdentifier, frameWidth: s.frameWidth ?? 0,
            frameHeight: s.frameHeight ?? 0, framesDecoded: s.framesDecoded ?? 0,
            codec: report.get(s.codecId)?.mimeType ?? null });
        } else if (s.type === "outbound-rtp") {
          out.push({ type: "outbound", rid: s.rid ?? null, active: s.active ?? null, frameWidth: s.frameWidth ?? 0,
            framesEncoded: s.framesEncoded ?? 0, bytesSent: s.bytesSent ?? 0,
            codec: report.get(s.codecId)?.mimeType ?? null, scalabilityMode: s.scalabilityMode ?? null });
        }
      }
    }
    return out;
  },
  /** Our peer connections (tests read their getStats()). */
  peers() {
    return session?.peers() ?? [];
  },
  /** Restarts ICE on the SFU connection, as a network change would. */
  restartIce() {
    session?.restartIce?.();
  },
  /** The current SDPs and states of our peer connections (debugging aid). */
  sdp() {
    return (session?.peers() ?? []).map(({ pc, participantId }) => ({
      participantId,
      signalingState: pc.signalingState,
      connectionState: pc.connectionState,
      local: pc.currentLocalDescription?.sdp ?? null,
      remote: pc.currentRemoteDescription?.sdp ?? null,
    }));
  },
};

initLobby().catch((err) => {
  console.error(err);
  ui.showBanner("error", `Something went wrong starting the page: ${err.message}`);
});
