//! The KDN's rate and share bounds, as plain arithmetic over caller-given instants
//! (so tests drive time): the registration token bucket (`max_registrations_per_s`,
//! `registration_burst`) and the per-producer warm-up share gate (`warmup_max_share`).

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<Instant>,
}

/// Why a take was refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refused {
    /// Not enough tokens now; this many seconds until there are.
    Later(f64),
    /// More than the bucket can ever hold.
    TooMany { burst: usize },
}

impl TokenBucket {
    /// A full bucket; `rate` 0 takes everything.
    pub fn new(rate: f64, burst: usize) -> Self {
        TokenBucket {
            rate,
            burst: burst as f64,
            tokens: burst as f64,
            at: None,
        }
    }

    /// Take `n` tokens at `now`, all or none.
    pub fn take(&mut self, n: usize, now: Instant) -> Result<(), Refused> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        if n as f64 > self.burst {
            return Err(Refused::TooMany {
                burst: self.burst as usize,
            });
        }
        if let Some(at) = self.at {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.at = Some(now);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err(Refused::Later((n - self.tokens) / self.rate))
        }
    }
}

/// When warm-ups may next start on one producer: each prefill of `d` pushes the next
/// start to `d × (1 − share) / share` after it ended, so that warm-ups take at most
/// `share` of the producer's time (per concurrent warm-up slot).
#[derive(Debug, Default)]
pub struct ShareGate {
    next: Option<Instant>,
}

impl ShareGate {
    /// How long a warm-up starting at `now` must wait.
    pub fn wait(&self, now: Instant) -> Duration {
        self.next
            .map(|n| n.saturating_duration_since(now))
            .unwrap_or_default()
    }

    /// A prefill of `took` ended at `now`.
    pub fn ran(&mut self, took: Duration, now: Instant, share: f64) {
        let share = share.clamp(1e-3, 1.0);
        let pause = took.mul_f64((1.0 - share) / share);
        let from = self.next.map_or(now, |n| n.max(now));
        self.next = Some(from + pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 20);
        assert_eq!(b.take(20, t0), Ok(()));
        match b.take(5, t0) {
            Err(Refused::Later(s)) => assert!((s - 0.5).abs() < 1e-9, "{s}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.take(5, t0 + Duration::from_millis(500)), Ok(()));
        assert_eq!(
            b.take(21, t0 + Duration::from_secs(100)),
            Err(Refused::TooMany { burst: 20 })
        );
        // refilled to the burst, not beyond
        assert_eq!(b.take(20, t0 + Duration::from_secs(100)), Ok(()));
        assert!(b.take(1, t0 + Duration::from_secs(100)).is_err());
        let mut off = TokenBucket::new(0.0, 0);
        assert_eq!(off.take(1_000_000, t0), Ok(()));
    }

    #[test]
    fn share_gate_bounds_the_producers_time() {
        let t0 = Instant::now();
        let mut g = ShareGate::default();
        assert_eq!(g.wait(t0), Duration::ZERO);
        // half the time: a 2 s prefill is followed by 2 s without warm-ups
        g.ran(Duration::from_secs(2), t0, 0.5);
        assert_eq!(g.wait(t0), Duration::from_secs(2));
        assert_eq!(g.wait(t0 + Duration::from_secs(3)), Duration::ZERO);
        // a quarter: 1 s of prefill, 3 s of pause, added after the pending pause
        g.ran(Duration::from_secs(1), t0, 0.25);
        assert_eq!(g.wait(t0), Duration::from_secs(5));
        let mut full = ShareGate::default();
        full.ran(Duration::from_secs(9), t0, 1.0);
        assert_eq!(full.wait(t0), Duration::ZERO);
    }
}
