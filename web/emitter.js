// emitter.js — a minimal typed-event helper shared by the other modules.
//
// EventTarget would do, but its CustomEvent/detail dance makes call sites noisy; this keeps
// `on(type, fn)` / `emit(type, value)` and nothing else.

export class Emitter {
  #handlers = new Map();

  /** Registers `fn` for `type`; returns a function that unregisters it. */
  on(type, fn) {
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(fn);
    return () => this.#handlers.get(type)?.delete(fn);
  }

  emit(type, value) {
    for (const fn of this.#handlers.get(type) ?? []) {
      try {
        fn(value);
      } catch (err) {
        console.error(`[switchboard] ${type} handler failed`, err);
      }
    }
  }
}
