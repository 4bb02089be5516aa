//! Latency percentiles.

use std::time::Duration;

use serde::Serialize;

/// The `p`-th percentile (0..=100) of ascending `sorted` samples, by nearest rank: the smallest
/// sample with at least `p`% of all samples at or below it. Zero for no samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Count and percentiles of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Summarises `samples` (sorts them in place).
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Self {
            count: samples.len(),
            p50_ms: ms(percentile(samples, 50.0)),
            p90_ms: ms(percentile(samples, 90.0)),
            p99_ms: ms(percentile(samples, 99.0)),
            max_ms: ms(samples.last().copied().unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&v, 50.0), ms(50));
        assert_eq!(percentile(&v, 90.0), ms(90));
        assert_eq!(percentile(&v, 99.0), ms(99));
        assert_eq!(percentile(&v, 99.9), ms(100));
        assert_eq!(percentile(&v, 100.0), ms(100));
        assert_eq!(percentile(&v, 0.0), ms(1));
        // Out-of-range p is clamped rather than indexing out of bounds.
        assert_eq!(percentile(&v, 150.0), ms(100));
        assert_eq!(percentile(&v, -1.0), ms(1));
    }

    #[test]
    fn small_and_empty_sets() {
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        assert_eq!(percentile(&[ms(7)], 1.0), ms(7));
        assert_eq!(percentile(&[ms(7)], 99.0), ms(7));
        // Two samples: p50 is the first (1 of 2 at or below it), p51 the second.
        assert_eq!(percentile(&[ms(1), ms(2)], 50.0), ms(1));
        assert_eq!(percentile(&[ms(1), ms(2)], 51.0), ms(2));
        // Ten samples: p99 is the largest, p90 the ninth.
        let v: Vec<Duration> = (1..=10).map(ms).collect();
        assert_eq!(percentile(&v, 99.0), ms(10));
        assert_eq!(percentile(&v, 90.0), ms(9));
    }

    #[test]
    fn summary_sorts_first() {
        let mut v = vec![ms(30), ms(10), ms(20), ms(40)];
        let l = Latency::of(&mut v);
        assert_eq!(l.count, 4);
        assert_eq!(l.p50_ms, 20.0);
        assert_eq!(l.p99_ms, 40.0);
        assert_eq!(l.max_ms, 40.0);
        assert_eq!(Latency::of(&mut []), Latency::default());
    }
}
