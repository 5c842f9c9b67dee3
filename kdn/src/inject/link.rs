//! [`LinkShaper`]: the emulated link of a target, a byte token bucket with no burst, so
//! that injections into it take as long as the configured link speed allows.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket on bytes with no burst (GCRA / virtual clock): each reservation of `n`
/// bytes occupies the link for `n / rate` seconds after the previous reservation ends.
#[derive(Debug)]
pub struct LinkShaper {
    bytes_per_sec: f64,
    /// Theoretical arrival time: when the link is free again.
    tat: Mutex<Option<Instant>>,
}

impl LinkShaper {
    pub fn new(bytes_per_sec: f64) -> Self {
        LinkShaper {
            bytes_per_sec: bytes_per_sec.max(1.0),
            tat: Mutex::new(None),
        }
    }

    /// A link of `gbps` gigabits (10^9 bits) per second.
    pub fn from_gbps(gbps: f64) -> Self {
        Self::new(gbps * 1e9 / 8.0)
    }

    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes_per_sec
    }

    /// Reserve the link for `bytes`; returns when that transmission ends.
    pub fn reserve(&self, bytes: u64) -> Instant {
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let start = tat.map_or(now, |t| t.max(now));
        let end = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
        *tat = Some(end);
        end
    }

    /// How long a reservation made now would wait for the link.
    pub fn backlog(&self) -> Duration {
        let tat = *self.tat.lock().unwrap_or_else(|p| p.into_inner());
        tat.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shaper_serialises_reservations() {
        let l = LinkShaper::new(1_000_000.0); // 1 MB/s
        let t0 = Instant::now();
        let a = l.reserve(100_000);
        let b = l.reserve(100_000);
        assert!(a >= t0 + Duration::from_millis(99));
        assert!(b >= a + Duration::from_millis(99));
        assert!(l.backlog() >= Duration::from_millis(150));
        assert_eq!(LinkShaper::from_gbps(8.0).bytes_per_sec(), 1e9);
    }
}
