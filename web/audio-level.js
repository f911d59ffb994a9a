// audio-level.js — "who is speaking".
//
// Local tracks: a WebAudio analyser (one AudioContext for the page, created on the Join click,
// which satisfies autoplay rules). Remote tracks: the receiver's getSynchronizationSources()
// audioLevel, which the browser computes anyway (cheaper than an analyser per participant, and
// free of Chrome's "remote WebRTC audio is silent in WebAudio" quirk).
// Every ~100 ms each watched track's level is handed to its callback, scaled so that ~0.05 and
// up means someone is talking.

export class AudioLevels {
  #ctx = null;
  #meters = new Map(); // key -> {track, source, analyser, buf, onLevel}
  #timer = null;

  /** Creates/resumes the AudioContext. Call from a user gesture. */
  unlock() {
    if (!window.AudioContext) return;
    if (!this.#ctx) this.#ctx = new AudioContext();
    if (this.#ctx.state === "suspended") this.#ctx.resume().catch(() => {});
  }

  /**
   * Reports `track`'s level to `onLevel` until unwatched (re-watching a key replaces it).
   * With `receiver` (the RTCRtpReceiver of a remote track) no WebAudio is involved.
   */
  watch(key, track, onLevel, receiver = null) {
    const existing = this.#meters.get(key);
    if (existing?.track === track) {
      existing.onLevel = onLevel;
      return;
    }
    this.unwatch(key);
    if (!track) return;
    if (receiver) {
      this.#meters.set(key, { track, receiver, onLevel });
      this.#ensureTimer();
      return;
    }
    if (!this.#ctx) return;
    try {
      const source = this.#ctx.createMediaStreamSource(new MediaStream([track]));
      const analyser = this.#ctx.createAnalyser();
      analyser.fftSize = 512;
      source.connect(analyser);
      this.#meters.set(key, {
        track,
        source,
        analyser,
        buf: new Float32Array(analyser.fftSize),
        onLevel,
      });
    } catch (err) {
      console.warn("[audio-level] cannot analyse track", err);
    }
    this.#ensureTimer();
  }

  #ensureTimer() {
    if (!this.#timer) this.#timer = setInterval(() => this.#tick(), 100);
  }

  unwatch(key) {
    const m = this.#meters.get(key);
    if (!m) return;
    m.source?.disconnect();
    this.#meters.delete(key);
    m.onLevel(0);
  }

  unwatchAll() {
    for (const key of [...this.#meters.keys()]) this.unwatch(key);
  }

  #tick() {
    for (const m of this.#meters.values()) {
      if (m.track.readyState === "ended" || !m.track.enabled) {
        m.onLevel(0);
        continue;
      }
      if (m.receiver) {
        const level = m.receiver.getSynchronizationSources?.()[0]?.audioLevel ?? 0;
        m.onLevel(Math.min(1, level * 2));
        continue;
      }
      m.analyser.getFloatTimeDomainData(m.buf);
      let sum = 0;
      for (const v of m.buf) sum += v * v;
      m.onLevel(Math.min(1, Math.sqrt(sum / m.buf.length) * 4));
    }
  }
}
