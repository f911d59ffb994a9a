//! Switchboard: a selective forwarding unit for group video calls.
//!
//! Layers, imports going downward only:
//! `http` → `signal` → `room`, `media` → `forward` → `types`, `config`, `metrics`; `webhook`
//! (below `room`) and `tls` (below `server` and `turn`) are leaves. `cluster` (Redis) and
//! `cascade` (rooms served by several nodes: `cascade` → `cluster`, `room`, `media`) sit below
//! `server`, which wires them.
//! `forward` is the engine-independent packet path (routing, rewriting, keyframes, throttling);
//! `media` runs the media workers on the sans-IO engine str0m and drives `forward`; `room` keeps
//! membership; `signal` runs one participant's session; `http` serves the client and the
//! WebSocket. `client` is a synthetic participant for tests and the load generator, built only
//! on the public protocol and an independent WebRTC stack (webrtc-rs).

pub mod auth;
pub mod cascade;
pub mod client;
pub mod cluster;
pub mod config;
pub mod forward;
pub mod http;
pub mod media;
pub mod metrics;
pub mod room;
pub mod server;
pub mod signal;
pub mod tls;
pub mod turn;
pub mod types;
pub mod webhook;
