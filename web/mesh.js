// mesh.js — a call without the SFU: one RTCPeerConnection per other participant.
//
// The server only relays signaling: we send offer/answer/candidate with `to`, and get them with
// `from`. The newcomer offers to everybody listed in `joined`; the others wait for its offer and
// attach their own tracks to the offered transceivers before answering. For later
// renegotiations (screen share) either side may offer; the pair's roles in perfect negotiation
// come from comparing participant ids, so both agree on who is polite.
//
// Chat travels on a `chat` data channel per connection; we tag each message ourselves with the
// same JSON shape the SFU uses ({from, name, text}).
//
// Events: the same as sfu.js.

import { Emitter } from "/emitter.js";
import { PeerLink } from "/peer.js";
import { mapState } from "/sfu.js";

export class MeshSession extends Emitter {
  mode = "mesh";
  #signaling;
  #media;
  #selfId;
  #selfName;
  #peers = new Map(); // participant id -> {link, channel, cameraStreamId, streams: Map, state}

  #iceServers;

  #relayOnly;
  #videoCodec;

  constructor({ signaling, media, selfId, selfName, iceServers = [], relayOnly = false, videoCodec = null }) {
    super();
    this.#iceServers = iceServers;
    this.#relayOnly = relayOnly;
    this.#videoCodec = videoCodec;
    this.#signaling = signaling;
    this.#media = media;
    this.#selfId = selfId;
    this.#selfName = selfName;
  }

  /** Offers to everybody already in the room (we are the newcomer). */
  start(participants) {
    for (const p of participants) this.#connect(p.id, true);
    this.#emitState();
  }

  /** The session goes on over a new signaling socket (resume). */
  resumed(signaling, msg) {
    this.#signaling = signaling;
    if (msg.ice_servers) {
      this.#iceServers = msg.ice_servers;
      for (const { link } of this.#peers.values()) link.setIceServers(msg.ice_servers);
    }
    for (const { link } of this.#peers.values()) link.resendPending();
  }

  handle(msg) {
    if (!["offer", "answer", "candidate"].includes(msg.type)) return;
    if (!msg.from) {
      console.warn("[mesh] signaling message without `from` ignored", msg.type);
      return;
    }
    const peer = this.#peers.get(msg.from) ?? this.#connect(msg.from, false);
    const { from: _from, ...signal } = msg;
    peer.link.handle(signal);
  }

  async syncLocalTracks() {
    const m = this.#media;
    await Promise.all(
      [...this.#peers.values()].flatMap(({ link }) => [
        link.setTrack("audio", m.micOn ? m.audioTrack : null, m.stream),
        link.setTrack("video", m.camOn ? m.videoTrack : null, m.stream),
      ]),
    ).catch((err) => console.warn("[mesh] updating senders failed", err));
  }

  startScreen(stream) {
    for (const { link } of this.#peers.values()) {
      for (const track of stream.getTracks()) link.addTrack(track, stream);
    }
  }

  stopScreen(stream) {
    for (const { link } of this.#peers.values()) link.removeStream(stream);
  }

  sendChat(text) {
    const frame = JSON.stringify({ from: this.#selfId, name: this.#selfName, text });
    let sent = false;
    for (const { channel } of this.#peers.values()) {
      if (channel?.readyState !== "open") continue;
      channel.send(frame);
      sent = true;
    }
    // Alone in the room there is nobody to fail to reach.
    return sent || this.#peers.size === 0;
  }

  participantLeft(participantId) {
    const peer = this.#peers.get(participantId);
    if (!peer) return;
    this.#peers.delete(participantId);
    for (const [key, stream] of peer.streams) this.#ended(peer, participantId, key, stream);
    peer.channel?.close();
    peer.link.close();
    this.#emitState();
    this.#emitChatReady();
  }

  peers() {
    return [...this.#peers.entries()].map(([participantId, { link }]) => ({ pc: link.pc, participantId }));
  }

  close() {
    for (const id of [...this.#peers.keys()]) this.participantLeft(id);
  }

  // ---- internals --------------------------------------------------------------------------

  #connect(participantId, initiator) {
    const media = this.#media;
    const addOwnMedia = (link) => {
      for (const track of media.stream.getTracks()) link.addTrack(track, media.stream);
      if (media.screen) for (const track of media.screen.getTracks()) link.addTrack(track, media.screen);
    };
    const peer = {
      link: null,
      channel: null,
      cameraStreamId: null,
      streams: new Map(),
      state: "new",
      restarted: false,
    };
    peer.link = new PeerLink({
      polite: this.#selfId < participantId,
      label: `mesh:${participantId}`,
      iceServers: this.#iceServers,
      relayOnly: this.#relayOnly,
      videoCodec: this.#videoCodec,
      send: (msg) => this.#signaling.send({ ...msg, to: participantId }),
      // The responder answers with its media on the offered transceivers (no extra round).
      beforeFirstAnswer: initiator ? undefined : () => {
        addOwnMedia(peer.link);
        this.syncLocalTracks();
      },
    });
    this.#peers.set(participantId, peer);

    peer.link.on("track", (event) => this.#onTrack(peer, participantId, event));
    peer.link.on("datachannel", (channel) => {
      if (channel.label === "chat") this.#wireChannel(peer, participantId, channel);
    });
    peer.link.on("state", (state) => {
      peer.state = state;
      if (state === "failed" && !peer.restarted) {
        // One ICE restart attempt per connection; perfect negotiation sorts out who offers.
        peer.restarted = true;
        peer.link.pc.restartIce();
      }
      this.#emitState();
    });

    if (initiator) {
      addOwnMedia(peer.link);
      this.#wireChannel(peer, participantId, peer.link.pc.createDataChannel("chat", { ordered: true }));
      this.syncLocalTracks();
    }
    return peer;
  }

  #wireChannel(peer, participantId, channel) {
    peer.channel = channel;
    channel.onopen = () => this.#emitChatReady();
    channel.onclose = () => this.#emitChatReady();
    channel.onmessage = ({ data }) => {
      let msg;
      try {
        msg = JSON.parse(data);
      } catch {
        return;
      }
      if (typeof msg?.text !== "string") return;
      // The connection tells us who sent it; the name is the sender's own claim.
      this.emit("chat", { from: participantId, name: String(msg.name ?? "?"), text: msg.text });
    };
  }

  #onTrack(peer, participantId, { track, streams }) {
    const stream = streams[0] ?? new MediaStream([track]);
    // The first stream a peer sends is its camera + mic; any other is a screen share.
    peer.cameraStreamId ??= stream.id;
    const key = `${participantId}/${stream.id}`;
    track.addEventListener("ended", () => this.#check(peer, participantId, key, stream));
    if (peer.streams.get(key) !== stream) {
      peer.streams.set(key, stream);
      stream.addEventListener("removetrack", () => this.#check(peer, participantId, key, stream));
      stream.addEventListener("addtrack", () => this.emit("stream-changed", { key }));
      this.emit("stream", { key, participantId, stream, screen: stream.id !== peer.cameraStreamId });
    } else {
      this.emit("stream-changed", { key });
    }
  }

  #check(peer, participantId, key, stream) {
    if (peer.streams.get(key) !== stream) return;
    if (stream.getTracks().some((t) => t.readyState === "live")) this.emit("stream-changed", { key });
    else this.#ended(peer, participantId, key, stream);
  }

  #ended(peer, participantId, key, stream) {
    if (peer.streams.get(key) !== stream) return;
    peer.streams.delete(key);
    this.emit("stream-ended", { key, participantId, screen: stream.id !== peer.cameraStreamId });
  }

  /** One state for the whole mesh: the worst of its connections. */
  #emitState() {
    const states = [...this.#peers.values()].map((p) => mapState(p.state));
    const order = ["failed", "reconnecting", "connecting", "connected"];
    const worst = order.find((s) => states.includes(s)) ?? "connected";
    this.emit("state", worst);
  }

  #emitChatReady() {
    const open = [...this.#peers.values()].some((p) => p.channel?.readyState === "open");
    this.emit("chat-ready", open || this.#peers.size === 0);
  }
}
