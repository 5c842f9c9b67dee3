//! What an injection decision reads: the strategy and release policy, the instance's
//! load, the knowledge's shape, the transfer path from the KDN; and the queue-wait
//! estimate that both rules share.

use serde::{Deserialize, Serialize};

use crate::cost_model::CostModel;

/// Which rule decides the injection mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InjectionStrategy {
    Text,
    Kv,
    Hybrid,
    Iws,
    #[default]
    Adaptive,
}

impl InjectionStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            InjectionStrategy::Text => "text",
            InjectionStrategy::Kv => "kv",
            InjectionStrategy::Hybrid => "hybrid",
            InjectionStrategy::Iws => "iws",
            InjectionStrategy::Adaptive => "adaptive",
        }
    }
}

/// What a KV-mode request does when it is admitted before its KV is resident
/// (`docs/original.md`: the original's were `ordered` and `text_bypass`, with no deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReleasePolicy {
    /// Hold it in its place, holding its admission slot: the requests behind keep
    /// their order. Past the deadline it goes as text.
    #[default]
    Ordered,
    /// Text-mode requests behind it may go first: it waits for its KV outside the
    /// admission queue, while KV-mode requests keep their order among themselves.
    /// Past the deadline it goes as text.
    TextBypass,
    /// Hold only this request (nobody waits behind it) until its KV is ready or the
    /// deadline passes, then text.
    Wait,
}

impl ReleasePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleasePolicy::Ordered => "ordered",
            ReleasePolicy::TextBypass => "text_bypass",
            ReleasePolicy::Wait => "wait",
        }
    }

    /// Whether the request waits for its KV while holding its admission slot.
    pub fn waits_admitted(self) -> bool {
        self == ReleasePolicy::Ordered
    }
}

/// How the knowledge goes to the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum InjectionMode {
    Text,
    Kv,
}

impl InjectionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            InjectionMode::Text => "text",
            InjectionMode::Kv => "kv",
        }
    }

    pub(super) fn index(self) -> usize {
        match self {
            InjectionMode::Text => 0,
            InjectionMode::Kv => 1,
        }
    }
}

/// The chosen instance's load at decision time.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InstanceLoad {
    /// Requests admitted to the instance and not yet prefilled (ahead of this one).
    pub queued: u64,
    /// Σ new prompt tokens of those queued requests (what their prefills compute).
    pub queued_prefill_tokens: u64,
    /// Sequences in the running (decoding) batch.
    pub running: u64,
    /// Σ context tokens of the running sequences.
    pub running_context_tokens: u64,
}

/// The knowledge part of the request, in tokens and KV chunks.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KnowledgeShape {
    /// Tokens of the request without the knowledge (system, history, question).
    pub prompt_tokens: u64,
    /// Tokens of the knowledge text (0 = no knowledge: always text).
    pub knowledge_tokens: u64,
    /// Tokens per KV chunk (0 → 256, LMCache's default and the original's).
    pub chunk_size: u64,
    /// Of `total_chunks`, those already resident in the chosen instance's KV store.
    pub resident_chunks: u64,
    /// Full KV chunks of the knowledge prefix that exist (at the KDN or resident).
    pub total_chunks: u64,
    /// KV bytes per token (0 → the cost model's, i.e. the profile's).
    pub kv_bytes_per_token: u64,
}

impl KnowledgeShape {
    pub(super) fn chunk(&self) -> u64 {
        if self.chunk_size == 0 {
            256
        } else {
            self.chunk_size
        }
    }

    pub(super) fn bytes_per_token(&self, m: &CostModel) -> u64 {
        if self.kv_bytes_per_token == 0 {
            m.kv_bytes_per_token
        } else {
            self.kv_bytes_per_token
        }
    }
}

/// The path the KV would take from its KDN to the instance (absent when no KDN serves the
/// knowledge).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TransferPath {
    /// Link bandwidth KDN → instance, Gbit/s (≤ 0: unusable).
    pub link_gbps: f64,
    /// Link round-trip time, ms.
    pub rtt_ms: f64,
    /// Our own transfers still scheduled on this link ahead of this one, ms (the original's
    /// `link_free − now`).
    pub link_busy_ms: f64,
    /// Queue delay the KDN reports, ms (EMA).
    pub kdn_queue_ms: f64,
    /// Injection jobs the KDN reports pending.
    pub kdn_pending: u64,
    /// Serving throughput the KDN reports, bytes/s (0 = unknown: the link is the limit).
    pub kdn_bytes_per_sec: f64,
    /// What a job of this KDN costs beyond its queue and link time, learned from its
    /// finished jobs ([`crate::kdn_jobs::JobTimes`]): a fixed part per job, ms ...
    pub job_fixed_ms: f64,
    /// ... and a part per MB moved, ms (both 0 until learned).
    pub job_ms_per_mb: f64,
}

/// Everything a decision looks at besides the cost model and the corrections.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InjectionInputs {
    /// Instance id (the key of the online corrections).
    pub instance: String,
    pub load: InstanceLoad,
    pub knowledge: KnowledgeShape,
    pub transfer: Option<TransferPath>,
    /// The gateway's count of knowledge requests it decided so far: `hybrid` sends the
    /// even ones as KV and the odd ones as text.
    pub turn: u64,
    /// Bandwidth from the instance's LMCache store to its GPU host, Gbit/s: a remote
    /// store's cached chunks cross it before the host-to-device copy (≤ 0: local, free).
    pub store_gbps: f64,
    /// The instance's LMCache loads remote-store chunks asynchronously (LMCache's
    /// `enable_async_loading`): the store link is a wait before the request's step, not
    /// part of the step every request in the batch waits for.
    pub store_async: bool,
    /// With async store loading: how long the instance's store link is still busy with
    /// the KV loads already sent to it, ms (ours queue behind them).
    pub store_busy_ms: f64,
    /// Charge a mode the step time it adds to the requests prefilling beside it
    /// (`[proxy] weigh_others`). Off by default: it is only as good as the KV path's
    /// prediction, and where KV costs more than predicted (a KDN slower than its link)
    /// it pushes towards KV (benches/rag measured it).
    pub weigh_others: bool,
}

// ---------------------------------------------------------------- shared estimates

/// Wait before this request's prefill starts on `load`'s instance (ms): the step in flight
/// (one decode step of the running batch) plus one mixed step per queued request (its
/// prefill, sharing the forward with the running batch's decode).
pub fn queue_wait_ms(m: &CostModel, load: &InstanceLoad) -> f64 {
    let avg_ctx = load
        .running_context_tokens
        .checked_div(load.running)
        .unwrap_or(0);
    let in_flight = m.decode_step_ms(load.running, avg_ctx);
    let queued = match load.queued_prefill_tokens.checked_div(load.queued) {
        None => 0.0,
        Some(avg_new) => load.queued as f64 * m.step_ms(avg_new.max(1), 0, load.running, avg_ctx),
    };
    in_flight + queued
}
