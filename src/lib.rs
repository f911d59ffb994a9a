//! Switchboard: a selective forwarding unit for group video calls.
//!
//! Layers, imports going downward only:
//! `http` → `signal` → `room`, `rtc` → `forward` → `types`, `config`, `metrics`.
//! `forward` is the engine-independent core (routing, rewriting, throttling, dropping);
//! `rtc` adapts webrtc-rs to it; `room` keeps membership; `signal` runs one participant's
//! session; `http` serves the client and the WebSocket. `client` is a synthetic participant for
//! tests and the load generator, built only on the public protocol.

pub mod client;
pub mod config;
pub mod forward;
pub mod http;
pub mod metrics;
pub mod room;
pub mod rtc;
pub mod server;
pub mod signal;
pub mod types;
