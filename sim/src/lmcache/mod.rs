//! LMCache in the sim: prefix hits from, and chunk writes to, a local CPU tier
//! ([`crate::cpu_tier`], `--lmcache-local-cpu-size`) and a remote KV store in LMCache's
//! Redis layout (`--kv-store`).
//!
//! Per request, as vLLM + LMCache (`LMCacheConnectorV1`, local CPU backend plus a
//! `redis://` remote backend) do:
//!
//! 1. the prompt's token ids are cut into `--chunk-size` chunks and each chunk gets its
//!    LMCache key ([`cacheroute_lmcache::keys::chunk_keys`], scheme `--lmcache-scheme`, model
//!    `--lmcache-model`, seed `--hash-seed`, dtype `--kv-dtype`, rank(s) of
//!    `--world-size`);
//! 2. the longest run of leading chunks present in the CPU tier or, failing that, in the
//!    remote store (both `<key>metadata` and `<key>kv_bytes`, for every simulated rank, in
//!    one pipelined round trip: a half-evicted chunk is a miss) is a hit: cached tokens =
//!    end of the last hit chunk, except that a hit covering the whole prompt is cut to
//!    `prompt - 1` tokens (vLLM's LMCache connector recomputes the last token: `if
//!    num_external_hit_tokens == request.num_tokens: num_external_hit_tokens -= 1`). The
//!    engine combines it with the GPU prefix cache at admission;
//! 3. once the request's prefill is done, remote chunks it loaded are promoted to the CPU
//!    tier, and every chunk after the hit is kept in the CPU tier and written to the
//!    store: `<key>kv_bytes` (a deterministic blob of `real size / --kv-scale-down` bytes,
//!    at least 1), then `<key>metadata` (LMCache's 28-byte header with the **real** length
//!    and shape `[2, layers, tokens, kv_heads_per_rank × head_dim]`).
//!
//! Store trouble never fails a request: a lookup that errs or takes longer than
//! `--kv-store-timeout-ms` is a remote miss, a failed write is dropped; both are logged
//! and counted in `sim_kv_store_errors_total`. A store that cannot be reached at start-up
//! is retried in the background (at most once a second) while requests miss it.
//!
//! This module holds [`LmCache`] (lookup, save, CPU-tier keeping) and its lookup types;
//! `config` holds the configuration from the flags, `remote` the lazily reopened
//! remote store.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use cacheroute_lmcache::keys::{chunk_keys, chunk_keys_all_ranks, KeyError};
use cacheroute_lmcache::store::{Chunk, StoreError};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::cpu_tier::{CpuTier, CpuTierStats};
use crate::engine::{ExternalHit, Tier};
use crate::metrics::SimMetrics;

mod config;
mod remote;

pub use config::{
    HeaderError, LmCacheConfig, DEFAULT_KV_SCALE_DOWN, DEFAULT_LOCAL_CPU_GB, DEFAULT_STORE_GBPS,
    DEFAULT_STORE_TIMEOUT_MS,
};
pub use remote::RemoteError;
use remote::StoreSlot;

/// Chunks (keys) per store write pipeline.
const WRITE_BATCH_KEYS: usize = 8;

/// One chunk of a prompt: its token span and its key on every simulated rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkEntry {
    pub start: usize,
    pub end: usize,
    /// One key per simulated rank (the order of [`LmCacheConfig::ranks`]).
    pub keys: Vec<String>,
}

/// Why writing a lookup's chunks to the store failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("the store is not reachable")]
    Unreachable,
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a lookup found for one prompt (and what its save will write).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lookup {
    pub prompt_tokens: u64,
    /// Prompt tokens whose KV is loaded instead of computed.
    pub cached_tokens: u64,
    /// Leading chunks present (CPU tier or remote store, on every simulated rank).
    pub hit_chunks: usize,
    /// Where each of the `hit_chunks` leading chunks comes from.
    pub tiers: Vec<Tier>,
    /// Every keyed chunk of the prompt.
    pub chunks: Vec<ChunkEntry>,
    /// Whether the remote store could not answer (its chunks count as misses).
    pub failed: bool,
}

impl Lookup {
    /// The hit as the engine takes it: chunk ends (the last capped at `cached_tokens`)
    /// and tiers.
    pub fn external(&self, keys_per_chunk: u64) -> ExternalHit {
        ExternalHit {
            chunks: self
                .chunks
                .iter()
                .zip(&self.tiers)
                .map(|(c, t)| ((c.end as u64).min(self.cached_tokens), *t))
                .collect(),
            keys_per_chunk,
        }
    }
}

/// The sim's LMCache: lookups and writes against the `--kv-store`.
pub struct LmCache {
    cfg: LmCacheConfig,
    slot: Arc<StoreSlot>,
    cpu: Mutex<CpuTier>,
    metrics: Arc<SimMetrics>,
}

impl std::fmt::Debug for LmCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmCache").field("cfg", &self.cfg).finish()
    }
}

impl LmCache {
    /// Open the store. A store that does not answer yet (e.g. Redis not up) is not an
    /// error: it is retried in the background and lookups miss meanwhile.
    pub async fn open(cfg: LmCacheConfig, metrics: Arc<SimMetrics>) -> LmCache {
        let slot = Arc::new(StoreSlot {
            url: cfg.store_url.clone(),
            store: RwLock::new(None),
            connecting: AtomicBool::new(false),
            last_attempt: Mutex::new(Some(Instant::now())),
            timeout: cfg.timeout,
        });
        if let Err(e) = slot.open().await {
            tracing::warn!(
                url = %cfg.store_url,
                "LMCache store unreachable, serving without hits until it answers: {e}"
            );
            metrics.kv_store_errors.inc();
        }
        LmCache {
            cpu: Mutex::new(CpuTier::new(cfg.local_cpu_bytes)),
            cfg,
            slot,
            metrics,
        }
    }

    fn cpu(&self) -> std::sync::MutexGuard<'_, CpuTier> {
        self.cpu.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The CPU tier's sizes and counters.
    pub fn cpu_stats(&self) -> CpuTierStats {
        self.cpu().stats()
    }

    pub fn config(&self) -> &LmCacheConfig {
        &self.cfg
    }

    /// Whether the store is open (it may still fail operations).
    pub fn is_connected(&self) -> bool {
        self.slot.current().is_some()
    }

    /// `/debug/engine` view.
    pub fn describe(&self) -> Value {
        let p = &self.cfg.params;
        json!({
            "store": self.cfg.store_url,
            "connected": self.is_connected(),
            "scheme": p.scheme.name(),
            "model": p.model,
            "chunk_size": p.chunk_size,
            "hash_seed": p.hash_seed,
            "dtype": self.cfg.dtype,
            "world_size": p.world_size,
            "ranks": self.cfg.ranks,
            "save_unfull_chunk": p.save_unfull_chunk,
            "kv_scale_down": self.cfg.scale_down,
            "metadata_shape": [2, self.cfg.num_layers, p.chunk_size, self.cfg.hidden_per_rank],
            "chunk_bytes": self.cfg.chunk_bytes(p.chunk_size),
            "kv_store_gbps": self.cfg.store_gbps,
            "local_cpu": self.cpu_stats(),
        })
    }

    /// The chunks of `ids` with their keys on every simulated rank.
    pub fn chunks(&self, ids: &[u32]) -> Result<Vec<ChunkEntry>, KeyError> {
        let p = &self.cfg.params;
        if self.cfg.ranks.len() == 1 {
            return Ok(chunk_keys(p, ids)?
                .into_iter()
                .map(|k| ChunkEntry {
                    start: k.start,
                    end: k.end,
                    keys: vec![k.key],
                })
                .collect());
        }
        let mut all = chunk_keys_all_ranks(p, ids)?;
        let n = all.first().map_or(0, Vec::len);
        let mut out: Vec<ChunkEntry> = (0..n)
            .map(|i| ChunkEntry {
                start: all[0][i].start,
                end: all[0][i].end,
                keys: Vec::with_capacity(self.cfg.ranks.len()),
            })
            .collect();
        for &r in &self.cfg.ranks {
            for (entry, k) in out.iter_mut().zip(std::mem::take(&mut all[r as usize])) {
                entry.keys.push(k.key);
            }
        }
        Ok(out)
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) {
        tracing::warn!(url = %self.cfg.store_url, "LMCache {what} failed: {e}");
        self.metrics.kv_store_errors.inc();
    }

    /// Look `ids` up: the longest run of leading chunks present in the CPU tier or the
    /// remote store (both halves, on every simulated rank). CPU hits become the most
    /// recently used. Never fails: store trouble is a remote miss (logged, counted).
    pub async fn query(&self, ids: &[u32]) -> Lookup {
        let prompt_tokens = ids.len() as u64;
        let mut out = Lookup {
            prompt_tokens,
            ..Lookup::default()
        };
        out.chunks = match self.chunks(ids) {
            Ok(c) => c,
            Err(e) => {
                // validated at start-up: cannot happen
                tracing::error!("LMCache keys: {e}");
                return out;
            }
        };
        if out.chunks.is_empty() {
            return out;
        }
        let in_cpu: Vec<bool> = {
            let cpu = self.cpu();
            out.chunks
                .iter()
                .map(|c| cpu.contains(&c.keys[0]))
                .collect()
        };
        // the remote store is asked about every chunk from the first CPU miss on
        let first_miss = in_cpu.iter().position(|c| !c).unwrap_or(in_cpu.len());
        let mut in_remote = vec![false; out.chunks.len()];
        if first_miss < out.chunks.len() {
            match self.remote_presence(&out.chunks[first_miss..]).await {
                Ok(found) => in_remote[first_miss..].copy_from_slice(&found),
                Err(e) => {
                    self.fail("lookup", e);
                    out.failed = true;
                }
            }
        }
        for (c, r) in in_cpu.iter().zip(&in_remote) {
            match (c, r) {
                (true, _) => out.tiers.push(Tier::Cpu),
                (false, true) => out.tiers.push(Tier::Remote),
                (false, false) => break,
            }
        }
        out.hit_chunks = out.tiers.len();
        if out.hit_chunks > 0 {
            let mut cpu = self.cpu();
            for (c, t) in out.chunks.iter().zip(&out.tiers) {
                if *t == Tier::Cpu {
                    cpu.touch(&c.keys[0]);
                }
            }
            let end = out.chunks[out.hit_chunks - 1].end as u64;
            // vLLM computes at least the last prompt token
            out.cached_tokens = end.min(prompt_tokens.saturating_sub(1));
        }
        out
    }

    /// Per chunk: present in the remote store on every simulated rank.
    async fn remote_presence(&self, chunks: &[ChunkEntry]) -> Result<Vec<bool>, RemoteError> {
        let Some(store) = self.slot.get() else {
            return Err(RemoteError::Unreachable);
        };
        let flat: Vec<String> = chunks.iter().flat_map(|c| c.keys.clone()).collect();
        let ranks = self.cfg.ranks.len();
        match tokio::time::timeout(self.cfg.timeout, store.chunks_present(&flat)).await {
            Ok(Ok(found)) => Ok(found.chunks(ranks).map(|r| r.iter().all(|p| *p)).collect()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(RemoteError::Timeout(self.cfg.timeout)),
        }
    }

    /// Deterministic `kv_bytes` stand-in: SHA-256 of the key, repeated.
    fn blob(key: &str, len: usize) -> Bytes {
        let d = Sha256::digest(key.as_bytes());
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&d[..len.min(d.len())]);
        // doubling copies: a few memcpy calls even for a full-size (scale 1) chunk
        while v.len() < len {
            let n = v.len().min(len - v.len());
            v.extend_from_within(..n);
        }
        Bytes::from(v)
    }

    /// The chunk values written for one rank's chunk of `tokens` tokens under `key`.
    pub fn chunk_value(&self, key: &str, tokens: usize) -> Result<Chunk, HeaderError> {
        let meta = self.cfg.metadata(tokens)?;
        let real = meta.length.max(0) as u64;
        Ok(Chunk {
            kv_bytes: Self::blob(key, self.cfg.blob_len(real)),
            metadata: Bytes::copy_from_slice(&meta.to_bytes()),
        })
    }

    /// Write the chunks of `lookup` after its hit (`kv_bytes` then `metadata`, chunk by
    /// chunk in prompt order). Returns the keys written.
    pub async fn save(&self, lookup: &Lookup) -> Result<usize, SaveError> {
        let todo: Vec<(&str, usize)> = lookup
            .chunks
            .iter()
            .skip(lookup.hit_chunks)
            .flat_map(|c| c.keys.iter().map(move |k| (k.as_str(), c.end - c.start)))
            .collect();
        if todo.is_empty() {
            return Ok(0);
        }
        let Some(store) = self.slot.get() else {
            return Err(SaveError::Unreachable);
        };
        let mut written = 0;
        for batch in todo.chunks(WRITE_BATCH_KEYS) {
            let values = batch
                .iter()
                .map(|(k, tokens)| self.chunk_value(k, *tokens).map(|c| (k.to_string(), c)))
                .collect::<Result<Vec<_>, _>>()?;
            store.put_chunks(&values).await?;
            written += values.len();
            self.metrics
                .lmcache_chunks_stored
                .inc_by(values.len() as u64);
            self.metrics
                .lmcache_stored_bytes
                .inc_by(values.iter().map(|(_, c)| c.size()).sum());
        }
        Ok(written)
    }

    /// The CPU tier's side of a prefill: remote chunks loaded beyond the GPU hit
    /// (`gpu_tokens`) are promoted, and, when `store` (not `lmcache.skip_save`), the chunks
    /// after the hit are kept. Returns how many chunks were inserted.
    pub fn keep_in_cpu(&self, lookup: &Lookup, gpu_tokens: u64, store: bool) -> usize {
        let mut cpu = self.cpu();
        if !cpu.enabled() {
            return 0;
        }
        let mut n = 0;
        for (i, c) in lookup.chunks.iter().enumerate() {
            let promote = i < lookup.hit_chunks
                && lookup.tiers[i] == Tier::Remote
                && c.end as u64 > gpu_tokens;
            let new = i >= lookup.hit_chunks && store;
            if promote || new {
                cpu.insert(&c.keys[0], self.cfg.chunk_bytes(c.end - c.start));
                n += 1;
            }
        }
        n
    }

    /// After a request's prefill (its first token sampled; `gpu_tokens` of its prompt came
    /// from the GPU prefix cache): update the CPU tier, then, when `store`, write the new
    /// chunks to the remote store in a task of its own (the engine never waits for it) and
    /// wait for that task at most `--kv-store-timeout-ms`, so that a response normally
    /// leaves after its chunks are visible, as with LMCache's synchronous save at the end
    /// of the forward pass. Failures are logged and counted.
    pub async fn after_prefill(self: &Arc<Self>, lookup: Lookup, gpu_tokens: u64, store: bool) {
        self.keep_in_cpu(&lookup, gpu_tokens, store);
        if !store || lookup.hit_chunks >= lookup.chunks.len() {
            return;
        }
        let me = self.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = me.save(&lookup).await {
                me.fail("store", e);
            }
        });
        if tokio::time::timeout(self.cfg.timeout, task).await.is_err() {
            tracing::warn!(
                url = %self.cfg.store_url,
                "LMCache store still writing after {:?}; answering without waiting",
                self.cfg.timeout
            );
        }
    }
}

/// As a plain [`PrefixCache`](crate::PrefixCache): lookups only (nothing is written).
#[async_trait::async_trait]
impl crate::PrefixCache for LmCache {
    async fn lookup(&self, _model: &str, token_ids: &[u32]) -> u64 {
        self.query(token_ids).await.cached_tokens
    }
}

#[cfg(test)]
mod tests {
    use cacheroute_decisions::cost_model::ModelConfig;
    use cacheroute_lmcache::keys::{KeyScheme, RemoteMetadata};

    use super::*;
    use crate::SimArgs;
    use cacheroute_lmcache::keys::{redis_kv_bytes_key, redis_metadata_key};
    use cacheroute_lmcache::store::named_memory_store;

    fn model() -> ModelConfig {
        ModelConfig {
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            vocab_size: 128256,
        }
    }

    fn args(store: &str) -> SimArgs {
        SimArgs {
            kv_store: Some(store.into()),
            chunk_size: 4,
            ..SimArgs::default()
        }
    }

    async fn open_lm(a: &SimArgs) -> (Arc<LmCache>, Arc<SimMetrics>) {
        let metrics = Arc::new(SimMetrics::new("m").unwrap());
        let cfg = LmCacheConfig::from_args(a, &model(), 131072)
            .unwrap()
            .unwrap();
        (Arc::new(LmCache::open(cfg, metrics.clone()).await), metrics)
    }

    #[test]
    fn config_from_args() {
        assert_eq!(
            LmCacheConfig::from_args(&SimArgs::default(), &model(), 131072).unwrap(),
            None
        );
        let c = LmCacheConfig::from_args(&args("memory://x"), &model(), 131072)
            .unwrap()
            .unwrap();
        assert_eq!(c.params.model, "llama3-8b");
        assert_eq!(c.params.scheme, KeyScheme::Lmcache0_3_13);
        assert_eq!(c.ranks, vec![0]);
        assert_eq!((c.num_layers, c.hidden_per_rank), (32, 1024));
        let m = c.metadata(256).unwrap();
        assert_eq!(m.length, 33_554_432); // 256 × 131072
        assert_eq!(m.shape, [2, 32, 256, 1024]);
        assert_eq!(c.blob_len(33_554_432), 32_768);
        assert_eq!(c.blob_len(100), 1);

        let mut a = args("memory://x");
        a.world_size = 2;
        let c = LmCacheConfig::from_args(&a, &model(), 131072)
            .unwrap()
            .unwrap();
        assert_eq!(c.ranks, vec![0, 1]);
        assert_eq!(c.hidden_per_rank, 512);

        for (f, want) in [
            (
                (|a: &mut SimArgs| a.lmcache_scheme = "lmcache-0.3.12".into()) as fn(&mut SimArgs),
                "--lmcache-scheme",
            ),
            (|a| a.hash_seed = "random".into(), "PYTHONHASHSEED"),
            (|a| a.worker_id = Some(1), "--worker-id 1"),
            (|a| a.kv_scale_down = 0, "--kv-scale-down"),
            (|a| a.chunk_size = 0, "--chunk-size"),
            (|a| a.kv_dtype = "bogus".into(), "bogus"),
            (|a| a.kv_dtype = "int64".into(), "int64"),
            (|a| a.lmcache_model = Some("a@b".into()), "'@'"),
            (
                |a| a.kv_store = Some("s3://bucket".into()),
                "unsupported store URL",
            ),
            (|a| a.kv_store = Some("memory://".into()), "needs a name"),
            (
                |a| a.kv_store = Some("redis://h:1/notadb".into()),
                "--kv-store",
            ),
        ] {
            let mut a = args("memory://x");
            f(&mut a);
            let e = LmCacheConfig::from_args(&a, &model(), 131072).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{want}: {e:#}");
        }
    }

    #[tokio::test]
    async fn lookup_then_save_then_hit() {
        let (lm, metrics) = open_lm(&args("memory://lmcache-unit-1")).await;
        let ids: Vec<u32> = (0..10).collect();
        let miss = lm.query(&ids).await;
        assert_eq!((miss.hit_chunks, miss.cached_tokens), (0, 0));
        assert_eq!(miss.chunks.len(), 2); // 10 tokens, chunk 4, no partial chunk
        assert_eq!(lm.save(&miss).await.unwrap(), 2);
        let hit = lm.query(&ids).await;
        assert_eq!((hit.hit_chunks, hit.cached_tokens), (2, 8));
        assert_eq!(lm.save(&hit).await.unwrap(), 0);
        // a whole-prompt hit leaves the last token to compute
        let hit = lm.query(&ids[..8]).await;
        assert_eq!((hit.hit_chunks, hit.cached_tokens), (2, 7));
        // the entries: blob then LMCache header with the real shape
        let store = named_memory_store("lmcache-unit-1");
        let key = &miss.chunks[0].keys[0];
        let meta = RemoteMetadata::from_bytes(
            &store
                .raw_get(&cacheroute_lmcache::keys::redis_metadata_key(key))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(meta.shape, [2, 32, 4, 1024]);
        assert_eq!(meta.length, 4 * 131072);
        let blob = store
            .raw_get(&cacheroute_lmcache::keys::redis_kv_bytes_key(key))
            .unwrap();
        assert_eq!(blob.len(), 4 * 131072 / 1024);
        let d = Sha256::digest(key.as_bytes());
        assert!(blob.chunks(32).all(|c| c == &d[..c.len()]));
        assert_eq!(LmCache::blob(key, 5), &d[..5]);
        assert_eq!(LmCache::blob(key, 100).len(), 100);
        let text = metrics.render();
        assert!(text.contains("sim_lmcache_chunks_stored_total{model_name=\"m\"} 2"));
        // hits are counted when the engine admits the request, not by lookups
        assert!(text.contains("vllm:external_prefix_cache_queries_total{model_name=\"m\"} 0"));
    }

    #[tokio::test]
    async fn all_ranks_must_hold_a_chunk() {
        let mut a = args("memory://lmcache-unit-2");
        a.world_size = 2;
        let (lm, _) = open_lm(&a).await;
        let ids: Vec<u32> = (0..9).collect();
        let miss = lm.query(&ids).await;
        assert_eq!(miss.chunks[0].keys.len(), 2);
        assert!(miss.chunks[0].keys[1].contains("@2@1@"));
        assert_eq!(lm.save(&miss).await.unwrap(), 4);
        assert_eq!(lm.query(&ids).await.cached_tokens, 8);
        // rank 1 loses chunk 1: only chunk 0 is usable
        let store = named_memory_store("lmcache-unit-2");
        store.raw_delete(&cacheroute_lmcache::keys::redis_metadata_key(
            &miss.chunks[1].keys[1],
        ));
        assert_eq!(lm.query(&ids).await.cached_tokens, 4);
        // a sim simulating rank 0 only does not care
        a.worker_id = Some(0);
        let (rank0, _) = open_lm(&a).await;
        assert_eq!(rank0.query(&ids).await.cached_tokens, 8);
    }

    #[tokio::test]
    async fn unreachable_store_misses_and_counts() {
        let (lm, metrics) = open_lm(&args("redis://127.0.0.1:1")).await;
        assert!(!lm.is_connected());
        let ids: Vec<u32> = (0..10).collect();
        let l = lm.query(&ids).await;
        assert!(l.failed);
        assert_eq!(l.cached_tokens, 0);
        assert!(lm.save(&l).await.is_err());
        lm.after_prefill(l, 0, true).await;
        let text = metrics.render();
        // start-up, lookup, store
        assert!(
            text.contains("sim_kv_store_errors_total{model_name=\"m\"} 3"),
            "{text}"
        );
        // the CPU tier kept the chunks: they hit with the store down, without asking it
        let l = lm.query(&ids).await;
        assert_eq!((l.cached_tokens, l.failed), (8, false));
        assert_eq!(l.tiers, vec![Tier::Cpu, Tier::Cpu]);
        assert!(metrics
            .render()
            .contains("sim_kv_store_errors_total{model_name=\"m\"} 3"));
    }

    /// A sim LMCache whose CPU tier holds `chunks` 4-token chunks (8B: 512 KiB each).
    async fn open_with_cpu_chunks(store: &str, chunks: u64) -> Arc<LmCache> {
        let mut a = args(store);
        a.lmcache_local_cpu_size = (chunks * 4 * 131072) as f64 / crate::cpu_tier::GIB;
        let (lm, _) = open_lm(&a).await;
        assert_eq!(lm.config().chunk_bytes(4), 4 * 131072);
        assert_eq!(lm.cpu_stats().capacity_bytes, chunks * 4 * 131072);
        lm
    }

    #[tokio::test]
    async fn cpu_tier_first_then_remote_with_promotion() {
        let name = "lmcache-unit-tiers";
        let lm = open_with_cpu_chunks(&format!("memory://{name}"), 2).await;
        let ids: Vec<u32> = (0..17).collect(); // 4 chunks and a token
        let miss = lm.query(&ids).await;
        assert_eq!(miss.hit_chunks, 0);
        // stored everywhere; the 2-chunk CPU tier keeps the last two
        lm.after_prefill(miss, 0, true).await;
        let s = lm.cpu_stats();
        assert_eq!((s.chunks, s.inserts, s.evictions), (2, 4, 2));
        let hit = lm.query(&ids).await;
        assert_eq!(
            hit.tiers,
            vec![Tier::Remote, Tier::Remote, Tier::Cpu, Tier::Cpu]
        );
        assert_eq!(hit.cached_tokens, 16);
        let ext = hit.external(1);
        assert_eq!(
            ext.chunks,
            vec![
                (4, Tier::Remote),
                (8, Tier::Remote),
                (12, Tier::Cpu),
                (16, Tier::Cpu)
            ]
        );
        // the engine's split of that hit, with no, a chunk-aligned and a partial GPU hit
        use crate::engine::CachedSplit;
        let split = |gpu| CachedSplit::of(gpu, Some(&ext), 16.max(gpu));
        assert_eq!(
            split(0),
            (
                CachedSplit {
                    gpu: 0,
                    cpu: 8,
                    remote: 8
                },
                4
            )
        );
        assert_eq!(
            split(8),
            (
                CachedSplit {
                    gpu: 8,
                    cpu: 8,
                    remote: 0
                },
                2
            )
        );
        assert_eq!(
            split(6),
            (
                CachedSplit {
                    gpu: 6,
                    cpu: 8,
                    remote: 2
                },
                3
            )
        );
        // the GPU longer than LMCache: all from the GPU
        assert_eq!(split(20).0.total(), 20);
        assert_eq!(split(20).0.gpu, 20);
        // loading the two remote chunks promotes them (evicting the other two)
        assert_eq!(lm.keep_in_cpu(&hit, 0, false), 2);
        let hit = lm.query(&ids).await;
        assert_eq!(
            hit.tiers,
            vec![Tier::Cpu, Tier::Cpu, Tier::Remote, Tier::Remote]
        );
        // remote chunks the GPU already covered are not loaded, so not promoted
        assert_eq!(lm.keep_in_cpu(&hit, 16, false), 0);
        // a chunk half gone from the remote store (kv_bytes evicted) ends the hit there
        let store = named_memory_store(name);
        assert!(store.raw_delete(&redis_kv_bytes_key(&hit.chunks[2].keys[0])));
        let l = lm.query(&ids).await;
        assert_eq!((l.hit_chunks, l.cached_tokens, l.failed), (2, 8, false));
        // and a chunk present only in the CPU tier continues a chain
        assert!(store.raw_delete(&redis_metadata_key(&hit.chunks[0].keys[0])));
        assert_eq!(lm.query(&ids).await.cached_tokens, 8);
    }

    #[tokio::test]
    async fn half_evicted_remote_chunks_are_misses() {
        let mut a = args("memory://lmcache-unit-half");
        a.lmcache_local_cpu_size = 0.0;
        let (lm, metrics) = open_lm(&a).await;
        let ids: Vec<u32> = (0..12).collect();
        let l = lm.query(&ids).await;
        lm.after_prefill(l, 0, true).await;
        assert_eq!(lm.cpu_stats().chunks, 0, "no CPU tier");
        assert_eq!(lm.query(&ids).await.cached_tokens, 11);
        let store = named_memory_store("lmcache-unit-half");
        let chunks = lm.chunks(&ids).unwrap();
        // metadata evicted from chunk 2, kv_bytes from chunk 1
        store.raw_delete(&redis_metadata_key(&chunks[2].keys[0]));
        assert_eq!(lm.query(&ids).await.cached_tokens, 8);
        store.raw_delete(&redis_kv_bytes_key(&chunks[1].keys[0]));
        let l = lm.query(&ids).await;
        assert_eq!((l.cached_tokens, l.failed), (4, false));
        assert!(metrics
            .render()
            .contains("sim_kv_store_errors_total{model_name=\"m\"} 0"));
    }
}
