//! sim: the stand-in for vLLM + LMCache on machines without a GPU.
//!
//! An OpenAI-compatible server shaped like vLLM's (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/v1/models`, `/health`, `/metrics`), whose engine is a
//! continuous-batching scheduler ([`engine::Scheduler`]) timed by a cost model fitted from a
//! GPU calibration profile ([`cacheroute_decisions::cost_model`]). See `sim/README.md`.

pub mod apc;
pub mod api;
pub mod cpu_tier;
pub mod embeddings;
pub mod engine;
pub mod filler;
pub mod lmcache;
pub mod logprobs;
pub mod metrics;
pub mod server;
pub mod tokenize;
pub use cacheroute_lmcache::tokenizer;

use anyhow::Context;
use cacheroute_decisions::cost_model::{CalibrationProfile, CostModel};
use clap::Args;
use engine::{EngineHandle, EngineStats, Scheduler, SchedulerConfig};
use lmcache::{LmCache, LmCacheConfig};
use metrics::SimMetrics;
use server::AppState;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokenizer::TokenizerChoice;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The embedded default profile: Llama-3-8B on one H100.
pub const DEFAULT_PROFILE_JSON: &str = include_str!("../../conf/profiles/h100-llama3-8b.json");

/// The profile JSON for `--profile`: a shipped profile's short name, or a file.
fn profile_json(profile: Option<&std::path::Path>) -> anyhow::Result<String> {
    use cacheroute_decisions::cost_model::{builtin_profile, BUILTIN_PROFILES};
    let Some(p) = profile else {
        return Ok(DEFAULT_PROFILE_JSON.to_string());
    };
    if let Some(json) = p.to_str().and_then(builtin_profile) {
        return Ok(json.to_string());
    }
    std::fs::read_to_string(p).with_context(|| {
        format!(
            "reading profile {} (not a file, nor a shipped profile: {})",
            p.display(),
            BUILTIN_PROFILES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// KV block size in tokens (vLLM's default).
pub const BLOCK_SIZE: u64 = 16;

/// `cacheroute sim` arguments.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Model name served (what `/v1/models` lists and requests must name).
    #[arg(long, default_value = "llama3-8b")]
    pub model: String,
    /// Calibration profile: a shipped profile's short name (h100-llama3-8b,
    /// h100x8-llama3-70b-tp8, rtx5090x8-llama3-70b, h100-llama3-70b-8layers) or a JSON
    /// file (default: h100-llama3-8b, embedded).
    #[arg(long, value_name = "NAME|FILE")]
    pub profile: Option<PathBuf>,
    /// Run X times faster than real time (e.g. 50 for tests).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// No engine delays at all: answer at once (a fast upstream for overhead benchmarks).
    #[arg(long)]
    pub zero_latency: bool,
    /// Token ids: `auto` (exact Llama-3 ids, embedded, for a --model or --lmcache-model
    /// that looks like Llama-3; else the approximation), `approx` (the deterministic
    /// approximation), or the path of a HuggingFace tokenizer.json.
    #[arg(long, default_value = "auto", value_name = "FILE|approx|auto")]
    pub tokenizer: TokenizerChoice,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget of one engine step (chunked prefill).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: u64,
    /// Longest prompt + completion accepted.
    #[arg(long, default_value_t = 131072)]
    pub max_model_len: u64,
    /// KV cache size in 16-token blocks (default: what the profile's GPUs (`gpus` ×
    /// `gpu_memory_gb`; absent: one 80 GB GPU) at 0.9 utilization hold after the model's
    /// bf16 weights and 2 GB of activations per GPU).
    #[arg(long)]
    pub num_gpu_blocks: Option<u64>,
    /// Seed of the generated filler text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Turn vLLM's automatic prefix caching (the GPU prefix cache) off.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// LMCache remote store: `redis://host:port[/db]` or `memory://NAME` (an in-process
    /// store shared by name). Without it the sim has no LMCache (GPU prefix cache only).
    #[arg(long)]
    pub kv_store: Option<String>,
    /// LMCache local CPU tier size in GB (LMCache's max_local_cpu_size; 0: none).
    #[arg(long, default_value_t = lmcache::DEFAULT_LOCAL_CPU_GB)]
    pub lmcache_local_cpu_size: f64,
    /// Link to the remote store in Gbit/s: a remote hit also costs its real bytes over it
    /// (0 or less: free).
    #[arg(long, default_value_t = lmcache::DEFAULT_STORE_GBPS, allow_negative_numbers = true)]
    pub kv_store_gbps: f64,
    /// LMCache's `enable_async_loading`: a remote-store hit is prefetched over the store
    /// link while the engine keeps stepping (the request waits, as vLLM's
    /// WAITING_FOR_REMOTE_KVS, without holding up the batch); only host-to-device is paid
    /// in the step. Off: the step that admits the request waits for the link too.
    #[arg(long)]
    pub lmcache_async_loading: bool,
    /// vLLM `--model` string used in LMCache keys (default: `--model`).
    #[arg(long)]
    pub lmcache_model: Option<String>,
    /// LMCache key scheme: lmcache-0.3.13, lmcache-0.4, lmcache-0.5 or an exact release.
    #[arg(long, default_value = "lmcache-0.3.13")]
    pub lmcache_scheme: String,
    /// LMCache chunk size in tokens.
    #[arg(long, default_value_t = 256)]
    pub chunk_size: usize,
    /// The PYTHONHASHSEED string of the vLLM processes (seeds LMCache's hash chain).
    #[arg(long, default_value = "0")]
    pub hash_seed: String,
    /// KV cache dtype in LMCache keys and headers.
    #[arg(long, default_value = "bfloat16")]
    pub kv_dtype: String,
    /// Tensor × pipeline parallel size of the simulated instance (ranks in the keys).
    #[arg(long, default_value_t = 1)]
    pub world_size: u32,
    /// Simulate this rank's keys only (default: every rank of --world-size).
    #[arg(long)]
    pub worker_id: Option<u32>,
    /// Also key (and store) a trailing partial chunk (LMCache's save_unfull_chunk).
    #[arg(long)]
    pub save_unfull_chunk: bool,
    /// Stored kv_bytes blobs are the real KV size divided by this (at least 1 byte);
    /// timing always uses the real size.
    #[arg(long, default_value_t = lmcache::DEFAULT_KV_SCALE_DOWN)]
    pub kv_scale_down: u64,
    /// Longest wait for a store lookup, and for a response's chunk writes.
    #[arg(long, default_value_t = lmcache::DEFAULT_STORE_TIMEOUT_MS)]
    pub kv_store_timeout_ms: u64,
}

impl Default for SimArgs {
    fn default() -> Self {
        SimArgs {
            listen: "127.0.0.1:8000".parse().expect("valid address"),
            model: "llama3-8b".into(),
            profile: None,
            time_scale: 1.0,
            zero_latency: false,
            tokenizer: TokenizerChoice::Auto,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len: 131072,
            num_gpu_blocks: None,
            seed: 0,
            no_enable_prefix_caching: false,
            kv_store: None,
            lmcache_local_cpu_size: lmcache::DEFAULT_LOCAL_CPU_GB,
            kv_store_gbps: lmcache::DEFAULT_STORE_GBPS,
            lmcache_async_loading: false,
            lmcache_model: None,
            lmcache_scheme: "lmcache-0.3.13".into(),
            chunk_size: 256,
            hash_seed: "0".into(),
            kv_dtype: "bfloat16".into(),
            world_size: 1,
            worker_id: None,
            save_unfull_chunk: false,
            kv_scale_down: lmcache::DEFAULT_KV_SCALE_DOWN,
            kv_store_timeout_ms: lmcache::DEFAULT_STORE_TIMEOUT_MS,
        }
    }
}

/// Where a sim learns which prompt prefix an external KV cache holds (beside its GPU
/// prefix cache). A hit is loaded like an LMCache CPU-tier hit (host-to-device) and
/// reported as tier `cpu`.
#[async_trait::async_trait]
pub trait PrefixCache: Send + Sync + 'static {
    /// Number of leading `token_ids` whose KV can be loaded instead of computed (0: none).
    async fn lookup(&self, model: &str, token_ids: &[u32]) -> u64;
}

/// No external prefix cache (the GPU prefix cache still works).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPrefixCache;

#[async_trait::async_trait]
impl PrefixCache for NoPrefixCache {
    async fn lookup(&self, _model: &str, _token_ids: &[u32]) -> u64 {
        0
    }
}

/// A sim serving in the background (see [`spawn`]). Dropping it asks the server to stop.
pub struct SimHandle {
    /// The address it listens on (the real port when `--listen` asked for port 0).
    pub addr: SocketAddr,
    state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The served model name.
    pub fn model(&self) -> &str {
        &self.state.model
    }

    /// Engine counters (None with `--zero-latency`).
    pub fn engine_stats(&self) -> Option<EngineStats> {
        self.state.engine.as_ref().map(|e| e.stats())
    }

    /// The fitted cost model in use.
    pub fn cost_model(&self) -> &CostModel {
        &self.state.cost
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> String {
        self.state.metrics.render()
    }

    /// The sim's LMCache (None without `--kv-store`).
    pub fn lmcache(&self) -> Option<&Arc<LmCache>> {
        self.state.lmcache.as_ref()
    }

    /// Stop serving: no new connections; open ones are closed (waits up to 2 s for
    /// in-flight responses).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(std::time::Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Serve until the server task ends (it does not on its own).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        if let Some(task) = self.task.take() {
            task.await.context("sim server task")?;
        }
        Ok(())
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn default_num_gpu_blocks(profile: &CalibrationProfile, kv_bytes_per_token: u64) -> u64 {
    // all the profile's GPUs together (a multi-GPU profile's KV bytes are the whole model's)
    let gpus = profile.gpus.unwrap_or(1).clamp(1, 1024) as f64;
    let per_gpu = profile
        .gpu_memory_gb
        .filter(|g| g.is_finite() && *g > 0.0)
        .unwrap_or(80.0)
        * 1e9;
    let memory = gpus * per_gpu;
    const UTILIZATION: f64 = 0.9;
    let activations = 2e9 * gpus;
    let weights = profile.config.approx_params() as f64 * 2.0;
    let kv = (memory * UTILIZATION - weights - activations).max(memory * 0.1);
    ((kv / (kv_bytes_per_token.max(1) * BLOCK_SIZE) as f64) as u64).max(1024)
}

async fn build_state(
    args: &SimArgs,
    prefix_cache: Option<Arc<dyn PrefixCache>>,
) -> anyhow::Result<AppState> {
    anyhow::ensure!(
        args.time_scale.is_finite() && args.time_scale > 0.0,
        "--time-scale must be a positive number, got {}",
        args.time_scale
    );
    anyhow::ensure!(args.max_num_seqs > 0, "--max-num-seqs must be at least 1");
    anyhow::ensure!(
        args.max_num_batched_tokens > 0,
        "--max-num-batched-tokens must be at least 1"
    );
    anyhow::ensure!(args.max_model_len > 1, "--max-model-len must be at least 2");
    let text = profile_json(args.profile.as_deref())?;
    let profile =
        CalibrationProfile::from_json(&text).context("parsing the calibration profile")?;
    let cost = CostModel::fit(&profile).context("fitting the calibration profile")?;
    let vocab = match profile.config.vocab_size {
        0 => tokenizer::LLAMA3_VOCAB_SIZE,
        v => u32::try_from(v).unwrap_or(u32::MAX),
    };
    let mut names = vec![args.model.as_str()];
    names.extend(args.lmcache_model.as_deref());
    let tokenizer = args
        .tokenizer
        .resolve(&names, vocab)
        .context("--tokenizer")?;
    let sched_cfg = SchedulerConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        block_size: BLOCK_SIZE,
        num_gpu_blocks: args
            .num_gpu_blocks
            .unwrap_or_else(|| default_num_gpu_blocks(&profile, cost.kv_bytes_per_token))
            .max(1),
        enable_prefix_caching: !args.no_enable_prefix_caching,
        kv_store_gbps: args.kv_store_gbps,
        async_loading: args.lmcache_async_loading,
    };
    anyhow::ensure!(
        !args.kv_store_gbps.is_nan(),
        "--kv-store-gbps must be a number (Gbit/s; 0 or less: a free link)"
    );
    let lm_cfg = LmCacheConfig::from_args(args, &profile.config, cost.kv_bytes_per_token)?;
    anyhow::ensure!(
        lm_cfg.is_none() || prefix_cache.is_none(),
        "--kv-store makes the sim look prefixes up in its LMCache store; it cannot be \
         combined with a custom PrefixCache"
    );
    let metrics = Arc::new(SimMetrics::new(&args.model)?);
    let lmcache = match lm_cfg {
        Some(cfg) => Some(Arc::new(LmCache::open(cfg, metrics.clone()).await)),
        None => None,
    };
    let engine = (!args.zero_latency).then(|| {
        EngineHandle::spawn(
            Scheduler::new(sched_cfg, cost.clone()),
            args.time_scale,
            metrics.clone(),
        )
    });
    Ok(AppState {
        model: args.model.clone(),
        root: args
            .lmcache_model
            .clone()
            .unwrap_or_else(|| args.model.clone()),
        max_model_len: args.max_model_len,
        zero_latency: args.zero_latency,
        seed: args.seed,
        tokenizer,
        engine,
        metrics,
        cost,
        sched_cfg,
        time_scale: args.time_scale,
        prefix_cache,
        lmcache,
        last_request: Mutex::new((0, serde_json::Value::Null)),
        counter: AtomicU64::new(0),
        started: server::unix_now(),
    })
}

/// Bind `args.listen` and serve in the background on the current tokio runtime; returns
/// once listening.
pub async fn spawn(args: SimArgs) -> anyhow::Result<SimHandle> {
    spawn_inner(args, None).await
}

/// [`spawn`] with a prefix cache deciding each request's `cached_tokens` (not with
/// `--kv-store`, which brings its own: [`lmcache::LmCache`]).
pub async fn spawn_with_prefix_cache(
    args: SimArgs,
    prefix_cache: Arc<dyn PrefixCache>,
) -> anyhow::Result<SimHandle> {
    spawn_inner(args, Some(prefix_cache)).await
}

async fn spawn_inner(
    args: SimArgs,
    prefix_cache: Option<Arc<dyn PrefixCache>>,
) -> anyhow::Result<SimHandle> {
    // validate (and open the store) before taking the port
    let state = Arc::new(build_state(&args, prefix_cache).await?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let app = server::router(state.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = rx.await;
        });
        if let Err(e) = serve.await {
            tracing::error!("sim server on {addr}: {e}");
        }
    });
    Ok(SimHandle {
        addr,
        state,
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// Run a sim server until the process is stopped (or Ctrl-C).
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let zero = args.zero_latency;
    let scale = args.time_scale;
    let handle = spawn(args).await?;
    tracing::info!(
        addr = %handle.addr,
        model = handle.model(),
        time_scale = scale,
        zero_latency = zero,
        kv_store = handle.lmcache().map(|l| l.config().store_url.as_str()),
        "cacheroute sim listening"
    );
    match tokio::signal::ctrl_c().await {
        Ok(()) => {
            tracing::info!("stopping sim");
            handle.stop().await;
            Ok(())
        }
        // no signal handling available: serve until killed
        Err(_) => handle.wait().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn cli_defaults_match_default_and_lmcache_flags_parse() {
        Cli::command().debug_assert();
        let d = Cli::parse_from(["sim"]).sim;
        let e = SimArgs::default();
        assert_eq!(d.kv_store, e.kv_store);
        assert_eq!(d.lmcache_model, e.lmcache_model);
        assert_eq!(d.lmcache_scheme, e.lmcache_scheme);
        assert_eq!(d.chunk_size, e.chunk_size);
        assert_eq!(d.hash_seed, e.hash_seed);
        assert_eq!(d.kv_dtype, e.kv_dtype);
        assert_eq!(d.world_size, e.world_size);
        assert_eq!(d.worker_id, e.worker_id);
        assert_eq!(d.save_unfull_chunk, e.save_unfull_chunk);
        assert_eq!(d.kv_scale_down, e.kv_scale_down);
        assert_eq!(d.kv_store_timeout_ms, e.kv_store_timeout_ms);
        assert_eq!(d.lmcache_local_cpu_size, e.lmcache_local_cpu_size);
        assert_eq!(d.kv_store_gbps, e.kv_store_gbps);
        assert_eq!(d.no_enable_prefix_caching, e.no_enable_prefix_caching);
        assert_eq!(
            (d.model, d.seed, d.max_num_seqs),
            (e.model, e.seed, e.max_num_seqs)
        );
        let a = Cli::parse_from([
            "sim",
            "--kv-store",
            "redis://127.0.0.1:6379/2",
            "--lmcache-model",
            "meta-llama/Llama-3.1-8B-Instruct",
            "--lmcache-scheme",
            "lmcache-0.3.15",
            "--chunk-size",
            "128",
            "--hash-seed",
            "42",
            "--kv-dtype",
            "half",
            "--world-size",
            "2",
            "--worker-id",
            "1",
            "--save-unfull-chunk",
            "--kv-scale-down",
            "1",
            "--kv-store-timeout-ms",
            "500",
            "--lmcache-local-cpu-size",
            "0.5",
            "--kv-store-gbps",
            "-1",
            "--no-enable-prefix-caching",
        ])
        .sim;
        assert_eq!(a.lmcache_local_cpu_size, 0.5);
        assert_eq!(a.kv_store_gbps, -1.0);
        assert!(a.no_enable_prefix_caching);
        assert_eq!(a.kv_store.as_deref(), Some("redis://127.0.0.1:6379/2"));
        assert_eq!(a.worker_id, Some(1));
        assert!(a.save_unfull_chunk);
        assert_eq!((a.chunk_size, a.world_size, a.kv_scale_down), (128, 2, 1));
    }
}
