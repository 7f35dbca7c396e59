//! One backoff policy for everything that waits before trying again: the
//! consumer runtime (a failing event, a failing commit), the job runner (a
//! failed job) and ingest (a CSV import waiting for capacity).
//!
//! Exponential: the delay after the `n`-th failure is `base * 2^(n-1)`,
//! capped at `max`. With [`Jitter::Full`] the delay is drawn from its upper
//! half, so that many waiters that failed together (every worker of a
//! consumer when the store went away) do not retry together.

use std::time::Duration;

/// Whether delays are randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly `base * 2^(n-1)` (capped): for a single waiter polling a
    /// local resource.
    None,
    /// Uniform in the upper half of the exact delay.
    Full,
}

/// An exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Randomised or exact.
    pub jitter: Jitter,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`, with full jitter.
    pub const fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, jitter: Jitter::Full }
    }

    /// The same, without jitter.
    pub const fn exact(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, jitter: Jitter::None }
    }

    /// The delay after failure `n` (1-based; 0 counts as 1).
    pub fn delay(&self, n: u32) -> Duration {
        let d = self.base.saturating_mul(1u32 << n.saturating_sub(1).min(20)).min(self.max);
        match self.jitter {
            Jitter::None => d,
            Jitter::Full => d / 2 + (d / 2).mul_f64(rand::random::<f64>()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let b = Backoff::exact(Duration::from_millis(100), Duration::from_secs(1));
        let got: Vec<u128> = (0..7).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(got, [100, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1), "no overflow on huge attempt numbers");
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let b = Backoff::new(Duration::from_millis(400), Duration::from_secs(60));
        for n in 1..12 {
            let exact = Backoff { jitter: Jitter::None, ..b }.delay(n);
            for _ in 0..50 {
                let d = b.delay(n);
                assert!(d >= exact / 2 && d <= exact, "attempt {n}: {d:?} outside [{:?}, {exact:?}]", exact / 2);
            }
        }
    }
}
