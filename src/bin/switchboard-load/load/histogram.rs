//! Latency histograms on [`hdrhistogram`] (3 significant digits: a percentile is reported at
//! most 0.1 % above the true value), recorded from many threads at packet rate.
//!
//! Recording stays cheap without a shared lock: a [`Histogram`] is [`SHARDS`] hdrhistogram
//! histograms, each behind its own mutex, and every thread records into the shard it was given
//! the first time it recorded (threads take shards in turn). The generator records from its
//! runtime's worker threads and the lite receivers' thread, as a rule fewer than [`SHARDS`], so
//! each has a shard of its own and takes an uncontended lock (two atomic operations) per record
//! (with more threads some share a shard: still exact, seldom contended); only a snapshot (once
//! a second, and at the end of the window) locks each shard briefly to merge it.
//!
//! Not hdrhistogram's `SyncHistogram`/`Recorder`: a recorder hands its samples over only when it
//! next records after a refresh began (or is dropped), so the snapshot taken after the window
//! closes, when nobody records any more, would wait for samples that never come; and a recorder
//! that records nothing (a publisher alone in its room) would hold up every refresh.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

/// Significant decimal digits the histograms keep.
const SIGFIG: u8 = 3;
/// Independent histograms per [`Histogram`]: more than the threads that record.
pub const SHARDS: usize = 8;

fn new_histogram() -> hdrhistogram::Histogram<u64> {
    // Auto-resizing: memory grows with the largest value recorded, not up front.
    hdrhistogram::Histogram::new(SIGFIG).expect("3 significant digits are within 0..=5")
}

/// Records `value`, growing the histogram to fit it. (`saturating_record` would not grow it: it
/// clamps to the current range.) Only values beyond what hdrhistogram can track at all (over
/// `u64::MAX / 2`) fail, and are counted at its highest trackable value.
fn record_into(h: &mut hdrhistogram::Histogram<u64>, value: u64) {
    if h.record(value).is_err() {
        h.saturating_record(value);
    }
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard, taken in turn the first time it records.
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

/// One shard, on cache lines of its own: its lock word and counters (total, min, max) change
/// on every record, and must not share a line with another thread's shard.
#[derive(Debug)]
#[repr(align(128))]
struct Shard(Mutex<hdrhistogram::Histogram<u64>>);

/// Recorded from many threads at once; see the module header.
#[derive(Debug)]
pub struct Histogram {
    shards: [Shard; SHARDS],
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Shard(Mutex::new(new_histogram()))),
        }
    }
}

impl Histogram {
    pub fn record(&self, value: u64) {
        let shard = SHARD.with(|s| *s);
        record_into(
            &mut self.shards[shard]
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            value,
        );
    }

    /// Everything recorded so far, merged.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut merged = HistogramSnapshot::default();
        for shard in &self.shards {
            merged.add(&shard.0.lock().unwrap_or_else(PoisonError::into_inner));
        }
        merged
    }
}

/// A copy of a [`Histogram`], to merge and to read percentiles from.
#[derive(Debug, Clone)]
pub struct HistogramSnapshot(hdrhistogram::Histogram<u64>);

impl Default for HistogramSnapshot {
    fn default() -> Self {
        Self(new_histogram())
    }
}

/// Percentiles of a snapshot, in the unit the values were recorded in, divided by `scale`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl HistogramSnapshot {
    pub fn from_values(values: impl IntoIterator<Item = u64>) -> Self {
        let mut s = Self::default();
        for v in values {
            record_into(&mut s.0, v);
        }
        s
    }

    fn add(&mut self, other: &hdrhistogram::Histogram<u64>) {
        // Both auto-resize, so this can fail only if the counts array outgrew `usize`.
        self.0
            .add(other)
            .expect("auto-resizing histograms always merge");
    }

    pub fn merge(&mut self, other: &HistogramSnapshot) {
        self.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The value at quantile `q` (0..=1): the highest value equivalent (within the precision)
    /// to the sample of rank ⌈q·n⌉. 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        self.0.value_at_quantile(q.clamp(0.0, 1.0))
    }

    pub fn percentiles(&self, scale: f64) -> Percentiles {
        Percentiles {
            count: self.count(),
            p50: self.quantile(0.50) as f64 / scale,
            p95: self.quantile(0.95) as f64 / scale,
            p99: self.quantile(0.99) as f64 / scale,
            max: self.0.max() as f64 / scale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within the 3 significant digits: at most 0.1 % above.
    fn close(reported: f64, truth: f64) -> bool {
        (truth..=truth * 1.001).contains(&reported)
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let snap = HistogramSnapshot::from_values(1..=10_000);
        assert_eq!(snap.count(), 10_000);
        let p = snap.percentiles(1.0);
        assert!(close(p.p50, 5000.0), "{p:?}");
        assert!(close(p.p95, 9500.0), "{p:?}");
        assert!(close(p.p99, 9900.0), "{p:?}");
        assert!(close(p.max, 10_000.0), "{p:?}");
        // µs in, ms out.
        let ms = HistogramSnapshot::from_values([2_370, 21_600]).percentiles(1000.0);
        assert!(close(ms.p50, 2.37) && close(ms.max, 21.6), "{ms:?}");
        // Small values are exact; 0 is a value.
        assert_eq!(HistogramSnapshot::from_values([0, 0, 7]).quantile(0.5), 0);
        assert_eq!(HistogramSnapshot::from_values([0, 0, 7]).quantile(1.0), 7);
    }

    #[test]
    fn empty_and_merged() {
        let empty = HistogramSnapshot::default();
        assert_eq!(empty.quantile(0.5), 0);
        assert_eq!(empty.percentiles(1.0), Percentiles::default());
        let mut a = HistogramSnapshot::from_values([1, 2, 3]);
        a.merge(&HistogramSnapshot::from_values([100]));
        assert_eq!(a.count(), 4);
        assert_eq!(a.quantile(1.0), 100);
        assert_eq!(a.quantile(0.5), 2);
        // Far apart ranges merge (the auto-resizing histograms grow to fit).
        a.merge(&HistogramSnapshot::from_values([3_600_000_000]));
        assert_eq!(a.count(), 5);
        assert!(close(a.percentiles(1.0).max, 3.6e9));
        // The untrackable top of `u64` is counted, at the top of the range.
        a.merge(&HistogramSnapshot::from_values([u64::MAX]));
        assert_eq!(a.count(), 6);
        assert!(a.quantile(1.0) >= u64::MAX / 4);
    }

    #[test]
    fn records_from_many_threads_are_all_counted() {
        let h = Histogram::default();
        let threads = SHARDS + 3; // more threads than shards: some share one
        std::thread::scope(|s| {
            for t in 0..threads as u64 {
                let h = &h;
                s.spawn(move || {
                    for v in 0..10_000 {
                        h.record(1 + t * 10_000 + v);
                    }
                });
            }
        });
        let snap = h.snapshot();
        assert_eq!(snap.count(), threads as u64 * 10_000);
        assert!(close(snap.percentiles(1.0).max, threads as f64 * 10_000.0));
        assert!(close(
            snap.percentiles(1.0).p50,
            threads as f64 * 10_000.0 / 2.0
        ));
        // A snapshot is a copy: recording goes on into the live histogram only.
        h.record(5);
        assert_eq!(snap.count(), threads as u64 * 10_000);
        assert_eq!(h.snapshot().count(), threads as u64 * 10_000 + 1);
    }
}
