//! Signaling: the wire protocol ([`protocol`]) and one WebSocket session per participant
//! ([`session`]), the state machine that joins rooms, negotiates media and relays messages.

pub mod protocol;
pub mod session;

pub use session::{ServerContext, run_session};
