//! What a sim server shares between requests ([`AppState`]), and the limits and header
//! names of its HTTP surface.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use cacheroute_decisions::cost_model::CostModel;
use serde_json::Value;

use crate::engine::{EngineHandle, SchedulerConfig};
use crate::lmcache::LmCache;
use crate::metrics::SimMetrics;
use crate::tokenizer::Tokenizer;
use crate::PrefixCache;

/// Largest request body accepted (RAG prompts can be large).
pub const MAX_BODY_BYTES: usize = 256 << 20;

/// Default `max_tokens` when a request has none.
pub const DEFAULT_MAX_TOKENS: u64 = 16;

/// Header with which the gateway attaches a KV handle (`job=<id>;chunks=<n>;tokens=<t>`).
pub const KV_HANDLE_HEADER: &str = "x-cacheroute-kv-handle";

/// Response header with the result of checking the request's KV handle.
pub const KV_HANDLE_RESULT_HEADER: &str = "x-sim-kv-handle";

/// Response headers with the request's cached prompt tokens per tier.
pub const CACHED_GPU_HEADER: &str = "x-sim-cached-gpu";
pub const CACHED_CPU_HEADER: &str = "x-sim-cached-cpu";
pub const CACHED_REMOTE_HEADER: &str = "x-sim-cached-remote";

/// Everything a sim server shares between requests.
pub struct AppState {
    pub model: String,
    /// vLLM's `--model` (the card's `root`; LMCache keys name it): `--lmcache-model`,
    /// else the served name.
    pub root: String,
    pub max_model_len: u64,
    pub zero_latency: bool,
    pub seed: u64,
    pub tokenizer: Arc<Tokenizer>,
    pub engine: Option<EngineHandle>,
    pub metrics: Arc<SimMetrics>,
    pub cost: CostModel,
    pub sched_cfg: SchedulerConfig,
    pub time_scale: f64,
    /// A custom external prefix cache ([`crate::spawn_with_prefix_cache`]).
    pub prefix_cache: Option<Arc<dyn PrefixCache>>,
    /// `--kv-store`: lookups and writes of LMCache chunks (excludes `prefix_cache`).
    pub lmcache: Option<Arc<LmCache>>,
    /// The last completion request, and a sequence number so that a request only adds its
    /// KV-handle result to its own record.
    pub last_request: Mutex<(u64, Value)>,
    pub counter: AtomicU64,
    pub started: u64,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
