//! Exponential backoff with full jitter: sleep a uniform random time in `[0, min(cap, base·2ⁿ)]`,
//! so a fleet reconnecting to a restarted controller spreads out instead of stampeding.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

/// Delays for retrying: `attempt` counts the failures since the last [`Backoff::reset`].
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: SystemRandom,
}

impl Backoff {
    /// Delays up to `base·2ⁿ`, never more than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, attempt: 0, rng: SystemRandom::new() }
    }

    /// The default for reconnects: 250 ms base, 30 s cap.
    pub fn reconnect() -> Self {
        Self::new(Duration::from_millis(250), Duration::from_secs(30))
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, and one more attempt counted.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fraction(&self.rng))
    }

    /// Back to the first attempt (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniform random number in `[0, 1)` (0.5 if the system has no randomness to give).
pub fn random_fraction() -> f64 {
    fraction(&SystemRandom::new())
}

fn fraction(rng: &SystemRandom) -> f64 {
    let mut b = [0u8; 8];
    let r = if rng.fill(&mut b).is_ok() { u64::from_le_bytes(b) } else { u64::MAX / 2 };
    (r >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_within_the_growing_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut max_seen = Duration::ZERO;
        for n in 0..40 {
            let ceiling = b.ceiling();
            assert_eq!(
                ceiling,
                (Duration::from_millis(100) * 2u32.pow(n.min(5))).min(Duration::from_secs(2))
            );
            let d = b.next_delay();
            assert!(d <= ceiling, "{d:?} > {ceiling:?}");
            max_seen = max_seen.max(d);
        }
        assert!(max_seen > Duration::from_millis(500), "jitter uses the range: {max_seen:?}");
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn fractions_are_in_the_unit_interval() {
        for _ in 0..1000 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f), "{f}");
        }
    }

    #[test]
    fn delays_are_spread() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let v: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        let distinct: std::collections::BTreeSet<_> = v.iter().collect();
        assert!(distinct.len() > 15, "{v:?}");
    }
}
