//! vLLM's automatic prefix caching (APC), as the V1 `KVCacheManager` / `BlockPool` do it:
//! the GPU KV cache is `num_gpu_blocks` blocks of `block_size` tokens; a full prompt block
//! is identified by a hash chain over the token ids (block i's hash covers block i-1's hash
//! and its own ids), so two prompts share a cached block only when everything before it is
//! the same too.
//!
//! One [`BlockPool`] holds both the running sequences' KV and the cache: a block used by a
//! running sequence is pinned (reference-counted; requests with the same prefix share it);
//! a freed block keeps its hash and stays findable in the free queue until an allocation
//! needs it, least recently freed first (blocks of one request are freed tail first, so a
//! prefix outlives its suffix). With caching disabled (`--no-enable-prefix-caching`) the
//! same pool runs without hashes: nothing is ever found.

use lru::LruCache;
use std::collections::HashMap;

/// A block's position in the pool.
pub type BlockId = u32;

/// Hash chain of the full `block_size`-token blocks of `ids` (a trailing partial block has
/// none: only full blocks are cached). Internal to the sim, so any fast deterministic
/// 64-bit hash does: FNV-1a over the parent hash and the ids, finished by SplitMix64.
pub fn block_hashes(ids: &[u32], block_size: u64) -> Vec<u64> {
    let bs = block_size.max(1) as usize;
    let mut out = Vec::with_capacity(ids.len() / bs);
    // the chain's root: an arbitrary fixed value (vLLM seeds it from PYTHONHASHSEED)
    let mut parent: u64 = 0x5eed_cafe_f00d_0001;
    for block in ids.chunks_exact(bs) {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in parent.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        for id in block {
            for b in id.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        parent = crate::filler::splitmix64(h);
        out.push(parent);
    }
    out
}

#[derive(Debug, Clone, Default)]
struct Block {
    ref_cnt: u32,
    hash: Option<u64>,
}

/// Pool counters and sizes, for `/debug/engine`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ApcStats {
    pub enabled: bool,
    pub num_blocks: u64,
    /// Blocks pinned by running sequences.
    pub used_blocks: u64,
    /// Blocks holding a cached (hashed) full block, pinned or not.
    pub cached_blocks: u64,
    /// Cached blocks no sequence uses (evictable).
    pub cached_free_blocks: u64,
    /// Cached blocks dropped to make room.
    pub evictions: u64,
}

/// The GPU block pool with its prefix cache.
#[derive(Debug, Clone)]
pub struct BlockPool {
    enabled: bool,
    num_blocks: u64,
    /// Blocks used at least once (created on first use: a never-used block is empty and
    /// comes before any freed one, as at the head of vLLM's initial free queue).
    blocks: Vec<Block>,
    /// Freed blocks not used since, least recently freed first (the eviction order).
    free: LruCache<BlockId, ()>,
    /// Hash of a cached full block -> the block holding it.
    cached: HashMap<u64, BlockId>,
    /// Cached blocks in the free queue (kept as blocks move, for cheap stats).
    cached_free: u64,
    evictions: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` empty blocks; `enabled`: prefix caching on.
    pub fn new(num_blocks: u64, enabled: bool) -> BlockPool {
        BlockPool {
            enabled,
            num_blocks: num_blocks.min(BlockId::MAX as u64 + 1),
            blocks: Vec::new(),
            free: LruCache::unbounded(),
            cached: HashMap::new(),
            cached_free: 0,
            evictions: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Blocks never used yet.
    fn num_fresh(&self) -> u64 {
        self.num_blocks - self.blocks.len() as u64
    }

    /// Blocks an allocation can take (empty or cached-but-unused).
    pub fn num_free(&self) -> u64 {
        self.num_fresh() + self.free.len() as u64
    }

    /// Blocks pinned by running sequences.
    pub fn num_used(&self) -> u64 {
        self.num_blocks() - self.num_free()
    }

    /// The cached blocks holding the longest run of leading `hashes`, at most
    /// `max_blocks` of them (vLLM stops at `prompt − 1` tokens: the last prompt token is
    /// always computed). Empty when caching is disabled.
    pub fn lookup(&self, hashes: &[u64], max_blocks: usize) -> Vec<BlockId> {
        if !self.enabled {
            return Vec::new();
        }
        hashes
            .iter()
            .take(max_blocks)
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// Of `hit` (blocks found by [`lookup`](Self::lookup)), how many are unpinned: taking
    /// them removes them from the free queue, so they count against an allocation.
    pub fn num_unpinned(&self, hit: &[BlockId]) -> u64 {
        hit.iter()
            .filter(|&&b| self.blocks[b as usize].ref_cnt == 0)
            .count() as u64
    }

    /// Pin `hit` blocks for one more sequence.
    pub fn touch(&mut self, hit: &[BlockId]) {
        for &b in hit {
            let blk = &mut self.blocks[b as usize];
            if blk.ref_cnt == 0 {
                self.free.pop(&b);
                if blk.hash.is_some() {
                    self.cached_free -= 1;
                }
            }
            blk.ref_cnt += 1;
        }
    }

    /// Take `n` blocks from the head of the free queue (evicting their cached contents),
    /// pinned once. None (and nothing taken) when fewer than `n` are free.
    pub fn allocate(&mut self, n: u64) -> Option<Vec<BlockId>> {
        if n > self.num_free() {
            return None;
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            if self.num_fresh() > 0 {
                out.push(self.blocks.len() as BlockId);
                self.blocks.push(Block {
                    ref_cnt: 1,
                    hash: None,
                });
                continue;
            }
            let (b, ()) = self.free.pop_lru()?;
            let blk = &mut self.blocks[b as usize];
            if let Some(h) = blk.hash.take() {
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                }
                self.cached_free -= 1;
                self.evictions += 1;
            }
            blk.ref_cnt = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Register `block` (now holding a full block whose chain hash is `hash`) in the cache.
    /// A block already cached, or a hash already cached in another block (the same prefix
    /// computed twice at once), is left as it is, as vLLM does.
    pub fn cache(&mut self, block: BlockId, hash: u64) {
        if !self.enabled || self.blocks[block as usize].hash.is_some() {
            return;
        }
        if self.cached.contains_key(&hash) {
            return;
        }
        self.blocks[block as usize].hash = Some(hash);
        self.cached.insert(hash, block);
    }

    /// Unpin a sequence's blocks. Freed in reverse order, so the tail of a prompt is
    /// evicted before its prefix.
    pub fn free(&mut self, table: &[BlockId]) {
        for &b in table.iter().rev() {
            let blk = &mut self.blocks[b as usize];
            debug_assert!(blk.ref_cnt > 0, "double free of block {b}");
            blk.ref_cnt = blk.ref_cnt.saturating_sub(1);
            if blk.ref_cnt == 0 {
                self.free.push(b, ());
                if blk.hash.is_some() {
                    self.cached_free += 1;
                }
            }
        }
    }

    pub fn stats(&self) -> ApcStats {
        ApcStats {
            enabled: self.enabled,
            num_blocks: self.num_blocks(),
            used_blocks: self.num_used(),
            cached_blocks: self.cached.len() as u64,
            cached_free_blocks: self.cached_free,
            evictions: self.evictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| i.wrapping_mul(2654435761) ^ salt)
            .collect()
    }

    #[test]
    fn hash_chain_covers_the_whole_prefix_and_only_full_blocks() {
        let a = ids(40, 0);
        let h = block_hashes(&a, 16);
        assert_eq!(
            h.len(),
            2,
            "40 tokens: 2 full blocks, the partial one has no hash"
        );
        assert_eq!(h, block_hashes(&a[..32], 16), "deterministic");
        // a change in block 0 changes every later hash; a change in block 1 only block 1
        let mut b = a.clone();
        b[3] ^= 1;
        let hb = block_hashes(&b, 16);
        assert_ne!(hb[0], h[0]);
        assert_ne!(hb[1], h[1]);
        let mut c = a.clone();
        c[20] ^= 1;
        let hc = block_hashes(&c, 16);
        assert_eq!(hc[0], h[0]);
        assert_ne!(hc[1], h[1]);
        // the same ids in block 1 after a different block 0 are a different block
        let mut d = a.clone();
        d[..16].copy_from_slice(&ids(16, 7));
        assert_ne!(block_hashes(&d, 16)[1], h[1]);
        assert!(block_hashes(&a[..15], 16).is_empty());
    }

    /// Allocate a "sequence" of `hashes` (all full) and cache its blocks, as admission does.
    fn admit(pool: &mut BlockPool, hashes: &[u64]) -> (Vec<BlockId>, usize) {
        let hit = pool.lookup(hashes, hashes.len());
        let n_hit = hit.len();
        pool.touch(&hit);
        let mut table = hit;
        table.extend(pool.allocate((hashes.len() - n_hit) as u64).unwrap());
        for (b, h) in table.iter().zip(hashes) {
            pool.cache(*b, *h);
        }
        (table, n_hit)
    }

    #[test]
    fn freed_blocks_stay_cached_and_shared_prefixes_are_ref_counted() {
        let mut pool = BlockPool::new(10, true);
        let h = block_hashes(&ids(64, 0), 16); // 4 blocks
        let (t1, hit) = admit(&mut pool, &h);
        assert_eq!(hit, 0);
        assert_eq!(pool.num_used(), 4);
        // a second request with the same prefix while the first runs: shares its blocks
        let (t2, hit) = admit(&mut pool, &h[..3]);
        assert_eq!(hit, 3);
        assert_eq!(&t2[..], &t1[..3]);
        assert_eq!(pool.num_used(), 4, "shared, not copied");
        pool.free(&t1);
        assert_eq!(pool.num_used(), 3, "still pinned by the second request");
        pool.free(&t2);
        assert_eq!(pool.num_used(), 0);
        let s = pool.stats();
        assert_eq!((s.cached_blocks, s.cached_free_blocks), (4, 4));
        // freed but cached: a repeat hits all of it
        assert_eq!(pool.lookup(&h, 4), t1);
        // the cap (prompt − 1 tokens) is the caller's max_blocks
        assert_eq!(pool.lookup(&h, 3).len(), 3);
        // only leading blocks count: a different first block hits nothing
        let other = block_hashes(&ids(64, 9), 16);
        assert!(pool.lookup(&other, 4).is_empty());
        // touching unpinned hit blocks takes them out of the free queue
        assert_eq!(pool.num_unpinned(&t1), 4);
        pool.touch(&t1[..2]);
        assert_eq!(pool.num_free(), 8);
        assert_eq!(pool.num_unpinned(&t1), 2);
    }

    #[test]
    fn lru_eviction_under_pressure() {
        let mut pool = BlockPool::new(6, true);
        let a = block_hashes(&ids(48, 1), 16); // 3 blocks
        let b = block_hashes(&ids(48, 2), 16);
        let c = block_hashes(&ids(48, 3), 16);
        let (ta, _) = admit(&mut pool, &a);
        pool.free(&ta);
        let (tb, _) = admit(&mut pool, &b);
        pool.free(&tb);
        // 6 blocks hold a and b; c needs 3: a (freed first) goes, tail block first
        let (tc, hit) = admit(&mut pool, &c);
        assert_eq!(hit, 0);
        assert!(pool.lookup(&a, 3).is_empty(), "a evicted");
        assert_eq!(pool.lookup(&b, 3).len(), 3, "b kept");
        assert_eq!(pool.stats().evictions, 3);
        pool.free(&tc);
        // a hit refreshes b: b is touched and freed again, so c is now the oldest
        let (tb2, hit) = admit(&mut pool, &b);
        assert_eq!(hit, 3);
        pool.free(&tb2);
        let one = block_hashes(&ids(16, 4), 16);
        let (t, _) = admit(&mut pool, &one);
        // c's tail block went first (freed in reverse order): its first two remain
        assert_eq!(pool.lookup(&c, 3).len(), 2);
        assert_eq!(pool.lookup(&b, 3).len(), 3);
        // pinned blocks are never evicted: nothing left for 6 more
        assert!(pool.allocate(6).is_none());
        assert_eq!(pool.num_used(), 1);
        pool.free(&t);
    }

    #[test]
    fn partial_last_block_is_not_cached() {
        let mut pool = BlockPool::new(8, true);
        let p = ids(40, 5); // 2 full blocks + 8 tokens
        let h = block_hashes(&p, 16);
        let table = pool.allocate(3).unwrap();
        for (b, hh) in table.iter().zip(&h) {
            pool.cache(*b, *hh);
        }
        pool.free(&table);
        assert_eq!(pool.stats().cached_blocks, 2);
        // the same 40 tokens again: at most the 2 full blocks (32 tokens) hit
        assert_eq!(pool.lookup(&h, usize::MAX).len(), 2);
    }

    #[test]
    fn disabled_pool_never_hits() {
        let mut pool = BlockPool::new(8, false);
        let h = block_hashes(&ids(64, 0), 16);
        let (t, hit) = admit(&mut pool, &h);
        assert_eq!(hit, 0);
        pool.free(&t);
        assert!(pool.lookup(&h, 4).is_empty());
        let s = pool.stats();
        assert_eq!((s.enabled, s.cached_blocks, s.used_blocks), (false, 0, 0));
    }

    #[test]
    fn a_hash_computed_twice_is_cached_once() {
        let mut pool = BlockPool::new(4, true);
        let h = block_hashes(&ids(16, 0), 16);
        let x = pool.allocate(1).unwrap();
        let y = pool.allocate(1).unwrap();
        pool.cache(x[0], h[0]);
        pool.cache(y[0], h[0]);
        assert_eq!(pool.lookup(&h, 1), x);
        pool.free(&x);
        pool.free(&y);
        // evicting the duplicate (y, freed last, is newer) leaves x findable
        assert_eq!(pool.stats().cached_blocks, 1);
    }
}
