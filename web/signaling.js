// signaling.js — the WebSocket to the Switchboard server (`/ws`).
//
// Frames are JSON objects with a `type` field (see src/signal/protocol.rs). This module only
// moves messages; what they mean is up to app.js, sfu.js and mesh.js.
//
// Events:
//   'message' (msg)                    every server message, parsed
//   'close'   ({code, reason, intentional})  the socket is gone (after it had opened)

import { Emitter } from "/emitter.js";

/** The signaling URL for the page's own origin: ws(s)://<host>/ws. */
export function signalingUrl(loc = window.location) {
  const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${loc.host}/ws`;
}

export class Signaling extends Emitter {
  #ws = null;
  #intentional = false;
  #pingTimer = null;

  constructor(url = signalingUrl()) {
    super();
    this.url = url;
  }

  /** Opens the socket. Rejects if it cannot be opened within `timeoutMs`. */
  connect(timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      let settled = false;
      const ws = new WebSocket(this.url);
      this.#ws = ws;
      const timer = setTimeout(() => {
        if (settled) return;
        settled = true;
        ws.close();
        reject(new Error("timed out connecting to the server"));
      }, timeoutMs);

      ws.onopen = () => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        // Keep idle proxies from dropping the socket; the server answers `pong`.
        this.#pingTimer = setInterval(() => this.send({ type: "ping" }), 20000);
        resolve();
      };
      ws.onmessage = (event) => {
        let msg;
        try {
          msg = JSON.parse(event.data);
        } catch {
          console.warn("[signaling] ignoring a non-JSON frame", event.data);
          return;
        }
        if (msg && typeof msg.type === "string") this.emit("message", msg);
      };
      ws.onclose = (event) => {
        clearInterval(this.#pingTimer);
        clearTimeout(timer);
        if (!settled) {
          settled = true;
          reject(new Error("could not connect to the server"));
          return;
        }
        this.emit("close", {
          code: event.code,
          reason: event.reason,
          intentional: this.#intentional,
        });
      };
      // An error is always followed by close; close does the reporting.
      ws.onerror = () => {};
    });
  }

  get open() {
    return this.#ws?.readyState === WebSocket.OPEN;
  }

  send(msg) {
    if (!this.open) {
      console.warn("[signaling] dropping message, socket not open:", msg.type);
      return false;
    }
    this.#ws.send(JSON.stringify(msg));
    return true;
  }

  /** Resolves with the first message for which `predicate` is true (or rejects on timeout/close). */
  waitFor(predicate, timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      const offMsg = this.on("message", (msg) => {
        if (!predicate(msg)) return;
        done();
        resolve(msg);
      });
      const offClose = this.on("close", () => {
        done();
        reject(new Error("the server closed the connection"));
      });
      const timer = setTimeout(() => {
        done();
        reject(new Error("the server did not answer in time"));
      }, timeoutMs);
      function done() {
        offMsg();
        offClose();
        clearTimeout(timer);
      }
    });
  }

  close() {
    this.#intentional = true;
    clearInterval(this.#pingTimer);
    this.#ws?.close(1000, "bye");
  }
}
