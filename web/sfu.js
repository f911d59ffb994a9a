// sfu.js — a call through the Switchboard SFU: ONE RTCPeerConnection to the server.
//
// We publish our camera/mic (and screen share) on it and receive everybody else's tracks on it.
// The server offers whenever the set of forwarded tracks changes; we are the polite peer.
// Each forwarded track arrives in a MediaStream whose id is `{participantId}-{n}`, n being the
// index of the publisher's stream (0 = camera + mic, 1.. = screen shares).
//
// Chat: plain text out on the `chat` data channel; the server relays it to the others as JSON
// {from, name, text}.
//
// Simulcast: the camera goes out as three layers (CAMERA_LAYERS); the server forwards each of
// us the one that fits our downlink and the size we show it at, which we report per remote
// video (`track-settings`: tile size in device pixels, or hidden when scrolled away or the tab
// is in the background). It tells us what we get (`subscription-state`) and which of our own
// layers anyone receives (`publisher-layers`: the others are switched off).
//
// Events (same as mesh.js, so app.js does not care which one it drives):
//   'stream'       {key, participantId, stream, screen}  a remote stream appeared (or came back)
//   'stream-changed' {key}                                its set of tracks changed
//   'stream-ended' {key, participantId, screen}           it is gone
//   'chat'         {from, name, text}
//   'chat-ready'   boolean                                whether chat can be sent
//   'state'        connecting | connected | reconnecting | failed
//   'subscription' {key, kind, layer, paused}               what we receive of a stream's video

import { Emitter } from "/emitter.js";
import { PeerLink } from "/peer.js";

/**
 * The camera's simulcast layers, lowest first: rids and rates as the server's layer ladder
 * (src/forward/layer.rs) assumes them. A browser or codec that cannot simulcast sends fewer.
 */
export const CAMERA_LAYERS = [
  { rid: "q", scaleResolutionDownBy: 4, maxBitrate: 100_000 },
  { rid: "h", scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: "f", scaleResolutionDownBy: 1, maxBitrate: 1_700_000 },
];
/** Screen shares: one high-resolution layer, with temporal layers where the browser has them. */
const SCREEN_ENCODINGS = [{ scalabilityMode: "L1T3" }];
/** A tile's reported size must change by this share before it is reported again. */
const SIZE_CHANGE = 0.15;

/** Splits a forwarded stream id `{participant}-{n}` into its parts. */
export function parseStreamId(id) {
  const dash = id.indexOf("-");
  if (dash < 0) return { participantId: id, index: 0 };
  const index = Number.parseInt(id.slice(dash + 1), 10);
  return { participantId: id.slice(0, dash), index: Number.isFinite(index) ? index : 0 };
}

export class SfuSession extends Emitter {
  mode = "sfu";
  #signaling;
  #media;
  #link;
  #channel = null;
  #streams = new Map(); // stream id -> MediaStream currently shown
  #published = new Map(); // track_id -> TrackInfo (from `joined` / `track-published`)
  #views = new Map(); // stream id -> {element, visible, width, height, sent: Map(track_id -> key)}
  #observers;

  /**
   * @param {{signaling: import('./signaling.js').Signaling,
   *          media: import('./media.js').LocalMedia, tracks: object[]}} opts
   */
  constructor({ signaling, media, tracks = [], iceServers = [], relayOnly = false, videoCodec = null }) {
    super();
    this.#signaling = signaling;
    this.#media = media;
    for (const t of tracks) this.#published.set(t.track_id, t);

    this.#link = new PeerLink({
      polite: true,
      publishOnly: true,
      label: "sfu",
      iceServers,
      relayOnly,
      videoCodec,
      send: (msg) => this.#signaling.send(msg),
    });
    this.#link.on("track", (event) => this.#onTrack(event));
    this.#link.on("datachannel", (channel) => {
      if (channel.label === "chat") this.#wireChannel(channel, false);
    });
    this.#link.on("state", (state) => this.emit("state", mapState(state)));
    this.#observers = {
      resize: new ResizeObserver((entries) => entries.forEach((e) => this.#measure(e.target))),
      intersection: new IntersectionObserver((entries) =>
        entries.forEach((e) => this.#measure(e.target, e.isIntersecting)),
      ),
      visibility: () => this.#views.forEach((view) => this.#report(view)),
    };
    document.addEventListener("visibilitychange", this.#observers.visibility);
  }

  /** Adds our media and the chat channel; negotiation starts by itself (negotiationneeded). */
  start() {
    const media = this.#media;
    for (const track of media.stream.getTracks()) this.#addCameraOrMic(track, media.stream);
    if (media.screen) this.startScreen(media.screen);
    this.#wireChannel(this.#link.pc.createDataChannel("chat", { ordered: true }), true);
    this.syncLocalTracks();
    this.emit("state", "connecting");
  }

  /**
   * The session goes on over a new signaling socket (resume): `resumed` lists the room's tracks
   * now; those announced while the socket was down are taken in, those that went are ended.
   */
  resumed(signaling, msg) {
    this.#signaling = signaling;
    if (msg.ice_servers) this.#link.setIceServers(msg.ice_servers);
    const now = new Set(msg.tracks.map((t) => t.track_id));
    for (const trackId of [...this.#published.keys()]) {
      if (!now.has(trackId)) this.#onUnpublished({ track_id: trackId });
    }
    for (const t of msg.tracks) this.#published.set(t.track_id, t);
    // Reports made while the socket was down were lost: make them again.
    for (const view of this.#views.values()) {
      view.sent.clear();
      this.#report(view);
    }
    this.#link.resendPending();
  }

  /** Handles a signaling message meant for the media session. */
  handle(msg) {
    switch (msg.type) {
      case "offer":
      case "answer":
      case "candidate":
        this.#link.handle(msg);
        break;
      case "track-published":
        this.#published.set(msg.track.track_id, msg.track);
        // A tile may be up already (the track came before its announcement): report it now.
        for (const view of this.#views.values()) this.#report(view);
        break;
      case "track-unpublished":
        this.#onUnpublished(msg);
        break;
      case "subscription-state": {
        const info = this.#published.get(msg.track_id);
        if (info) {
          this.emit("subscription", {
            key: info.stream_id,
            kind: info.kind,
            layer: msg.layer ?? null,
            paused: msg.paused ?? null,
          });
        }
        break;
      }
      case "publisher-layers":
        this.#link.setActiveLayers(msg.mid, msg.active);
        break;
    }
  }

  /**
   * Reports the size `element` shows the video of stream `key` at, now and whenever it changes
   * or goes out of sight, so the server sends the layer that fits. Returns a function that
   * stops watching.
   */
  watchTile(key, element) {
    this.unwatchTile(key);
    this.#views.set(key, { element, visible: true, width: 0, height: 0, sent: new Map() });
    this.#observers.resize.observe(element);
    this.#observers.intersection.observe(element);
    return () => this.unwatchTile(key);
  }

  unwatchTile(key) {
    const view = this.#views.get(key);
    if (!view) return;
    this.#views.delete(key);
    this.#observers.resize.unobserve(view.element);
    this.#observers.intersection.unobserve(view.element);
  }

  /** Makes the senders follow LocalMedia: mic muted / camera off means sending nothing. */
  async syncLocalTracks() {
    const m = this.#media;
    await Promise.all([
      this.#link.setTrack("audio", m.micOn ? m.audioTrack : null, m.stream),
      this.#link.setTrack("video", m.camOn ? m.videoTrack : null, m.stream, CAMERA_LAYERS),
    ]).catch((err) => console.warn("[sfu] updating senders failed", err));
  }

  startScreen(stream) {
    for (const track of stream.getTracks()) {
      this.#link.addTrack(track, stream, track.kind === "video" ? SCREEN_ENCODINGS : null);
    }
  }

  stopScreen(stream) {
    this.#link.removeStream(stream);
  }

  /** Sends a chat line; false if the channel is not open. */
  sendChat(text) {
    if (this.#channel?.readyState !== "open") return false;
    this.#channel.send(text);
    return true;
  }

  participantLeft(participantId) {
    for (const [id, stream] of this.#streams) {
      if (parseStreamId(id).participantId === participantId) this.#ended(id, stream);
    }
  }

  restartIce() {
    this.#link.restartIce();
  }

  iceRestarts() {
    return this.#link.iceRestarts;
  }

  /** The peer connections, for stats.js. */
  peers() {
    return [{ pc: this.#link.pc, participantId: null }];
  }

  close() {
    document.removeEventListener("visibilitychange", this.#observers.visibility);
    this.#observers.resize.disconnect();
    this.#observers.intersection.disconnect();
    this.#views.clear();
    this.#channel?.close();
    this.#link.close();
    this.#streams.clear();
  }

  // ---- internals --------------------------------------------------------------------------

  /** Our camera as simulcast layers, our microphone as it is. */
  #addCameraOrMic(track, stream) {
    this.#link.addTrack(track, stream, track.kind === "video" ? CAMERA_LAYERS : null);
  }

  /** A watched element changed size or visibility: re-reports its stream. */
  #measure(element, intersecting) {
    for (const view of this.#views.values()) {
      if (view.element !== element) continue;
      if (intersecting !== undefined) view.visible = intersecting;
      const rect = element.getBoundingClientRect();
      const dpr = window.devicePixelRatio || 1;
      view.width = Math.round(rect.width * dpr);
      view.height = Math.round(rect.height * dpr);
      this.#report(view);
    }
  }

  /** Sends `track-settings` for the stream's video tracks whose report changed enough. */
  #report(view) {
    const key = [...this.#views].find(([, v]) => v === view)?.[0];
    if (key === undefined) return;
    const visible = view.visible && !document.hidden && view.width > 0 && view.height > 0;
    for (const info of this.#published.values()) {
      if (info.stream_id !== key || info.kind !== "video") continue;
      const last = view.sent.get(info.track_id);
      const changed =
        !last ||
        last.visible !== visible ||
        (visible &&
          (Math.abs(view.width - last.width) > last.width * SIZE_CHANGE ||
            Math.abs(view.height - last.height) > last.height * SIZE_CHANGE));
      if (!changed) continue;
      view.sent.set(info.track_id, { visible, width: view.width, height: view.height });
      this.#signaling.send(
        visible
          ? { type: "track-settings", track_id: info.track_id, visible, width: view.width, height: view.height }
          : { type: "track-settings", track_id: info.track_id, visible },
      );
    }
  }

  #wireChannel(channel, ours) {
    // Prefer the channel we created; a server-created `chat` channel is used only for receiving
    // unless ours is missing.
    if (ours || !this.#channel) this.#channel = channel;
    channel.onopen = () => this.emit("chat-ready", this.#channel?.readyState === "open");
    channel.onclose = () => this.emit("chat-ready", this.#channel?.readyState === "open");
    channel.onmessage = ({ data }) => {
      let msg;
      try {
        msg = JSON.parse(data);
      } catch {
        console.warn("[sfu] non-JSON chat frame ignored");
        return;
      }
      if (msg && typeof msg.text === "string") {
        this.emit("chat", { from: String(msg.from ?? ""), name: String(msg.name ?? "?"), text: msg.text });
      }
    };
  }

  #onTrack({ track, streams }) {
    let stream = streams[0];
    let id = stream?.id;
    if (!stream) {
      // A track without msid: fall back on what `track-published` told us about it.
      id = this.#published.get(track.id)?.stream_id ?? `unknown-${track.id}`;
      stream = this.#streams.get(id) ?? new MediaStream();
      stream.addTrack(track);
    }
    track.addEventListener("ended", () => this.#check(id, stream));
    if (this.#streams.get(id) !== stream) {
      this.#streams.set(id, stream);
      stream.addEventListener("removetrack", () => this.#check(id, stream));
      stream.addEventListener("addtrack", () => this.emit("stream-changed", { key: id }));
      const { participantId, index } = parseStreamId(id);
      this.emit("stream", { key: id, participantId, stream, screen: index > 0 });
    } else {
      this.emit("stream-changed", { key: id });
    }
  }

  /** A track left `stream`: drop the stream once nothing live is left in it. */
  #check(id, stream) {
    if (this.#streams.get(id) !== stream) return;
    const live = stream.getTracks().filter((t) => t.readyState === "live");
    if (live.length === 0) this.#ended(id, stream);
    else this.emit("stream-changed", { key: id });
  }

  #onUnpublished({ track_id: trackId }) {
    const info = this.#published.get(trackId);
    this.#published.delete(trackId);
    if (!info) return;
    // The renegotiation that follows removes the track too; this just makes the tile go at once
    // when the stream has nothing else published.
    const remaining = [...this.#published.values()].some((t) => t.stream_id === info.stream_id);
    const stream = this.#streams.get(info.stream_id);
    if (!remaining && stream) this.#ended(info.stream_id, stream);
  }

  #ended(id, stream) {
    if (this.#streams.get(id) !== stream) return;
    this.#streams.delete(id);
    const { participantId, index } = parseStreamId(id);
    this.emit("stream-ended", { key: id, participantId, screen: index > 0 });
  }
}

export function mapState(pcState) {
  switch (pcState) {
    case "connected":
      return "connected";
    case "disconnected":
      return "reconnecting";
    case "failed":
      return "failed";
    case "closed":
      return "closed";
    default:
      return "connecting";
  }
}
