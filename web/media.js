// media.js — the local camera, microphone and screen share.
//
// `LocalMedia.stream` is one long-lived MediaStream holding the current camera and microphone
// tracks; its id never changes, so peer connections can keep sending "the camera stream" while
// the tracks inside it are swapped (device change, camera off/on). The screen share is a second
// stream that exists only while sharing.
//
// Events:
//   'tracks'       the camera/mic tracks changed (preview and senders must follow)
//   'screen-ended' the user stopped the share from the browser's own UI

import { Emitter } from "/emitter.js";

// 720p: the top of the three simulcast layers the SFU client sends (sfu.js CAMERA_LAYERS).
const VIDEO = { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } };
const AUDIO = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };

/** A sentence for the user about a getUserMedia/getDisplayMedia failure. */
export function describeMediaError(err, what = "camera and microphone") {
  switch (err?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return `Access to the ${what} was denied. Allow it in the browser's site settings and reload — or join without it.`;
    case "NotFoundError":
    case "OverconstrainedError":
      return `No usable ${what} was found.`;
    case "NotReadableError":
    case "AbortError":
      return `The ${what} could not be started; another application may be using it.`;
    case "InsecureContext":
      return `The ${what} needs a secure page (https:// or localhost).`;
    default:
      return `The ${what} could not be opened (${err?.message ?? err}).`;
  }
}

export class LocalMedia extends Emitter {
  /** Camera + microphone, one stable MediaStream. */
  stream = new MediaStream();
  /** The screen-share stream while sharing, else null. */
  screen = null;
  /** User intent: whether the mic / camera should be live. */
  micOn = true;
  camOn = true;
  cameraId = "";
  micId = "";
  /** Last acquisition errors per kind (Error objects), for the UI. */
  errors = { audio: null, video: null };

  get audioTrack() {
    return this.stream.getAudioTracks()[0] ?? null;
  }

  get videoTrack() {
    return this.stream.getVideoTracks()[0] ?? null;
  }

  static supported() {
    return !!navigator.mediaDevices?.getUserMedia;
  }

  /** Opens camera and microphone (as far as allowed). Never throws; see `errors`. */
  async start() {
    this.errors = { audio: null, video: null };
    if (!LocalMedia.supported()) {
      const err = Object.assign(new Error("insecure context"), { name: "InsecureContext" });
      this.errors = { audio: err, video: err };
      return;
    }
    const wantAudio = this.micOn;
    const wantVideo = this.camOn;
    if (!wantAudio && !wantVideo) return;
    try {
      const got = await navigator.mediaDevices.getUserMedia({
        audio: wantAudio && this.#audioConstraints(),
        video: wantVideo && this.#videoConstraints(),
      });
      got.getTracks().forEach((t) => this.#put(t));
    } catch (err) {
      // One of the two may still work on its own (no camera, camera busy, ...).
      if (wantAudio) await this.#acquire("audio").catch((e) => (this.errors.audio = e));
      if (wantVideo) await this.#acquire("video").catch((e) => (this.errors.video = e));
      if (!this.errors.audio && !this.errors.video) console.warn("[media] combined getUserMedia failed", err);
    }
    this.emit("tracks");
  }

  async listDevices() {
    if (!navigator.mediaDevices?.enumerateDevices) return { cameras: [], mics: [] };
    const devices = await navigator.mediaDevices.enumerateDevices();
    const pick = (kind, fallback) =>
      devices
        .filter((d) => d.kind === kind && d.deviceId)
        .map((d, i) => ({ id: d.deviceId, label: d.label || `${fallback} ${i + 1}` }));
    return { cameras: pick("videoinput", "Camera"), mics: pick("audioinput", "Microphone") };
  }

  currentDeviceId(kind) {
    const track = kind === "audio" ? this.audioTrack : this.videoTrack;
    return track?.getSettings().deviceId ?? (kind === "audio" ? this.micId : this.cameraId);
  }

  async selectDevice(kind, deviceId) {
    if (kind === "audio") this.micId = deviceId;
    else this.cameraId = deviceId;
    const live = kind === "audio" ? this.audioTrack : this.videoTrack;
    if (!live) return;
    await this.#acquire(kind);
    this.emit("tracks");
  }

  /** Mutes or unmutes the microphone (the track stays, disabled, so unmuting is instant). */
  async setMic(on) {
    this.micOn = on;
    if (on && !this.audioTrack) {
      try {
        await this.#acquire("audio");
        this.errors.audio = null;
      } catch (err) {
        this.errors.audio = err;
        this.micOn = false;
        throw err;
      }
    }
    if (this.audioTrack) this.audioTrack.enabled = on;
    this.emit("tracks");
  }

  /** Turns the camera on (opens it again) or off (releases it, so its light goes off). */
  async setCamera(on) {
    this.camOn = on;
    if (on) {
      if (!this.videoTrack) {
        try {
          await this.#acquire("video");
          this.errors.video = null;
        } catch (err) {
          this.errors.video = err;
          this.camOn = false;
          throw err;
        }
      }
    } else {
      for (const t of this.stream.getVideoTracks()) {
        t.stop();
        this.stream.removeTrack(t);
      }
    }
    this.emit("tracks");
  }

  async startScreen() {
    if (!navigator.mediaDevices?.getDisplayMedia) {
      throw Object.assign(new Error("screen sharing is not supported by this browser"), {
        name: "NotSupportedError",
      });
    }
    const screen = await navigator.mediaDevices.getDisplayMedia({
      video: { frameRate: { ideal: 15 } },
      audio: false,
    });
    const track = screen.getVideoTracks()[0];
    if (track) track.contentHint = "detail";
    track?.addEventListener("ended", () => {
      if (this.screen === screen) this.emit("screen-ended");
    });
    this.screen = screen;
    return screen;
  }

  stopScreen() {
    this.screen?.getTracks().forEach((t) => t.stop());
    this.screen = null;
  }

  stopAll() {
    this.stopScreen();
    for (const t of this.stream.getTracks()) {
      t.stop();
      this.stream.removeTrack(t);
    }
  }

  #audioConstraints() {
    return this.micId ? { ...AUDIO, deviceId: { exact: this.micId } } : AUDIO;
  }

  #videoConstraints() {
    return this.cameraId ? { ...VIDEO, deviceId: { exact: this.cameraId } } : VIDEO;
  }

  async #acquire(kind) {
    const constraints =
      kind === "audio" ? { audio: this.#audioConstraints() } : { video: this.#videoConstraints() };
    const got = await navigator.mediaDevices.getUserMedia(constraints);
    const track = got.getTracks()[0];
    this.#put(track);
    return track;
  }

  /** Replaces the stream's track of the same kind by `track`. */
  #put(track) {
    for (const old of this.stream.getTracks()) {
      if (old.kind !== track.kind) continue;
      old.stop();
      this.stream.removeTrack(old);
    }
    if (track.kind === "audio") track.enabled = this.micOn;
    this.stream.addTrack(track);
  }
}
