//! Signaling: the wire protocol ([`protocol`]) and one WebSocket session per participant
//! ([`session`]), the state machine that joins rooms, negotiates media and relays messages.

mod admission;
pub mod connections;
pub mod http_session;
pub mod protocol;
pub mod resume;
pub mod session;
mod sfu;
mod socket;

pub use session::{ServerContext, run_session};
