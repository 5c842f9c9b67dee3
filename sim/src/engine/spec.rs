//! The scheduler's vocabulary: its limits ([`SchedulerConfig`]), what it is given (a
//! sequence, and the LMCache hit found at submission), and what it answers (admissions
//! with their cached split, step plans, per-sequence events).

use std::sync::Arc;

use cacheroute_decisions::cost_model::StepShape;

/// Scheduler limits (vLLM's flags of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: u64,
    /// Tokens per KV block (vLLM's default 16).
    pub block_size: u64,
    /// KV capacity in blocks.
    pub num_gpu_blocks: u64,
    /// vLLM's automatic prefix caching (`--no-enable-prefix-caching` turns it off).
    pub enable_prefix_caching: bool,
    /// Link to the LMCache remote store in Gbit/s (`--kv-store-gbps`); ≤ 0: free.
    pub kv_store_gbps: f64,
    /// LMCache's async loading (`--lmcache-async-loading`): remote-store hits are
    /// prefetched over the link off the step; the sequence is admitted once they are in.
    pub async_loading: bool,
}

impl SchedulerConfig {
    pub fn kv_capacity_tokens(&self) -> u64 {
        self.num_gpu_blocks * self.block_size
    }
}

/// Where LMCache found a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The local CPU tier (`--lmcache-local-cpu-size`).
    Cpu,
    /// The remote store (`--kv-store`).
    Remote,
}

/// LMCache's hit for one prompt (looked up at submission): its contiguous chunks from
/// token 0, each with the tier it comes from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExternalHit {
    /// (end token, tier) of each hit chunk in prompt order (chunk i spans the previous
    /// end to its own).
    pub chunks: Vec<(u64, Tier)>,
    /// Store keys per chunk (one per simulated rank), for `sim_lmcache_chunks_loaded_total`.
    pub keys_per_chunk: u64,
}

impl ExternalHit {
    /// A hit of `tokens` leading tokens from one tier, as one chunk.
    pub fn single(tokens: u64, tier: Tier) -> ExternalHit {
        ExternalHit {
            chunks: if tokens > 0 {
                vec![(tokens, tier)]
            } else {
                Vec::new()
            },
            keys_per_chunk: 1,
        }
    }

    /// Leading tokens LMCache holds.
    pub fn tokens(&self) -> u64 {
        self.chunks.last().map_or(0, |c| c.0)
    }

    /// Of those, tokens in chunks that come from the remote store.
    pub fn remote_tokens(&self) -> u64 {
        let mut start = 0;
        let mut remote = 0;
        for &(end, tier) in &self.chunks {
            if tier == Tier::Remote {
                remote += end.saturating_sub(start);
            }
            start = start.max(end);
        }
        remote
    }
}

/// A sequence's cached prompt tokens by where they came from: the GPU prefix cache, then
/// what LMCache supplied beyond it from its CPU tier and from the remote store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CachedSplit {
    pub gpu: u64,
    pub cpu: u64,
    pub remote: u64,
}

impl CachedSplit {
    /// Cached prompt tokens in all (what `usage.prompt_tokens_details.cached_tokens` says).
    pub fn total(&self) -> u64 {
        self.gpu + self.cpu + self.remote
    }

    /// The split of a prefix of `cached` tokens (≥ `gpu`): the first `gpu` from the GPU,
    /// the rest from `ext`'s chunks. Also returns how many chunks supplied tokens.
    pub fn of(gpu: u64, ext: Option<&ExternalHit>, cached: u64) -> (CachedSplit, u64) {
        let mut out = CachedSplit {
            gpu: gpu.min(cached),
            ..CachedSplit::default()
        };
        let mut chunks = 0;
        if let Some(ext) = ext {
            let mut start = 0;
            for &(end, tier) in &ext.chunks {
                let end = end.min(cached);
                let from = start.max(out.gpu);
                if end > from {
                    chunks += 1;
                    match tier {
                        Tier::Cpu => out.cpu += end - from,
                        Tier::Remote => out.remote += end - from,
                    }
                }
                start = start.max(end);
            }
        }
        (out, chunks)
    }
}

/// A request as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqSpec {
    pub id: u64,
    pub prompt_tokens: u64,
    /// Hash chain of the prompt's full blocks ([`crate::apc::block_hashes`]); empty: the
    /// GPU prefix cache neither finds nor keeps this prompt.
    pub block_hashes: Arc<[u64]>,
    /// LMCache's hit (None: no LMCache, nothing external counted).
    pub external: Option<Arc<ExternalHit>>,
    pub max_tokens: u64,
    /// Virtual arrival time (ms).
    pub arrival_ms: f64,
}

/// A sequence admitted in a step, with its cached prefix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    pub id: u64,
    pub prompt_tokens: u64,
    pub split: CachedSplit,
    /// Whether the GPU prefix cache was asked (APC on).
    pub apc: bool,
    /// Whether LMCache was asked.
    pub external: bool,
    /// LMCache store keys loaded (chunks that supplied tokens × keys per chunk).
    pub keys_loaded: u64,
}

/// What one step runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    /// (sequence id, tokens computed this step).
    pub scheduled: Vec<(u64, u64)>,
    pub shape: StepShape,
    /// Sequences admitted this step.
    pub admitted: Vec<Admission>,
    /// Cached tokens loaded from LMCache (CPU tier and remote store) this step.
    pub loaded_tokens: u64,
    /// Of those, tokens that came over the remote store's link in the step (blocking
    /// loads; a prefetched sequence's came before it was admitted).
    pub remote_tokens: u64,
    /// Load time of those tokens (ms): host-to-device, plus the link for remote ones.
    pub load_ms: f64,
    /// Forward time (ms).
    pub compute_ms: f64,
    /// Sequences preempted while planning.
    pub preempted: Vec<u64>,
}

impl StepPlan {
    /// Total step duration in simulated ms.
    pub fn duration_ms(&self) -> f64 {
        self.compute_ms + self.load_ms
    }

    /// Forward time attributed to prefill: the step's compute prorated by its share of
    /// prefill tokens among all tokens it computes (decode tokens count 1 each).
    pub fn prefill_compute_ms(&self) -> f64 {
        let t = self.shape.prefill_new_tokens;
        if t == 0 {
            return 0.0;
        }
        self.compute_ms * t as f64 / (t + self.shape.decode_batch) as f64
    }
}

/// A token sampled at the end of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeqEvent {
    pub id: u64,
    /// 0-based index of the generated token.
    pub index: u64,
    pub finished: bool,
    /// Simulated ms from arrival to this token.
    pub since_arrival_ms: f64,
    /// Simulated ms from arrival to the first token.
    pub ttft_ms: f64,
    /// Simulated ms spent waiting before first being scheduled.
    pub queue_ms: f64,
    /// The sequence's cached prompt tokens, by tier (decided at its first admission).
    pub cached: CachedSplit,
}
