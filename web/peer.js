// peer.js — one RTCPeerConnection negotiated with "perfect negotiation".
//
// Both ends may want to (re)negotiate at any time: we add a screen share, the SFU adds another
// participant's track. Perfect negotiation (https://w3c.github.io/webrtc-pc/#perfect-negotiation-example)
// resolves the glare when both send an offer at once: the *impolite* peer ignores the colliding
// offer, the *polite* peer rolls its own offer back and answers. Towards the SFU the browser is
// always polite; in mesh rooms the pair agree on roles by comparing participant ids.
//
// Incoming signals are applied strictly in order (one promise chain), so an ICE candidate never
// overtakes the description it belongs to.

import { Emitter } from "/emitter.js";

/**
 * Makes Opus with RED (RFC 2198: each packet also carries the previous one, so a lost packet
 * costs no audio) the preferred audio codec where the browser has it: browsers send RED only
 * when it comes first. The SFU forwards it as it is, or cut to plain Opus for a narrow downlink.
 */
function preferRed(transceiver) {
  const codecs = RTCRtpSender.getCapabilities?.("audio")?.codecs ?? [];
  const red = codecs.filter((c) => c.mimeType.toLowerCase() === "audio/red");
  if (red.length === 0 || !transceiver.setCodecPreferences) return;
  try {
    transceiver.setCodecPreferences([...red, ...codecs.filter((c) => c.mimeType.toLowerCase() !== "audio/red")]);
  } catch (err) {
    console.warn("[peer] cannot prefer RED", err);
  }
}

/**
 * Puts the browser's `codec` (a name such as "h264" or "vp8") first among the video codecs it
 * offers, so a sender encodes with it; a browser without it keeps its own order.
 */
function preferVideoCodec(transceiver, codec) {
  const codecs = RTCRtpSender.getCapabilities?.("video")?.codecs ?? [];
  const wanted = `video/${codec}`.toLowerCase();
  const first = codecs.filter((c) => c.mimeType.toLowerCase() === wanted);
  if (first.length === 0 || !transceiver.setCodecPreferences) {
    console.warn(`[peer] no ${codec} encoder here; sending the browser's default video codec`);
    return;
  }
  try {
    transceiver.setCodecPreferences([...first, ...codecs.filter((c) => c.mimeType.toLowerCase() !== wanted)]);
  } catch (err) {
    console.warn(`[peer] cannot prefer ${codec}`, err);
  }
}

/** How long a connection may stay `disconnected` before it restarts ICE. */
const ICE_RESTART_AFTER_MS = 2000;

export class PeerLink extends Emitter {
  /**
   * @param {object} opts
   * @param {boolean} opts.polite      whether we yield on offer collisions
   * @param {(msg: object) => void} opts.send  sends {type, sdp} / {type, candidate}
   * @param {(pc: RTCPeerConnection) => void} [opts.beforeFirstAnswer]  runs once, after the
   *        first remote offer is applied and before answering (mesh uses it to attach its
   *        tracks to the offered transceivers instead of forcing a second round).
   * @param {boolean} [opts.publishOnly]  send each local track on a fresh sendonly transceiver
   *        (SFU): addTrack would reuse a transceiver the other side offered for *receiving*,
   *        mixing our publication into one of its subscriptions.
   * @param {string} [opts.label]      for log lines
   * @param {string|null} [opts.videoCodec]  the video codec to send with ("h264", "vp8"...)
   *
   * Events: 'track' (RTCTrackEvent), 'datachannel' (RTCDataChannel), 'state' (connectionState)
   */
  constructor({ polite, send, beforeFirstAnswer, publishOnly = false, label = "peer", iceServers = [], relayOnly = false, videoCodec = null }) {
    super();
    this.polite = polite;
    this.videoCodec = videoCodec;
    this.publishOnly = publishOnly;
    this.label = label;
    this.#send = send;
    this.#beforeFirstAnswer = beforeFirstAnswer;
    this.pc = new RTCPeerConnection({
      iceServers,
      bundlePolicy: "max-bundle",
      iceTransportPolicy: relayOnly ? "relay" : "all",
    });

    const pc = this.pc;
    pc.onnegotiationneeded = () => this.#offer();
    pc.onicecandidate = ({ candidate }) =>
      this.#send({ type: "candidate", candidate: candidate ? candidate.toJSON() : null });
    pc.ontrack = (event) => this.emit("track", event);
    pc.ondatachannel = ({ channel }) => this.emit("datachannel", channel);
    pc.onconnectionstatechange = () => {
      this.#recoverIce(pc.connectionState);
      this.emit("state", pc.connectionState);
    };
  }

  /** ICE restarts made on this connection (for tests and the stats overlay). */
  iceRestarts = 0;
  #iceTimer = null;

  /**
   * A connection that stays `disconnected` for a moment, or `failed`, restarts ICE on the same
   * peer connection (a new offer with new credentials): after a network change the other side
   * is reached from the new address, and the call goes on with nothing renegotiated.
   */
  #recoverIce(state) {
    clearTimeout(this.#iceTimer);
    if (state === "disconnected") this.#iceTimer = setTimeout(() => this.restartIce(), ICE_RESTART_AFTER_MS);
    else if (state === "failed") this.restartIce();
  }

  /** New ICE server credentials (from `resumed`), used from the next ICE gathering on. */
  setIceServers(iceServers) {
    if (this.#closed) return;
    try {
      this.pc.setConfiguration({ ...this.pc.getConfiguration(), iceServers });
    } catch (err) {
      console.warn(`[${this.label}] cannot update ICE servers`, err);
    }
  }

  restartIce() {
    if (this.#closed || this.pc.signalingState === "closed") return;
    console.info(`[${this.label}] restarting ICE`);
    this.iceRestarts += 1;
    this.pc.restartIce(); // negotiationneeded: #offer() makes an offer with new credentials
  }

  #send;
  #beforeFirstAnswer;
  #makingOffer = false;
  #ignoreOffer = false;
  #queue = Promise.resolve();
  #closed = false;
  #senders = new Map(); // `${streamId}:${kind}` -> RTCRtpSender

  async #offer() {
    if (this.#closed) return;
    try {
      this.#makingOffer = true;
      // Argument-less setLocalDescription creates the right offer (or answer) for the state.
      await this.pc.setLocalDescription();
      // Whatever it made: if a remote offer arrived meanwhile, this is our answer to it, and
      // not sending it would leave the other side waiting for good.
      const { type, sdp } = this.pc.localDescription;
      console.info(`[${this.label}] sending ${type}`);
      this.#send({ type, sdp });
    } catch (err) {
      console.warn(`[${this.label}] creating an offer failed`, err);
    } finally {
      this.#makingOffer = false;
    }
  }

  /**
   * After the signaling socket came back (a resume): our offer may have been lost with the old
   * socket, so it goes again. (A lost answer comes back as the server's offer, sent again.)
   */
  resendPending() {
    if (this.#closed || this.pc.signalingState !== "have-local-offer") return;
    console.info(`[${this.label}] sending our offer again`);
    this.#send({ type: "offer", sdp: this.pc.localDescription.sdp });
  }

  /** Applies a signaling message ({type: 'offer'|'answer', sdp} or {type: 'candidate', candidate}). */
  handle(msg) {
    this.#queue = this.#queue
      .then(() => this.#apply(msg))
      .catch((err) => console.warn(`[${this.label}] applying ${msg.type} failed`, err));
    return this.#queue;
  }

  async #apply(msg) {
    if (this.#closed) return;
    const pc = this.pc;
    if (msg.type === "offer" || msg.type === "answer") {
      const description = { type: msg.type, sdp: msg.sdp };
      const collision =
        description.type === "offer" && (this.#makingOffer || pc.signalingState !== "stable");
      this.#ignoreOffer = !this.polite && collision;
      if (this.#ignoreOffer) {
        console.info(`[${this.label}] ignoring a colliding offer (impolite)`);
        return;
      }
      if (description.type === "answer" && pc.signalingState !== "have-local-offer") {
        // An answer to an offer we already rolled back; nothing to apply.
        console.info(`[${this.label}] dropping a stale answer`);
        return;
      }
      // In "have-local-offer" this performs the implicit rollback of our own offer.
      console.info(`[${this.label}] applying remote ${description.type} (state ${pc.signalingState})`);
      await pc.setRemoteDescription(description);
      if (description.type === "offer") {
        if (this.#beforeFirstAnswer) {
          const hook = this.#beforeFirstAnswer;
          this.#beforeFirstAnswer = null;
          hook(pc);
        }
        await pc.setLocalDescription();
        this.#send({ type: "answer", sdp: pc.localDescription.sdp });
      }
    } else if (msg.type === "candidate") {
      try {
        // `null` means end of candidates: addIceCandidate() without an argument.
        await pc.addIceCandidate(msg.candidate ?? undefined);
      } catch (err) {
        if (!this.#ignoreOffer) throw err;
      }
    }
  }

  /**
   * Puts `track` (or nothing, with null) on the sender that carries `kind` for `stream`: a
   * replaceTrack when we already have one (no renegotiation), else a new addTrack (renegotiates).
   */
  async setTrack(kind, track, stream, sendEncodings = null) {
    const sender = this.#senders.get(`${stream.id}:${kind}`);
    if (sender && this.pc.getSenders().includes(sender)) {
      await sender.replaceTrack(track);
    } else if (track) {
      this.addTrack(track, stream, sendEncodings);
    }
  }

  /**
   * Adds `track` in `stream` (renegotiates) and remembers its sender. `sendEncodings` (SFU
   * only): simulcast layers or a scalability mode; a browser that refuses them sends one plain
   * stream instead.
   */
  addTrack(track, stream, sendEncodings = null) {
    let sender;
    if (this.publishOnly) {
      const init = { direction: "sendonly", streams: [stream] };
      let transceiver;
      try {
        transceiver = this.pc.addTransceiver(track, sendEncodings ? { ...init, sendEncodings } : init);
      } catch (err) {
        console.warn(`[${this.label}] encodings refused, sending one stream`, err);
        transceiver = this.pc.addTransceiver(track, init);
      }
      sender = transceiver.sender;
      if (track.kind === "audio") preferRed(transceiver);
    } else {
      sender = this.pc.addTrack(track, stream);
    }
    const transceiver = this.pc.getTransceivers().find((t) => t.sender === sender);
    if (track.kind === "video" && this.videoCodec && transceiver) preferVideoCodec(transceiver, this.videoCodec);
    this.#senders.set(`${stream.id}:${track.kind}`, sender);
    return sender;
  }

  /**
   * Dynacast: the sender on transceiver `mid` encodes only the simulcast layers named in
   * `active` (rids); the others are switched off until named again.
   */
  async setActiveLayers(mid, active) {
    const sender = this.pc.getTransceivers().find((t) => t.mid === mid)?.sender;
    if (!sender) return;
    const params = sender.getParameters();
    if (!params.encodings || params.encodings.length < 2) return;
    let changed = false;
    for (const encoding of params.encodings) {
      const on = active.includes(encoding.rid);
      if (encoding.active !== on) {
        encoding.active = on;
        changed = true;
      }
    }
    if (!changed) return;
    try {
      await sender.setParameters(params);
      console.info(`[${this.label}] sending layers ${active.join(",") || "none"} of ${mid}`);
    } catch (err) {
      console.warn(`[${this.label}] switching layers failed`, err);
    }
  }

  /** Stops sending every track of `stream` (renegotiates), e.g. when a screen share ends. */
  removeStream(stream) {
    for (const [key, sender] of this.#senders) {
      if (!key.startsWith(`${stream.id}:`)) continue;
      this.#senders.delete(key);
      // The m-line stays, now `inactive` (sendonly transceivers) or `recvonly`: the other side
      // sees the track end.
      if (this.pc.signalingState !== "closed") this.pc.removeTrack(sender);
    }
  }

  close() {
    this.#closed = true;
    clearTimeout(this.#iceTimer);
    this.pc.onnegotiationneeded = null;
    this.pc.onicecandidate = null;
    this.pc.ontrack = null;
    this.pc.onconnectionstatechange = null;
    this.pc.close();
  }
}
