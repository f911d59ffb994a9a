//! An interceptor that turns retransmissions (RTX, RFC 4588) back into their original packets
//! before the NACK generator sees them.
//!
//! webrtc-rs 0.21 de-encapsulates RTX only after the interceptor chain, so its NACK generator
//! never learns that a NACKed packet arrived on the RTX stream and NACKs it again every 100 ms
//! while it stays in its 512-packet window. Under loss that storm of needless resends pushes the
//! server past its retransmission cap (str0m drops queued resends above 15 % of the bytes sent),
//! and real losses go unrepaired. Browsers do not do this, so the test client must not either.
//! Sitting between the FEC decoder and the NACK generator, this hands every later interceptor,
//! and the application, the original packet.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use rtc::interceptor::{Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

/// After the FEC decoder (6_000), before the NACK generator (7_000).
const SLOT: usize = 6_500;

#[derive(Default)]
pub struct RtxUnwrapInterceptor {
    /// RTX SSRC → the primary stream's SSRC and payload type.
    primaries: HashMap<u32, (u32, u8)>,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

/// Adds the interceptor to a registry.
pub fn register(registry: Registry) -> Registry {
    registry.with(Slot::from(SLOT), RtxUnwrapInterceptor::default())
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for RtxUnwrapInterceptor {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(packet) = &mut msg.message.packet
            && let Some(&(ssrc, payload_type)) = self.primaries.get(&packet.header.ssrc)
        {
            // `[original sequence number][original payload]`; shorter is padding (a probe).
            if packet.payload.len() < 2 {
                return Ok(());
            }
            packet.header.sequence_number =
                u16::from_be_bytes([packet.payload[0], packet.payload[1]]);
            packet.header.ssrc = ssrc;
            packet.header.payload_type = payload_type;
            packet.header.padding = false;
            packet.payload = packet.payload.slice(2..);
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for RtxUnwrapInterceptor {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}

    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        if let Some(rtx) = info.ssrc_rtx {
            self.primaries.insert(rtx, (info.ssrc, info.payload_type));
        }
    }

    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        if let Some(rtx) = info.ssrc_rtx {
            self.primaries.remove(&rtx);
        }
    }
}
