//! Loss between nodes: the publisher's node keeps the last datagrams it relayed of each track,
//! and the subscribing node asks again for the sequence numbers it saw skipped (a NACK on the
//! node link). The subscribers' own NACKs are answered by their node's copy; this repairs the
//! copy itself.

use std::collections::VecDeque;

use bytes::Bytes;

/// Datagrams kept per relayed track: about 0.4 s of 1.2 Mbit/s video, several round trips
/// between nodes of one site.
pub const KEPT: usize = 256;
/// A jump longer than this is a restart or a layer switch, not loss: nothing is asked again.
pub const MAX_GAP: u64 = 32;
/// Simulcast layers tracked apart (their sequence numbers are separate).
const LAYERS: usize = 4;

/// The last datagrams relayed of one track, by layer and sequence number.
#[derive(Debug, Default)]
pub struct SentBuffer {
    kept: VecDeque<(u8, u64, Bytes)>,
}

impl SentBuffer {
    pub fn keep(&mut self, layer: u8, seq: u64, datagram: Bytes) {
        if self.kept.len() == KEPT {
            self.kept.pop_front();
        }
        self.kept.push_back((layer, seq, datagram));
    }

    /// The kept datagrams among `seqs` of `layer`.
    pub fn find<'a>(&'a self, layer: u8, seqs: &'a [u64]) -> impl Iterator<Item = &'a Bytes> {
        (self.kept.iter())
            .filter(move |(l, s, _)| *l == layer && seqs.contains(s))
            .map(|(_, _, d)| d)
    }
}

/// The highest sequence number seen per layer of one relayed track.
#[derive(Debug, Default)]
pub struct GapDetector {
    last: [Option<u64>; LAYERS],
}

impl GapDetector {
    /// Notes a packet; returns the sequence numbers skipped just before it (empty: none, or a
    /// jump too long to be loss).
    pub fn observe(&mut self, layer: u8, seq: u64) -> Vec<u64> {
        let Some(last) = self.last.get_mut(usize::from(layer)) else {
            return Vec::new();
        };
        let missing = match *last {
            Some(prev) if seq > prev + 1 && seq - prev <= MAX_GAP => (prev + 1..seq).collect(),
            _ => Vec::new(),
        };
        if last.is_none_or(|prev| seq > prev) {
            *last = Some(seq);
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_asked_for_once_and_jumps_are_not_loss() {
        let mut g = GapDetector::default();
        assert!(g.observe(0, 10).is_empty());
        assert!(g.observe(0, 11).is_empty());
        assert_eq!(g.observe(0, 14), [12, 13]);
        // The repair arrives late: no new gap, the high mark stays.
        assert!(g.observe(0, 12).is_empty());
        assert!(g.observe(0, 15).is_empty());
        // Layers count apart.
        assert!(g.observe(1, 500).is_empty());
        assert_eq!(g.observe(1, 502), [501]);
        // A restart far ahead is not 1000 losses.
        assert!(g.observe(0, 1015).is_empty());
        assert!(g.observe(0, 1016).is_empty());
        assert!(
            g.observe(9, 1).is_empty(),
            "a layer out of range is ignored"
        );
    }

    #[test]
    fn the_buffer_keeps_the_last_datagrams() {
        let mut b = SentBuffer::default();
        for seq in 0..(KEPT as u64 + 10) {
            b.keep(0, seq, Bytes::from(seq.to_be_bytes().to_vec()));
        }
        b.keep(1, 5, Bytes::from_static(b"other layer"));
        assert_eq!(b.find(0, &[3, 9]).count(), 0, "dropped: too old");
        let found: Vec<&Bytes> = b.find(0, &[20, 21, 999_999]).collect();
        assert_eq!(found.len(), 2);
        assert_eq!(b.find(1, &[5]).next().unwrap().as_ref(), b"other layer");
    }
}
