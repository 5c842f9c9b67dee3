//! [`LmCacheConfig`]: what `--kv-store` and the LMCache flags configure (key
//! parameters, ranks, chunk size, blob scaling, timeouts, CPU tier size), checked at
//! start-up, and the chunk sizes and headers derived from it.

use std::time::Duration;

use anyhow::{anyhow, Context};
use cacheroute_decisions::cost_model::ModelConfig;
use cacheroute_lmcache::keys::{
    check_hash_seed, chunk_keys, lmcache_dtype_name, KeyError, KeyParams, KeyScheme, RemoteMetadata,
};
use cacheroute_lmcache::store::check_store_url;

use crate::cpu_tier::CpuTier;
use crate::SimArgs;

/// A chunk's `<key>metadata` header cannot be built: a dtype without an LMCache code, or a
/// length past LMCache's int32.
#[derive(Debug, thiserror::Error)]
#[error("LMCache metadata header: {0}")]
pub struct HeaderError(#[from] pub KeyError);

/// Default `--kv-scale-down`: a stored `kv_bytes` blob is 1/1024 of the real KV size
/// (an 8B 256-token chunk: 32 KiB instead of 32 MiB).
pub const DEFAULT_KV_SCALE_DOWN: u64 = 1024;

/// Default `--kv-store-timeout-ms`.
pub const DEFAULT_STORE_TIMEOUT_MS: u64 = 2000;

/// Default `--lmcache-local-cpu-size` (GB), LMCache's `max_local_cpu_size` default.
pub const DEFAULT_LOCAL_CPU_GB: f64 = 5.0;

/// Default `--kv-store-gbps`: the link to the remote store, in Gbit/s.
pub const DEFAULT_STORE_GBPS: f64 = 25.0;

/// Everything `--kv-store` and the LMCache flags configure.
#[derive(Debug, Clone, PartialEq)]
pub struct LmCacheConfig {
    /// `redis://host:port[/db]` or `memory://NAME`.
    pub store_url: String,
    /// Key parameters (`worker_id` is the simulated rank when `ranks` has one element).
    pub params: KeyParams,
    /// Ranks whose keys are looked up and written: `--worker-id` alone, or every rank of
    /// `--world-size` (LMCache's scheduler needs a chunk on all ranks).
    pub ranks: Vec<u32>,
    /// Stored blob = real KV bytes / this (at least 1 byte).
    pub scale_down: u64,
    /// Layers in the metadata shape.
    pub num_layers: usize,
    /// `kv_heads_per_rank × head_dim`, the last dimension of the metadata shape.
    pub hidden_per_rank: usize,
    /// The key dtype name (LMCache's spelling).
    pub dtype: &'static str,
    /// Bound on a lookup, and on how long a response waits for its writes.
    pub timeout: Duration,
    /// CPU tier capacity in real bytes (`--lmcache-local-cpu-size` GB per simulated rank,
    /// as each rank's LMCache has its own; 0: no CPU tier).
    pub local_cpu_bytes: u64,
    /// `--kv-store-gbps` (shown in `/debug/engine`; the engine charges the link).
    pub store_gbps: f64,
}

impl LmCacheConfig {
    /// The LMCache configuration of `args` (None without `--kv-store`), validated.
    /// `model` and `kv_bytes_per_token` come from the calibration profile.
    pub fn from_args(
        args: &SimArgs,
        model: &ModelConfig,
        kv_bytes_per_token: u64,
    ) -> anyhow::Result<Option<Self>> {
        let Some(url) = args.kv_store.clone() else {
            return Ok(None);
        };
        // parse only; connecting happens later (and may be retried)
        check_store_url(&url).map_err(|e| anyhow!("--kv-store {url}: {e}"))?;
        let scheme: KeyScheme = args
            .lmcache_scheme
            .parse()
            .map_err(|e| anyhow!("--lmcache-scheme: {e}"))?;
        check_hash_seed(&args.hash_seed).map_err(|e| anyhow!("--hash-seed: {e}"))?;
        anyhow::ensure!(args.chunk_size > 0, "--chunk-size must be at least 1");
        anyhow::ensure!(args.world_size > 0, "--world-size must be at least 1");
        anyhow::ensure!(args.kv_scale_down > 0, "--kv-scale-down must be at least 1");
        anyhow::ensure!(
            args.kv_store_timeout_ms > 0,
            "--kv-store-timeout-ms must be at least 1"
        );
        anyhow::ensure!(
            args.lmcache_local_cpu_size.is_finite() && args.lmcache_local_cpu_size >= 0.0,
            "--lmcache-local-cpu-size must be a number of GB, at least 0 (0: no CPU tier), got {}",
            args.lmcache_local_cpu_size
        );
        anyhow::ensure!(
            !args.kv_store_gbps.is_nan(),
            "--kv-store-gbps must be a number (Gbit/s; 0 or less: a free link)"
        );
        if let Some(w) = args.worker_id {
            anyhow::ensure!(
                w < args.world_size,
                "--worker-id {w} is not a rank of --world-size {}",
                args.world_size
            );
        }
        let params = KeyParams {
            world_size: args.world_size,
            worker_id: args.worker_id.unwrap_or(0),
            chunk_size: args.chunk_size,
            dtype: args.kv_dtype.clone(),
            hash_seed: Some(args.hash_seed.clone()),
            save_unfull_chunk: args.save_unfull_chunk,
            ..KeyParams::new(
                scheme,
                args.lmcache_model
                    .clone()
                    .unwrap_or_else(|| args.model.clone()),
            )
        };
        // every remaining key problem (model with '@', dtype, ...) shows up here
        chunk_keys(&params, &[]).map_err(|e| anyhow!("LMCache keys: {e}"))?;
        let dtype =
            lmcache_dtype_name(scheme, &args.kv_dtype).map_err(|e| anyhow!("--kv-dtype: {e}"))?;
        let itemsize = cacheroute_lmcache::keys::dtype_itemsize(dtype).unwrap_or(2) as u64;
        let ws = args.world_size as u64;
        let (num_layers, hidden_per_rank) =
            if model.num_hidden_layers > 0 && model.num_key_value_heads > 0 {
                (
                    model.num_hidden_layers,
                    model.num_key_value_heads.div_ceil(ws).max(1) * model.head_dim(),
                )
            } else {
                // no shape in the profile: one "layer" holding the recorded per-token size
                (1, (kv_bytes_per_token / (2 * itemsize) / ws).max(1))
            };
        let ranks: Vec<u32> = match args.worker_id {
            Some(w) => vec![w],
            None => (0..args.world_size).collect(),
        };
        let cfg = LmCacheConfig {
            store_url: url,
            local_cpu_bytes: CpuTier::capacity_of_gb(args.lmcache_local_cpu_size)
                .saturating_mul(ranks.len() as u64),
            store_gbps: args.kv_store_gbps,
            ranks,
            params,
            scale_down: args.kv_scale_down,
            num_layers: num_layers as usize,
            hidden_per_rank: hidden_per_rank as usize,
            dtype,
            timeout: Duration::from_millis(args.kv_store_timeout_ms),
        };
        // a full chunk's header must be writable (dtype with an LMCache code, int32 length)
        cfg.metadata(cfg.params.chunk_size)
            .with_context(|| format!("--kv-dtype {}", args.kv_dtype))?;
        Ok(Some(cfg))
    }

    /// The `<key>metadata` header of one rank's chunk of `tokens` tokens (real shape).
    pub fn metadata(&self, tokens: usize) -> Result<RemoteMetadata, HeaderError> {
        Ok(RemoteMetadata::kv_2ltd(
            self.dtype,
            self.num_layers,
            tokens,
            self.hidden_per_rank,
        )?)
    }

    /// Size of the stored `<key>kv_bytes` blob for a chunk whose real KV is `real` bytes.
    pub fn blob_len(&self, real: u64) -> usize {
        (real / self.scale_down).max(1) as usize
    }

    /// Real KV bytes of a chunk of `tokens` tokens on every simulated rank (what the CPU
    /// tier holds for it).
    pub fn chunk_bytes(&self, tokens: usize) -> u64 {
        self.metadata(tokens)
            .map_or(0, |m| m.length.max(0) as u64)
            .saturating_mul(self.ranks.len() as u64)
    }
}
