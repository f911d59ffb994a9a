//! Admission control: whether the server takes one more SFU participant.
//!
//! The media plane refuses when every worker is past its load limit (measured busy time); on
//! top of that an operator may cap the forwarding rate. Mesh rooms carry no media through the
//! server and are always admitted.

use super::protocol::RoomMode;
use super::session::ServerContext;

/// `Err` carries the message for the `server-full` error.
pub fn admit_to_forwarding_cap(ctx: &ServerContext, mode: RoomMode) -> Result<(), String> {
    let Some(limit) = ctx.limits.forward_pps_limit() else {
        return Ok(());
    };
    if mode == RoomMode::Mesh {
        return Ok(());
    }
    let rate = ctx.metrics.forward_rate.get().max(0) as u64;
    if rate < limit {
        return Ok(());
    }
    ctx.metrics.joins_refused_at_capacity.inc();
    Err(format!(
        "the server is at capacity ({rate} packets/s forwarded, limit {limit}); try again later"
    ))
}
