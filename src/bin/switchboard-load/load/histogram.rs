//! A fixed-size, lock-free log-bucket histogram (HdrHistogram-like): 32 linear sub-buckets per
//! power of two, so any recorded value is reported within 1/32 (≈3 %) above its true value,
//! and values below 32 exactly. 1,920 atomic buckets (15 KiB) cover the whole `u64` range, so
//! memory does not grow with the number of samples.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

fn index(value: u64) -> usize {
    if value < SUB as u64 {
        return value as usize;
    }
    let msb = 63 - value.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = (value >> shift) as usize & (SUB - 1);
    (shift as usize + 1) * SUB + sub
}

/// The largest value that falls in bucket `index` (what percentiles report).
fn upper_bound(index: usize) -> u64 {
    if index < SUB {
        return index as u64;
    }
    let shift = (index / SUB - 1) as u32;
    let sub = (index % SUB) as u64;
    let lower = (SUB as u64 + sub) << shift;
    lower + ((1u64 << shift) - 1)
}

/// Recorded from many tasks at once with relaxed atomics.
#[derive(Debug)]
pub struct Histogram {
    counts: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, value: u64) {
        self.counts[index(value)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(value, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

/// A copy of a [`Histogram`], to merge and to read percentiles from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    counts: Vec<u64>,
    max: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            max: 0,
        }
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
        let h = Histogram::default();
        for v in values {
            h.record(v);
        }
        h.snapshot()
    }

    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The value at quantile `q` (0..=1): the upper bound of the bucket holding the sample of
    /// rank ⌈q·n⌉, never above the true maximum. 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper_bound(i).min(self.max);
            }
        }
        self.max
    }

    pub fn percentiles(&self, scale: f64) -> Percentiles {
        Percentiles {
            count: self.count(),
            p50: self.quantile(0.50) as f64 / scale,
            p95: self.quantile(0.95) as f64 / scale,
            p99: self.quantile(0.99) as f64 / scale,
            max: self.max as f64 / scale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut last = 0;
        for i in 0..BUCKETS {
            let upper = upper_bound(i);
            assert_eq!(index(upper), i, "bucket {i}");
            if i > 0 {
                assert_eq!(index(last + 1), i, "bucket {i} starts after {last}");
            }
            last = upper;
        }
        assert_eq!(last, u64::MAX);
        for v in [31u64, 32, 33, 1000, 123_456, 10_000_000_000] {
            let ub = upper_bound(index(v));
            assert!(ub >= v && (ub - v) as f64 <= v as f64 / 32.0, "{v} -> {ub}");
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let snap = HistogramSnapshot::from_values(1..=10_000);
        assert_eq!(snap.count(), 10_000);
        let p = snap.percentiles(1.0);
        assert!((5000.0..=5000.0 * 1.032).contains(&p.p50), "{p:?}");
        assert!((9900.0..=9900.0 * 1.032).contains(&p.p99), "{p:?}");
        assert_eq!(p.max, 10_000.0);
        assert_eq!(HistogramSnapshot::default().quantile(0.5), 0);
        let mut a = HistogramSnapshot::from_values([1, 2, 3]);
        a.merge(&HistogramSnapshot::from_values([100]));
        assert_eq!(a.count(), 4);
        assert_eq!(a.quantile(1.0), 100);
        assert_eq!(a.quantile(0.5), 2);
    }
}
