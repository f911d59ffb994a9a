//! Padding removal: a publisher's padding-only packets (bandwidth probes) carry nothing for
//! subscribers, so the source forwarder drops them and closes their gaps in the sequence space.
//!
//! A packet's new sequence number is its own minus the padding packets removed *before it*, so
//! loss and reordering around removed padding stay exact: a late packet lands in its own slot,
//! never on a neighbour's. Only padding that arrives as the newest packet is removed; padding
//! that arrives late (its slot's neighbours may already be out) is forwarded as an empty packet,
//! which receivers take as padding.

use std::collections::VecDeque;

/// Sequence numbers of removed padding are remembered this far behind the newest packet; a
/// packet older than that is too late to place and is dropped.
pub const PADDING_WINDOW: u64 = 1 << 12;

#[derive(Debug, Default)]
pub struct PaddingRemover {
    /// Removed padding within the window, ascending.
    removed: VecDeque<u64>,
    /// Removed padding that left the window (all older than `removed`).
    removed_before_window: u64,
    highest: Option<u64>,
}

impl PaddingRemover {
    /// The packet's sequence number once removed padding is taken out, or None when the packet
    /// is dropped: padding removed now, a duplicate of removed padding, or older than the window.
    pub fn map(&mut self, seq: u64, is_padding: bool) -> Option<u64> {
        let newest = match self.highest {
            None => true,
            Some(h) if seq > h => true,
            Some(h) if h - seq > PADDING_WINDOW => return None,
            Some(_) => false,
        };
        if newest {
            self.highest = Some(seq);
            while self
                .removed
                .front()
                .is_some_and(|&r| seq - r > PADDING_WINDOW)
            {
                self.removed.pop_front();
                self.removed_before_window += 1;
            }
            if is_padding {
                self.removed.push_back(seq);
                return None;
            }
            return Some(seq - self.removed_before_window - self.removed.len() as u64);
        }
        let before = self.removed.partition_point(|&r| r < seq);
        if self.removed.get(before) == Some(&seq) {
            return None; // a duplicate of removed padding
        }
        Some(seq - self.removed_before_window - before as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(r: &mut PaddingRemover, input: &[(u64, bool)]) -> Vec<Option<u64>> {
        input.iter().map(|&(s, p)| r.map(s, p)).collect()
    }

    #[test]
    fn in_order_padding_leaves_no_gap() {
        let mut r = PaddingRemover::default();
        let out = run(
            &mut r,
            &[(1, false), (2, true), (3, true), (4, false), (5, false)],
        );
        assert_eq!(out, vec![Some(1), None, None, Some(2), Some(3)]);
    }

    #[test]
    fn a_late_packet_lands_in_its_own_slot() {
        let mut r = PaddingRemover::default();
        // 5 is late; padding 6 is removed meanwhile. 5 must not take 4's slot.
        let out = run(
            &mut r,
            &[(4, false), (6, true), (7, false), (5, false), (8, false)],
        );
        assert_eq!(out, vec![Some(4), None, Some(6), Some(5), Some(7)]);
    }

    #[test]
    fn loss_stays_visible_after_padding() {
        let mut r = PaddingRemover::default();
        // 3 is lost for good: the gap between 2 and 5's slots stays, so the subscriber NACKs it.
        let out = run(&mut r, &[(1, false), (2, true), (4, false), (5, false)]);
        assert_eq!(out, vec![Some(1), None, Some(3), Some(4)]);
        assert_eq!(
            r.map(3, false),
            Some(2),
            "and it fills its own slot if it comes"
        );
    }

    #[test]
    fn late_padding_is_kept_as_an_empty_packet() {
        let mut r = PaddingRemover::default();
        let out = run(&mut r, &[(1, false), (3, false), (2, true), (4, false)]);
        assert_eq!(out, vec![Some(1), Some(3), Some(2), Some(4)]);
    }

    #[test]
    fn duplicates_of_removed_padding_stay_removed() {
        let mut r = PaddingRemover::default();
        let out = run(&mut r, &[(1, false), (2, true), (3, false), (2, true)]);
        assert_eq!(out, vec![Some(1), None, Some(2), None]);
    }

    #[test]
    fn memory_is_bounded_and_old_removals_still_count() {
        let mut r = PaddingRemover::default();
        let mut seq = 0;
        for _ in 0..10_000 {
            seq += 1;
            assert_eq!(r.map(seq, true), None);
        }
        assert!(r.removed.len() as u64 <= PADDING_WINDOW + 1);
        seq += 1;
        assert_eq!(r.map(seq, false), Some(1), "10,000 removed before it");
        assert_eq!(r.map(seq - PADDING_WINDOW - 5, false), None, "too late");
    }
}
