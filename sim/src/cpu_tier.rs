//! LMCache's local CPU tier (`LocalCPUBackend`): chunks of KV kept in host memory, bounded
//! in bytes (`max_local_cpu_size`, here `--lmcache-local-cpu-size`), least recently used
//! evicted first.
//!
//! The sim keeps no KV, only which chunks are there and their **real** sizes (the
//! profile's bytes per token × the chunk's tokens, not the scaled-down blobs written to the
//! remote store), so that capacity and eviction behave as on a real host.

use lru::LruCache;

/// Bytes in one "GB" of `max_local_cpu_size` (LMCache multiplies by 1024³).
pub const GIB: f64 = (1u64 << 30) as f64;

/// Counters and sizes, for `/debug/engine`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CpuTierStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub chunks: u64,
    /// Chunks found by lookups.
    pub hits: u64,
    /// Chunks inserted (stored or promoted from the remote store).
    pub inserts: u64,
    /// Chunks dropped to make room.
    pub evictions: u64,
}

/// An LRU set of chunk keys bounded by their total size in bytes.
#[derive(Debug)]
pub struct CpuTier {
    capacity: u64,
    used: u64,
    entries: LruCache<String, u64>,
    hits: u64,
    inserts: u64,
    evictions: u64,
}

impl CpuTier {
    /// A tier holding at most `capacity` bytes (0: disabled, nothing is ever kept).
    pub fn new(capacity: u64) -> CpuTier {
        CpuTier {
            capacity,
            used: 0,
            entries: LruCache::unbounded(),
            hits: 0,
            inserts: 0,
            evictions: 0,
        }
    }

    /// `--lmcache-local-cpu-size GB` (LMCache's GB: 1024³ bytes) as a byte capacity.
    pub fn capacity_of_gb(gb: f64) -> u64 {
        if gb.is_finite() && gb > 0.0 {
            (gb * GIB) as u64
        } else {
            0
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Whether `key` is held, without changing its recency.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains(key)
    }

    /// A lookup found `key`: it becomes the most recently used. Returns whether it is held.
    pub fn touch(&mut self, key: &str) -> bool {
        let found = self.entries.get(key).is_some();
        if found {
            self.hits += 1;
        }
        found
    }

    /// Keep `key` (a chunk of `bytes` real bytes), evicting least recently used chunks
    /// until it fits. A chunk larger than the whole tier is not kept. Returns how many
    /// chunks were evicted.
    pub fn insert(&mut self, key: &str, bytes: u64) -> u64 {
        if bytes > self.capacity {
            return 0;
        }
        if let Some(old) = self.entries.get_mut(key) {
            // already held: refresh (and resize, should the size differ)
            self.used = self.used - *old + bytes;
            *old = bytes;
        } else {
            self.entries.push(key.to_string(), bytes);
            self.used += bytes;
            self.inserts += 1;
        }
        let mut evicted = 0;
        while self.used > self.capacity {
            let Some((_, b)) = self.entries.pop_lru() else {
                break;
            };
            self.used -= b;
            evicted += 1;
        }
        self.evictions += evicted;
        evicted
    }

    pub fn stats(&self) -> CpuTierStats {
        CpuTierStats {
            capacity_bytes: self.capacity,
            used_bytes: self.used,
            chunks: self.entries.len() as u64,
            hits: self.hits,
            inserts: self.inserts,
            evictions: self.evictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_by_bytes() {
        let mut t = CpuTier::new(100);
        assert_eq!(t.insert("a", 40), 0);
        assert_eq!(t.insert("b", 40), 0);
        assert!(t.contains("a") && t.contains("b"));
        // a is used: b becomes the oldest
        assert!(t.touch("a"));
        assert_eq!(t.insert("c", 40), 1);
        assert!(t.contains("a") && !t.contains("b") && t.contains("c"));
        assert_eq!(t.stats().used_bytes, 80);
        // a big chunk evicts as many as it needs
        assert_eq!(t.insert("d", 90), 2);
        assert_eq!((t.stats().chunks, t.stats().used_bytes), (1, 90));
        // larger than the tier: not kept, nothing evicted
        assert_eq!(t.insert("huge", 101), 0);
        assert!(!t.contains("huge") && t.contains("d"));
        // re-inserting refreshes without counting twice
        assert_eq!(t.insert("d", 90), 0);
        let s = t.stats();
        assert_eq!((s.inserts, s.evictions, s.hits), (4, 3, 1));
        assert!(!t.touch("b"));
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut t = CpuTier::new(CpuTier::capacity_of_gb(0.0));
        assert!(!t.enabled());
        t.insert("a", 1);
        assert!(!t.contains("a"));
        assert_eq!(CpuTier::capacity_of_gb(5.0), 5 * (1 << 30));
        assert_eq!(CpuTier::capacity_of_gb(f64::NAN), 0);
        assert_eq!(CpuTier::capacity_of_gb(-1.0), 0);
    }
}
