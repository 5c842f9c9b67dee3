//! How a request's knowledge reaches the instance the scheduler chose: as **text** (the
//! knowledge is prefilled from scratch with the prompt) or as **KV** (the knowledge's KV
//! chunks are moved from the KDN into the instance's store, loaded into GPU memory, and only
//! the uncached suffix is prefilled). Plain data in, an [`InjectionDecision`] out; no I/O.
//!
//! Strategies ([`InjectionStrategy`], config `injection = "text" | "kv" | "iws" | "adaptive"`):
//!
//! * `text`, `kv`: fixed. A client's own `"injection"` field (`"text"`/`"kv"`) picks between
//!   them; `"auto"` (or absent) keeps the strategy's mode.
//! * `hybrid`: a static 1:1 mix, the original's "hybrid" baseline: knowledge requests
//!   alternate between KV and text on the gateway's turn counter ([`InjectionInputs::turn`]).
//! * `iws`: the original proxy's rule (research `cacheroute.md` §3.9), term for term, with
//!   the 0.5 queue penalty and the 100 ms margin, but fed with coefficients fitted from our
//!   calibration profile ([`CostModel`]) instead of the all-zero JSON it ships with (§9).
//!   The baseline the benchmarks compare against. See [`iws_terms`].
//! * `adaptive` (default): predicted TTFT of both modes on the chosen instance from its queue
//!   and running batch, the fitted prefill / cached-prefill / decode / host-to-device curves,
//!   the bytes of the non-resident KV chunks over the link, and the KDN's reported load;
//!   chooses the cheaper and corrects itself online with measured TTFTs ([`Corrections`]).
//!   "Cheaper" counts what a mode costs the other requests on the instance too: the GPU
//!   time one step spends on this request's prefill (or KV load) is time every request
//!   prefilling beside it waits, so a long text prefill on a busy instance costs its
//!   own TTFT plus the extra step time × the requests that share those steps.
//!   Fixes the §9 defects: the queue wait is counted once, the KDN's load is used, and KV
//!   already resident in the instance's store costs nothing to move. See [`adaptive_terms`].
//!
//! Under `iws` and `adaptive` the client's field is overridden, as in the original (§3.2 step 3).
//! Every decision records its inputs, both predictions and the reason (for `/debug/strategy`
//! and the decision log).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cost_model::CostModel;
use crate::scheduler::InjectionPreference;

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
/// (research §3.7; the original's only policy was `text_bypass`, with no deadline).
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

    fn index(self) -> usize {
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
    fn chunk(&self) -> u64 {
        if self.chunk_size == 0 {
            256
        } else {
            self.chunk_size
        }
    }

    fn bytes_per_token(&self, m: &CostModel) -> u64 {
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
    /// Charge a mode the step time it adds to the requests prefilling beside it
    /// (`[proxy] weigh_others`). Off by default: it is only as good as the KV path's
    /// prediction, and where KV costs more than predicted (a KDN slower than its link)
    /// it pushes towards KV (benches/rag measured it).
    pub weigh_others: bool,
}

// ---------------------------------------------------------------- online corrections

/// Smoothing of the measured/predicted ratio.
pub const CORRECTION_ALPHA: f64 = 0.2;
/// Bounds of a correction factor (one outlier cannot make a mode look free or impossible).
pub const CORRECTION_MIN: f64 = 0.25;
pub const CORRECTION_MAX: f64 = 4.0;

/// EWMA of measured / predicted TTFT for one (instance, mode).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    pub factor: f64,
    pub samples: u64,
}

impl Default for Ewma {
    fn default() -> Self {
        Ewma {
            factor: 1.0,
            samples: 0,
        }
    }
}

/// Per (instance, mode) correction of the adaptive predictions, learnt from measured TTFTs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Corrections {
    /// instance → [text, kv].
    pub by_instance: BTreeMap<String, [Ewma; 2]>,
}

impl Corrections {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a measured TTFT for a request predicted at `predicted_ms` (the *uncorrected*
    /// prediction, [`AdaptiveTerms::text_raw_ms`] / [`AdaptiveTerms::kv_raw_ms`]). Returns the
    /// new factor. Non-finite or non-positive values are ignored.
    pub fn observe(
        &mut self,
        instance: &str,
        mode: InjectionMode,
        predicted_ms: f64,
        measured_ms: f64,
    ) -> f64 {
        if !(predicted_ms.is_finite() && measured_ms.is_finite())
            || predicted_ms <= 0.0
            || measured_ms <= 0.0
        {
            return self.factor(instance, mode);
        }
        let ratio = (measured_ms / predicted_ms).clamp(CORRECTION_MIN, CORRECTION_MAX);
        let e = &mut self.by_instance.entry(instance.to_string()).or_default()[mode.index()];
        e.factor = if e.samples == 0 {
            // start from 1 like an unseen instance, move by alpha
            1.0 + CORRECTION_ALPHA * (ratio - 1.0)
        } else {
            e.factor + CORRECTION_ALPHA * (ratio - e.factor)
        }
        .clamp(CORRECTION_MIN, CORRECTION_MAX);
        e.samples += 1;
        e.factor
    }

    /// Current factor (1 when never observed).
    pub fn factor(&self, instance: &str, mode: InjectionMode) -> f64 {
        self.by_instance
            .get(instance)
            .map_or(1.0, |e| e[mode.index()].factor)
    }

    /// Forget an instance (it left the pool).
    pub fn forget(&mut self, instance: &str) {
        self.by_instance.remove(instance);
    }
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

// ---------------------------------------------------------------- iws (the original)

/// Constants of the original's IWS rule (research §3.9).
pub mod iws {
    /// LMCache chunk the original aligns to: `eff = floor(K/256)·256`.
    pub const CHUNK: u64 = 256;
    /// Template header tokens added to every prompt length.
    pub const HEADER_TOKENS: u64 = 36;
    /// Fixed text-prepare overhead, ms (`+ rtt + 3`).
    pub const TEXT_PREPARE_MS: f64 = 3.0;
    /// Link efficiency in `kv_transfer = eff·MB / (bw/8 · 0.825) · 1000`.
    pub const LINK_EFFICIENCY: f64 = 0.825;
    /// `IWS_KDN_QUEUE_PENALTY_ALPHA`.
    pub const QUEUE_PENALTY_ALPHA: f64 = 0.5;
    /// `IWS_DECISION_MARGIN_MS`.
    pub const DECISION_MARGIN_MS: f64 = 100.0;
    /// Bandwidth when the link reports none (`KDN_DEFAULT_BANDWIDTH_MBPS`, else 1000), Mbit/s.
    pub const DEFAULT_BANDWIDTH_MBPS: f64 = 1000.0;
}

/// Every term of the original's IWS estimate (research §3.9), in ms.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct IwsTerms {
    /// `eff = floor(K/256)·256`: knowledge tokens the KV covers.
    pub eff_tokens: u64,
    /// `ready_wait = predict_new_task_wait_ms(instance)`; here [`queue_wait_ms`].
    pub ready_wait: f64,
    /// `text_prepare_wait = max(0, active_until − now) + rtt + 3`.
    pub text_prepare_wait: f64,
    /// `queue_predictor(P + K + 36)`; here the fitted `prefill_ms`.
    pub text_service: f64,
    /// `text_total = max(text_prepare_wait, ready_wait) + text_service`.
    pub text_total: f64,
    /// `kv_transfer = eff·MB_per_token / (bw/8 · 0.825) · 1000` (bw in Mbit/s; MB/token from
    /// the profile instead of the original's constant 0.096).
    pub kv_transfer: f64,
    /// `kv_queue_wait = max(0, link_free − now)`.
    pub kv_queue_wait: f64,
    /// `kv_prepare = kv_queue_wait + kv_transfer`.
    pub kv_prepare: f64,
    /// `redis_load(eff)`: the original's GB → ms pull fit; here the fitted host-to-GPU copy
    /// of `eff` tokens' KV.
    pub redis_load: f64,
    /// `residual = queue_predictor(max(1, P + K − eff + 36))`; here the fitted `prefill_ms`
    /// (a full prefill of the residual, as the original).
    pub residual: f64,
    /// `kvcache_total = max(ready_wait, kv_prepare) + redis_load + residual`.
    pub kv_total: f64,
    /// `kvcache_total + 0.5·kv_queue_wait + 100` (the left side of the comparison; the queue
    /// wait is counted a second time here: a §9 defect kept on purpose).
    pub kv_score: f64,
}

/// The original's IWS terms for `inputs` with the fitted `m` (no decision).
pub fn iws_terms(m: &CostModel, inputs: &InjectionInputs) -> IwsTerms {
    let k = &inputs.knowledge;
    let p = k.prompt_tokens;
    let kk = k.knowledge_tokens;
    let eff = kk / iws::CHUNK * iws::CHUNK;
    let ready_wait = queue_wait_ms(m, &inputs.load);
    let (busy, rtt, bw_mbps) = match &inputs.transfer {
        Some(t) => (
            t.link_busy_ms.max(0.0),
            t.rtt_ms.max(0.0),
            if t.link_gbps > 0.0 {
                t.link_gbps * 1000.0
            } else {
                iws::DEFAULT_BANDWIDTH_MBPS
            },
        ),
        None => (0.0, 0.0, iws::DEFAULT_BANDWIDTH_MBPS),
    };
    let text_prepare_wait = if kk > 0 && inputs.transfer.is_some() {
        busy + rtt + iws::TEXT_PREPARE_MS
    } else {
        0.0
    };
    let text_service = m.prefill_ms(p + kk + iws::HEADER_TOKENS);
    let text_total = text_prepare_wait.max(ready_wait) + text_service;
    let mb_per_token = k.bytes_per_token(m) as f64 / 1e6;
    let kv_transfer = eff as f64 * mb_per_token / (bw_mbps / 8.0 * iws::LINK_EFFICIENCY) * 1000.0;
    let kv_queue_wait = busy;
    let kv_prepare = kv_queue_wait + kv_transfer;
    let redis_load = m.h2d_ms(eff * k.bytes_per_token(m)).max(0.0);
    let residual = m.prefill_ms((p + kk + iws::HEADER_TOKENS).saturating_sub(eff).max(1));
    let kv_total = ready_wait.max(kv_prepare) + redis_load + residual;
    let kv_score = kv_total + iws::QUEUE_PENALTY_ALPHA * kv_queue_wait + iws::DECISION_MARGIN_MS;
    IwsTerms {
        eff_tokens: eff,
        ready_wait,
        text_prepare_wait,
        text_service,
        text_total,
        kv_transfer,
        kv_queue_wait,
        kv_prepare,
        redis_load,
        residual,
        kv_total,
        kv_score,
    }
}

/// The original's choice and reason for these terms (research §3.9).
fn iws_choice(inputs: &InjectionInputs, t: &IwsTerms) -> (InjectionMode, &'static str) {
    if inputs.knowledge.knowledge_tokens == 0 || inputs.transfer.is_none() {
        return (InjectionMode::Text, "no_rag_or_empty_knowledge");
    }
    if t.kv_score < t.text_total {
        if t.kv_prepare <= t.ready_wait {
            (InjectionMode::Kv, "kvcache_hidden_and_score_better")
        } else {
            (InjectionMode::Kv, "kvcache_score_better")
        }
    } else if t.kv_queue_wait > 0.0 {
        (InjectionMode::Text, "text_due_to_kdn_congestion")
    } else if t.text_prepare_wait > 0.0 {
        (InjectionMode::Text, "text_despite_active_kv_wait")
    } else {
        (InjectionMode::Text, "text_score_better")
    }
}

// ---------------------------------------------------------------- adaptive

/// Every term of the adaptive prediction, in ms (raw = before the online correction).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct AdaptiveTerms {
    /// Wait before this request's prefill starts ([`queue_wait_ms`]); counted once per mode.
    pub queue_wait: f64,
    /// Text: one step prefilling `prompt + knowledge` beside the running batch; when
    /// knowledge chunks are resident in the instance's store, LMCache finds them for a
    /// text prompt too: their load plus the prefill of the rest.
    pub text_prefill: f64,
    /// Knowledge tokens a text prompt finds resident (the resident chunks).
    pub text_cached_tokens: u64,
    /// `text_raw = queue_wait + text_prefill`.
    pub text_raw_ms: f64,
    /// Knowledge tokens the KV serves (`min(usable chunks × chunk, K)`).
    pub cached_tokens: u64,
    /// Chunks that must cross the link (usable, not resident).
    pub moved_chunks: u64,
    /// Bytes of those chunks.
    pub moved_bytes: u64,
    /// Wait at the KDN / on the link before our bytes flow: the larger of our own link
    /// backlog, the KDN's reported queue delay and its pending jobs at its throughput.
    pub kdn_wait: f64,
    /// `rtt + moved_bytes / min(link, KDN throughput)`; 0 when nothing moves.
    pub transfer: f64,
    /// The KDN's own work on the job beyond the link (learned: `job_fixed_ms +
    /// job_ms_per_mb × MB moved`); 0 when nothing moves.
    pub kdn_overhead: f64,
    /// Loading the cached part: from the store over `store_gbps`, then host to GPU.
    pub gpu_load: f64,
    /// Cached prefill of the uncached suffix on top of the cached tokens.
    pub suffix_prefill: f64,
    /// `kv_raw = max(queue_wait, kdn_wait + transfer + kdn_overhead) + gpu_load +
    /// suffix_prefill` (the transfer overlaps the queue; INFINITY when no usable KV).
    pub kv_raw_ms: f64,
    pub text_factor: f64,
    pub kv_factor: f64,
    /// Requests on the instance that wait for the steps this request's prefill joins
    /// (`load.queued`: not yet prefilled): they pay the extra step time a mode adds.
    pub sharing: u64,
    /// What text costs the others: `sharing × max(0, text_prefill − (gpu_load +
    /// suffix_prefill))`, ms (0 without usable KV: then there is no choice).
    pub text_delay_to_others: f64,
    /// What KV costs the others: `sharing × max(0, gpu_load + suffix_prefill −
    /// text_prefill)`, ms.
    pub kv_delay_to_others: f64,
    /// How much cheaper KV that must move has to be predicted to be chosen:
    /// [`KV_MARGIN`] × the KV path's own work (`kdn_wait + transfer + kdn_overhead +
    /// gpu_load + suffix_prefill`, corrected), ms. Not of the queue wait, which both
    /// modes pay: under a long queue a real saving still shows. 0 when nothing moves.
    pub kv_margin: f64,
}

impl AdaptiveTerms {
    /// What the decision weighs for text: the corrected own TTFT plus the delay to others.
    pub fn text_cost_ms(&self) -> f64 {
        self.text_raw_ms * self.text_factor + self.text_delay_to_others
    }

    /// The same for KV (INFINITY without usable KV).
    pub fn kv_cost_ms(&self) -> f64 {
        self.kv_raw_ms * self.kv_factor + self.kv_delay_to_others
    }
}

/// The adaptive predictor's terms for `inputs`.
pub fn adaptive_terms(m: &CostModel, inputs: &InjectionInputs, c: &Corrections) -> AdaptiveTerms {
    let load = &inputs.load;
    let k = &inputs.knowledge;
    let avg_ctx = load
        .running_context_tokens
        .checked_div(load.running)
        .unwrap_or(0);
    let queue_wait = queue_wait_ms(m, load);
    let total_tokens = k.prompt_tokens + k.knowledge_tokens;
    let chunk = k.chunk();
    let bpt = k.bytes_per_token(m);
    let store_ms = |tokens: u64| {
        if inputs.store_gbps > 0.0 {
            (tokens * bpt) as f64 * 8.0 / (inputs.store_gbps * 1e9) * 1000.0
        } else {
            0.0
        }
    };
    // Loading `cached` tokens from the store to the GPU, then the prefill of the rest
    // in one step beside the running batch.
    let cached_path = |cached: u64| {
        let mut s = crate::cost_model::StepShape::default();
        s.add_prefill(cached, (total_tokens - cached).max(1));
        s.decode_batch = load.running;
        s.decode_context_tokens = load.running * avg_ctx;
        (m.h2d_ms(cached * bpt) + store_ms(cached), m.step_cost(&s))
    };
    let resident = k.resident_chunks.min(k.total_chunks);
    // A text prompt is looked up in LMCache like any other: resident chunks serve it.
    let text_cached_tokens = (resident * chunk).min(k.knowledge_tokens) / chunk * chunk;
    let text_prefill = if text_cached_tokens == 0 {
        m.step_ms(total_tokens, 0, load.running, avg_ctx)
    } else {
        let (load_ms, prefill_ms) = cached_path(text_cached_tokens);
        load_ms + prefill_ms
    };
    let text_raw_ms = queue_wait + text_prefill;

    // Without a usable path only the resident chunks can serve.
    let link_ok = inputs.transfer.is_some_and(|t| t.link_gbps > 0.0);
    let usable = if link_ok { k.total_chunks } else { resident };
    let cached_tokens = (usable * chunk).min(k.knowledge_tokens);
    let usable = cached_tokens / chunk; // only full chunks within the knowledge
    let moved_chunks = usable.saturating_sub(resident);
    let moved_bytes = moved_chunks * chunk * bpt;
    let (kdn_wait, transfer, kdn_overhead) = match (&inputs.transfer, moved_chunks) {
        (Some(t), n) if n > 0 => {
            let link_bps = t.link_gbps * 1e9 / 8.0;
            let bps = if t.kdn_bytes_per_sec > 0.0 {
                link_bps.min(t.kdn_bytes_per_sec)
            } else {
                link_bps
            };
            let pending_ms = if t.kdn_bytes_per_sec > 0.0 {
                // pending jobs assumed the size of ours
                t.kdn_pending as f64 * moved_bytes as f64 / t.kdn_bytes_per_sec * 1000.0
            } else {
                0.0
            };
            let wait = t.link_busy_ms.max(t.kdn_queue_ms).max(pending_ms).max(0.0);
            let overhead =
                t.job_fixed_ms.max(0.0) + t.job_ms_per_mb.max(0.0) * moved_bytes as f64 / 1e6;
            (
                wait,
                t.rtt_ms.max(0.0) + moved_bytes as f64 / bps * 1000.0,
                if overhead.is_finite() { overhead } else { 0.0 },
            )
        }
        _ => (0.0, 0.0, 0.0),
    };
    let (gpu_load, suffix_prefill) = if cached_tokens == 0 {
        (0.0, 0.0)
    } else {
        cached_path(cached_tokens)
    };
    let kv_raw_ms = if cached_tokens == 0 {
        f64::INFINITY
    } else {
        queue_wait.max(kdn_wait + transfer + kdn_overhead) + gpu_load + suffix_prefill
    };
    // The steps that run this request's prefill run the queued requests' prefills too
    // (chunked prefill batches them), so the GPU time a mode adds over the other is paid
    // once per request sharing them.
    let sharing = if inputs.weigh_others { load.queued } else { 0 };
    let (text_delay_to_others, kv_delay_to_others) = if cached_tokens == 0 {
        (0.0, 0.0)
    } else {
        let kv_gpu = gpu_load + suffix_prefill;
        (
            sharing as f64 * (text_prefill - kv_gpu).max(0.0),
            sharing as f64 * (kv_gpu - text_prefill).max(0.0),
        )
    };
    // Whatever makes the instance slower than predicted for text (its queue, its host)
    // slows KV as much: KV waits in the same queue and runs a step too. Without this a
    // text factor pushed up by a queue the model underestimates made KV look cheaper.
    let text_factor = c.factor(&inputs.instance, InjectionMode::Text);
    let kv_factor = c
        .factor(&inputs.instance, InjectionMode::Kv)
        .max(text_factor);
    let kv_margin = if moved_chunks == 0 || cached_tokens == 0 {
        0.0
    } else {
        KV_MARGIN * kv_factor * (kdn_wait + transfer + kdn_overhead + gpu_load + suffix_prefill)
    };
    AdaptiveTerms {
        queue_wait,
        text_prefill,
        text_cached_tokens,
        text_raw_ms,
        cached_tokens,
        moved_chunks,
        moved_bytes,
        kdn_wait,
        transfer,
        kdn_overhead,
        gpu_load,
        suffix_prefill,
        kv_raw_ms,
        text_factor,
        kv_factor,
        sharing,
        text_delay_to_others,
        kv_delay_to_others,
        kv_margin,
    }
}

// ---------------------------------------------------------------- decision

/// KV that must be moved is chosen only when it is predicted cheaper than text by at
/// least this fraction of its own path's work ([`AdaptiveTerms::kv_margin`]): that path
/// (the KDN, the stores, the link) is what the prediction sees least well, while a text
/// prefill costs what the calibrated model says. Within the margin text is the safer bet.
pub const KV_MARGIN: f64 = 0.15;

/// One injection decision with everything it looked at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InjectionDecision {
    pub strategy: InjectionStrategy,
    pub mode: InjectionMode,
    /// Why (`fixed`, `client_preference`, `no_knowledge`, `no_usable_kv`, `kv_resident`
    /// (nothing to move), `kv_faster`, `text_faster`, `kv_not_clearly_faster` (KV predicted
    /// faster by less than [`AdaptiveTerms::kv_margin`]), `kv_spares_others` (text alone would be faster,
    /// but its prefill would delay the requests sharing its steps by more than it gains),
    /// `hybrid_turn`,
    /// or one of the original's IWS reasons under `iws`).
    pub reason: &'static str,
    /// What the client asked for.
    pub client_preference: InjectionPreference,
    /// The client named a mode and the strategy chose the other.
    pub client_overridden: bool,
    /// The strategy's TTFT prediction for text (iws: `text_total`; otherwise the corrected
    /// adaptive prediction), ms.
    pub predicted_text_ms: f64,
    /// Same for KV (iws: `kvcache_total`, without penalty/margin; INFINITY when no usable
    /// KV — serialised as `null`), ms.
    pub predicted_kv_ms: f64,
    pub inputs: InjectionInputs,
    /// The adaptive predictor's terms (computed under every strategy except `iws`, so the
    /// log can compare fixed choices with what adaptive would have done).
    pub adaptive: Option<AdaptiveTerms>,
    /// The original's terms (under `iws`).
    pub iws: Option<IwsTerms>,
}

impl InjectionDecision {
    /// Which online correction a measured TTFT of this decision teaches, with the raw
    /// prediction to compare it with (`None` outside the adaptive predictor, and for
    /// resident KV). Resident KV compared nothing (both modes find the same chunks), and
    /// its load time depends on the tier the chunks sit in, which the gateway does not
    /// see: learning from it had pulled the KV factor down (moved KV then looked
    /// cheaper than it is) or, taught to text, the text factor.
    pub fn correction_sample(&self) -> Option<(InjectionMode, f64)> {
        let a = self.adaptive.as_ref()?;
        match self.mode {
            InjectionMode::Kv if a.moved_chunks == 0 => None,
            InjectionMode::Kv => Some((InjectionMode::Kv, a.kv_raw_ms)),
            InjectionMode::Text => Some((InjectionMode::Text, a.text_raw_ms)),
        }
    }
}

/// Decide how `inputs`' knowledge reaches its instance.
pub fn decide(
    strategy: InjectionStrategy,
    client: InjectionPreference,
    m: &CostModel,
    inputs: &InjectionInputs,
    corrections: &Corrections,
) -> InjectionDecision {
    let client_mode = match client {
        InjectionPreference::Auto => None,
        InjectionPreference::Text => Some(InjectionMode::Text),
        InjectionPreference::Kv => Some(InjectionMode::Kv),
    };
    let mut adaptive = None;
    let mut iws_t = None;
    let (mode, reason, text_ms, kv_ms) = if strategy == InjectionStrategy::Iws {
        let t = iws_terms(m, inputs);
        let (mode, reason) = iws_choice(inputs, &t);
        iws_t = Some(t);
        (mode, reason, t.text_total, t.kv_total)
    } else {
        let a = adaptive_terms(m, inputs, corrections);
        adaptive = Some(a);
        let text_ms = a.text_raw_ms * a.text_factor;
        let kv_ms = a.kv_raw_ms * a.kv_factor;
        let (mode, reason) = if inputs.knowledge.knowledge_tokens == 0 {
            (InjectionMode::Text, "no_knowledge")
        } else {
            match strategy {
                InjectionStrategy::Text | InjectionStrategy::Kv => {
                    let own = if strategy == InjectionStrategy::Text {
                        InjectionMode::Text
                    } else {
                        InjectionMode::Kv
                    };
                    match client_mode {
                        Some(c) => (c, "client_preference"),
                        None => (own, "fixed"),
                    }
                }
                InjectionStrategy::Hybrid => match client_mode {
                    Some(c) => (c, "client_preference"),
                    None if inputs.turn.is_multiple_of(2) => (InjectionMode::Kv, "hybrid_turn"),
                    None => (InjectionMode::Text, "hybrid_turn"),
                },
                _ => {
                    if !kv_ms.is_finite() {
                        (InjectionMode::Text, "no_usable_kv")
                    } else if a.moved_chunks == 0 {
                        // Nothing to move: the prompt finds the same chunks either way;
                        // KV names them in the handle.
                        (InjectionMode::Kv, "kv_resident")
                    } else if a.kv_cost_ms() + a.kv_margin < a.text_cost_ms() {
                        if kv_ms < text_ms {
                            (InjectionMode::Kv, "kv_faster")
                        } else {
                            (InjectionMode::Kv, "kv_spares_others")
                        }
                    } else if a.kv_cost_ms() < a.text_cost_ms() {
                        (InjectionMode::Text, "kv_not_clearly_faster")
                    } else {
                        (InjectionMode::Text, "text_faster")
                    }
                }
            }
        };
        (mode, reason, text_ms, kv_ms)
    };
    InjectionDecision {
        strategy,
        mode,
        reason,
        client_preference: client,
        client_overridden: client_mode.is_some_and(|c| c != mode),
        predicted_text_ms: text_ms,
        predicted_kv_ms: kv_ms,
        inputs: inputs.clone(),
        adaptive,
        iws: iws_t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P8B: &str = include_str!("../../conf/profiles/h100-llama3-8b.json");

    /// The adaptive predictor's TTFT against every single-request point of a profile:
    /// text mode = a cold prefill of N tokens (`prefill_b1_ms`), KV mode = C resident
    /// knowledge tokens loaded to the GPU plus the prefill of S new tokens
    /// (`cached_prefill_ms` + the measured pinned host-to-device time of C tokens).
    /// Returns (text MAPE %, kv MAPE %, points).
    /// MAPE (%) of the adaptive predictor's text and kv TTFT against the profile's
    /// single-request points: `(in-sample text, in-sample kv, held-out text, held-out
    /// kv, points)`. Held-out: leave-one-out, the model refitted without the point
    /// it then predicts (as `cacheroute calibrate fit` reports per curve).
    fn predictor_mape(profile: &str) -> (f64, f64, f64, f64, usize) {
        use crate::cost_model::CalibrationProfile;
        fn without<T: Clone>(v: &[T], i: usize) -> Vec<T> {
            let mut v = v.to_vec();
            v.remove(i);
            v
        }
        let p = CalibrationProfile::from_json(profile).unwrap();
        let m = CostModel::fit(&p).unwrap();
        let bpt = p.kv_bytes_per_token();
        let (pre, cached, decode, h2d) = (
            p.prefill_points().unwrap(),
            p.cached_points().unwrap(),
            p.decode_points().unwrap(),
            p.h2d_points().unwrap(),
        );
        let pinned: Vec<f64> = h2d.iter().filter(|h| h.pinned).map(|h| h.gbps).collect();
        let h2d_gbps = pinned.iter().sum::<f64>() / pinned.len() as f64;
        let err = |pred: f64, meas: f64| (pred - meas).abs() / meas;
        let (mut text, mut text_loo) = (Vec::new(), Vec::new());
        for (i, pt) in pre.iter().enumerate().filter(|(_, pt)| pt.batch == 1) {
            let loo =
                CostModel::fit_points(bpt, &without(&pre, i), &cached, &decode, &h2d).unwrap();
            let inp = inputs(pt.tokens, 0, None);
            text.push(err(
                adaptive_terms(&m, &inp, &Corrections::new()).text_raw_ms,
                pt.ms,
            ));
            text_loo.push(err(
                adaptive_terms(&loo, &inp, &Corrections::new()).text_raw_ms,
                pt.ms,
            ));
        }
        let (mut kv, mut kv_loo) = (Vec::new(), Vec::new());
        for (i, pt) in cached.iter().enumerate() {
            let loo =
                CostModel::fit_points(bpt, &pre, &without(&cached, i), &decode, &h2d).unwrap();
            let mut inp = inputs(pt.new, pt.cached, None);
            inp.knowledge.resident_chunks = pt.cached / 256;
            inp.knowledge.total_chunks = pt.cached / 256;
            inp.knowledge.kv_bytes_per_token = bpt;
            let meas = pt.ms + (pt.cached * bpt) as f64 / (h2d_gbps * 1e6);
            kv.push(err(
                adaptive_terms(&m, &inp, &Corrections::new()).kv_raw_ms,
                meas,
            ));
            kv_loo.push(err(
                adaptive_terms(&loo, &inp, &Corrections::new()).kv_raw_ms,
                meas,
            ));
        }
        let mape = |v: &[f64]| 100.0 * v.iter().sum::<f64>() / v.len() as f64;
        let n = text.len() + kv.len();
        (mape(&text), mape(&kv), mape(&text_loo), mape(&kv_loo), n)
    }

    #[test]
    fn predictor_mape_on_the_shipped_profiles_is_under_15_percent() {
        for (name, profile) in crate::cost_model::BUILTIN_PROFILES {
            let (text, kv, text_loo, kv_loo, n) = predictor_mape(profile);
            println!(
                "{name}: predicted TTFT MAPE over {n} points: in-sample text {text:.1}%, kv {kv:.1}%; \
                 held-out (leave-one-out) text {text_loo:.1}%, kv {kv_loo:.1}%"
            );
            assert!(
                text < 15.0 && kv < 15.0,
                "{name}: in-sample text {text:.1}%, kv {kv:.1}%"
            );
            // a point left out of the fit is predicted about as well: no overfit
            assert!(
                text_loo < 20.0 && kv_loo < 20.0,
                "{name}: held-out text {text_loo:.1}%, kv {kv_loo:.1}%"
            );
        }
    }

    fn m8b() -> CostModel {
        CostModel::from_profile_json(P8B).unwrap()
    }

    /// A hand-computable model: prefill 0.2 ms/token, nothing else; KV 82,500 B/token so
    /// that 8 Gbit/s at the original's 0.825 efficiency moves a token in 0.1 ms; h2d 8.25
    /// GB/s = 0.01 ms/token.
    fn toy() -> CostModel {
        CostModel {
            prefill_intercept_ms: 0.0,
            prefill_ms_per_token: 0.2,
            prefill_ms_per_pair: 0.0,
            prefill_floor_ms: 0.0,
            cached_ms_per_context_pair: 0.0,
            cached_floor_ms: 0.0,
            decode_intercept_ms: 0.0,
            decode_ms_per_seq: 0.0,
            decode_ms_per_context_token: 0.0,
            h2d_gbps: 8.25,
            kv_bytes_per_token: 82_500,
        }
    }

    fn inputs(p: u64, k: u64, transfer: Option<TransferPath>) -> InjectionInputs {
        InjectionInputs {
            instance: "i0".into(),
            load: InstanceLoad::default(),
            knowledge: KnowledgeShape {
                prompt_tokens: p,
                knowledge_tokens: k,
                chunk_size: 256,
                resident_chunks: 0,
                total_chunks: k / 256,
                kv_bytes_per_token: 0,
            },
            transfer,
            turn: 0,
            store_gbps: 0.0,
            weigh_others: false,
        }
    }

    fn link(gbps: f64) -> TransferPath {
        TransferPath {
            link_gbps: gbps,
            rtt_ms: 1.0,
            ..Default::default()
        }
    }

    fn adaptive(m: &CostModel, i: &InjectionInputs) -> InjectionDecision {
        decide(
            InjectionStrategy::Adaptive,
            InjectionPreference::Auto,
            m,
            i,
            &Corrections::new(),
        )
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    /// IWS worked cases, computed by hand from research §3.9 with the toy model:
    /// text_total = max(busy + rtt + 3, ready) + 0.2·(P+K+36);
    /// kv_total = max(ready, busy + 0.1·eff·(8/gbps)) + 0.01·eff + 0.2·max(1, P+K−eff+36);
    /// kv iff kv_total + 0.5·busy + 100 < text_total.
    #[test]
    fn iws_reproduces_worked_cases() {
        struct Case {
            name: &'static str,
            p: u64,
            k: u64,
            gbps: f64,
            busy: f64,
            queued_tokens: u64,
            text_total: f64,
            kv_total: f64,
            mode: InjectionMode,
            reason: &'static str,
        }
        use InjectionMode::*;
        let cases = [
            // no knowledge: text whatever the numbers
            Case {
                name: "no knowledge",
                p: 12,
                k: 0,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 0.2 * 48.0,
                kv_total: 0.2 * 48.0,
                mode: Text,
                reason: "no_rag_or_empty_knowledge",
            },
            // text = 4 + 0.2·4196 = 843.2; kv = 409.6 + 40.96 + 0.2·100 = 470.56 (+100 < 843.2)
            Case {
                name: "long knowledge, 8 Gbit/s",
                p: 64,
                k: 4096,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 843.2,
                kv_total: 470.56,
                mode: Kv,
                reason: "kvcache_score_better",
            },
            // transfer 8× slower: kv = 3276.8 + 40.96 + 20 = 3337.76 > 843.2
            Case {
                name: "long knowledge, 1 Gbit/s",
                p: 64,
                k: 4096,
                gbps: 1.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 843.2,
                kv_total: 3337.76,
                mode: Text,
                reason: "text_despite_active_kv_wait",
            },
            // link busy 1000: text = 1004 + 839.2 = 1843.2; kv = 1409.6 + 40.96 + 20 =
            // 1470.56, + 0.5·1000 + 100 = 2070.56 ≥ 1843.2 → text (the double count decides)
            Case {
                name: "busy link",
                p: 64,
                k: 4096,
                gbps: 8.0,
                busy: 1000.0,
                queued_tokens: 0,
                text_total: 1843.2,
                kv_total: 1470.56,
                mode: Text,
                reason: "text_due_to_kdn_congestion",
            },
            // queue of 3000 tokens: ready = 600; text = 600 + 839.2 = 1439.2;
            // kv = max(600, 409.6) + 40.96 + 20 = 660.96 → kv, transfer hidden
            Case {
                name: "queued instance hides the transfer",
                p: 64,
                k: 4096,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 3000,
                text_total: 1439.2,
                kv_total: 660.96,
                mode: Kv,
                reason: "kvcache_hidden_and_score_better",
            },
            // text = 4 + 0.2·612 = 126.4; kv = 51.2 + 5.12 + 20 = 76.32 < 126.4 but
            // 76.32 + 100 ≥ 126.4: the margin keeps text
            Case {
                name: "margin",
                p: 64,
                k: 512,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 126.4,
                kv_total: 76.32,
                mode: Text,
                reason: "text_despite_active_kv_wait",
            },
            // eff = 256 of K = 300: text = 4 + 0.2·400 = 84; kv = 25.6 + 2.56 + 0.2·144 = 56.96
            Case {
                name: "partial chunk",
                p: 64,
                k: 300,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 84.0,
                kv_total: 56.96,
                mode: Text,
                reason: "text_despite_active_kv_wait",
            },
            // 8192 tokens at 8 Gbit/s: text = 4 + 0.2·8292 = 1662.4;
            // kv = 819.2 + 81.92 + 0.2·100 = 921.12 → kv
            Case {
                name: "very long knowledge",
                p: 64,
                k: 8192,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 1662.4,
                kv_total: 921.12,
                mode: Kv,
                reason: "kvcache_score_better",
            },
        ];
        let m = toy();
        for c in &cases {
            let mut i = inputs(
                c.p,
                c.k,
                Some(TransferPath {
                    link_gbps: c.gbps,
                    rtt_ms: 1.0,
                    link_busy_ms: c.busy,
                    ..Default::default()
                }),
            );
            if c.queued_tokens > 0 {
                i.load.queued = 1;
                i.load.queued_prefill_tokens = c.queued_tokens;
            }
            if c.k == 0 {
                i.transfer = None;
            }
            let d = decide(
                InjectionStrategy::Iws,
                InjectionPreference::Kv,
                &m,
                &i,
                &Corrections::new(),
            );
            let t = d.iws.unwrap();
            assert!(close(t.text_total, c.text_total), "{}: text {t:?}", c.name);
            if c.k > 0 {
                assert!(close(t.kv_total, c.kv_total), "{}: kv {t:?}", c.name);
            }
            assert_eq!(d.mode, c.mode, "{}: {t:?}", c.name);
            assert_eq!(d.reason, c.reason, "{}", c.name);
            assert_eq!(d.client_overridden, c.mode == Text, "{}", c.name);
            assert!(d.adaptive.is_none());
        }
    }

    /// research §9: the original counts the link wait in `kv_prepare` and again as the 0.5
    /// penalty, and its text path waits on the KV link. Toy model, 3000 queued tokens (600
    /// ms), link busy 1000 ms, P=64, K=4096 at 8 Gbit/s:
    /// iws: text = 1004 + 839.2 = 1843.2 ≤ kv 1470.56 + 500 + 100 → text;
    /// adaptive: text = 600 + 0.2·4160 = 1432; kv = max(600, 1000 + 1 + 337.92 (4096·82,500
    /// B at 1 GB/s)) + 40.96 + 0.2·64 = 1392.68, faster by less than its margin
    /// 0.15·(1000 + 338.92 + 53.76) = 208.9 → text. With the link busy 500 ms: kv = 892.68,
    /// margin 133.9, 1026.6 < 1432 → kv.
    #[test]
    fn adaptive_counts_the_link_wait_once() {
        let m = toy();
        let mut i = inputs(
            64,
            4096,
            Some(TransferPath {
                link_gbps: 8.0,
                rtt_ms: 1.0,
                link_busy_ms: 1000.0,
                ..Default::default()
            }),
        );
        i.load.queued = 1;
        i.load.queued_prefill_tokens = 3000;
        let c = Corrections::new();
        let d = decide(
            InjectionStrategy::Iws,
            InjectionPreference::Auto,
            &m,
            &i,
            &c,
        );
        assert_eq!(
            (d.mode, d.reason),
            (InjectionMode::Text, "text_due_to_kdn_congestion")
        );
        let d = adaptive(&m, &i);
        assert!(close(d.predicted_text_ms, 1432.0), "{d:?}");
        assert!(close(d.predicted_kv_ms, 1392.68), "{d:?}");
        assert!(
            close(d.adaptive.unwrap().kv_margin, 0.15 * 1392.68),
            "{d:?}"
        );
        assert_eq!(
            (d.mode, d.reason),
            (InjectionMode::Text, "kv_not_clearly_faster")
        );
        if let Some(t) = i.transfer.as_mut() {
            t.link_busy_ms = 500.0;
        }
        let d = adaptive(&m, &i);
        assert!(close(d.predicted_kv_ms, 892.68), "{d:?}");
        assert!(close(d.adaptive.unwrap().kv_margin, 0.15 * 892.68), "{d:?}");
        assert_eq!((d.mode, d.reason), (InjectionMode::Kv, "kv_faster"));
    }

    #[test]
    fn iws_with_real_profile_flips_to_kv_for_long_knowledge() {
        // The research's example (P=12, K=3744, rtt 1 ms, 1 Gbit/s) picked text only because
        // the shipped coefficients were zero; with a fitted model a long knowledge on a fast
        // link goes as KV.
        let m = m8b();
        let d = decide(
            InjectionStrategy::Iws,
            InjectionPreference::Auto,
            &m,
            &inputs(12, 16384, Some(link(100.0))),
            &Corrections::new(),
        );
        let t = d.iws.unwrap();
        assert!(t.text_service > 0.0);
        assert_eq!(d.mode, InjectionMode::Kv, "{t:?}");
    }

    #[test]
    fn slow_link_means_text_fast_link_long_knowledge_means_kv() {
        let m = m8b();
        let slow = adaptive(&m, &inputs(64, 8192, Some(link(0.1))));
        assert_eq!(slow.mode, InjectionMode::Text, "{slow:?}");
        assert_eq!(slow.reason, "text_faster");
        let fast = adaptive(&m, &inputs(64, 8192, Some(link(400.0))));
        assert_eq!(fast.mode, InjectionMode::Kv, "{fast:?}");
        assert_eq!(fast.reason, "kv_faster");
    }

    /// A link where KV loses on an idle instance but wins once a queue hides the transfer.
    #[test]
    fn long_queue_hides_the_transfer() {
        let m = m8b();
        let mut i = inputs(64, 8192, Some(link(400.0)));
        // a link on which the transfer takes twice the text prefill
        let a = adaptive(&m, &i).adaptive.unwrap();
        let gbps = a.moved_bytes as f64 * 8.0 / (2.0 * a.text_raw_ms * 1e6);
        i.transfer = Some(link(gbps));
        let idle = adaptive(&m, &i);
        assert_eq!(idle.mode, InjectionMode::Text);
        let a = idle.adaptive.unwrap();
        assert!(a.transfer > a.text_raw_ms - a.queue_wait - a.gpu_load - a.suffix_prefill);
        // a queue longer than the transfer
        i.load.queued = 4;
        i.load.queued_prefill_tokens = 4 * 16384;
        let queued = adaptive(&m, &i);
        let q = queued.adaptive.unwrap();
        assert!(q.queue_wait > q.kdn_wait + q.transfer, "{q:?}");
        assert_eq!(queued.mode, InjectionMode::Kv, "{queued:?}");
        // the queue is counted once in each mode
        assert!(close(q.text_raw_ms, q.queue_wait + q.text_prefill));
        assert!(close(
            q.kv_raw_ms,
            q.queue_wait + q.gpu_load + q.suffix_prefill
        ));
    }

    #[test]
    fn running_batch_slows_both_modes() {
        let m = m8b();
        let mut i = inputs(64, 4096, Some(link(100.0)));
        let a0 = adaptive(&m, &i).adaptive.unwrap();
        i.load.running = 64;
        i.load.running_context_tokens = 64 * 4096;
        let a1 = adaptive(&m, &i).adaptive.unwrap();
        assert!(a1.queue_wait > a0.queue_wait);
        assert!(a1.text_raw_ms > a0.text_raw_ms);
        assert!(a1.suffix_prefill >= a0.suffix_prefill);
    }

    #[test]
    fn resident_kv_is_free_to_move() {
        let m = m8b();
        let mut i = inputs(64, 8192, Some(link(0.01)));
        assert_eq!(adaptive(&m, &i).mode, InjectionMode::Text);
        i.knowledge.resident_chunks = i.knowledge.total_chunks;
        let d = adaptive(&m, &i);
        let a = d.adaptive.unwrap();
        assert_eq!(a.moved_chunks, 0);
        assert_eq!(a.transfer, 0.0);
        assert_eq!(d.mode, InjectionMode::Kv, "{d:?}");
        // even without any KDN path
        i.transfer = None;
        assert_eq!(adaptive(&m, &i).mode, InjectionMode::Kv);
        // partial residency: fewer bytes to move
        i.transfer = Some(link(10.0));
        i.knowledge.resident_chunks = i.knowledge.total_chunks / 2;
        let half = adaptive(&m, &i).adaptive.unwrap();
        i.knowledge.resident_chunks = 0;
        let none = adaptive(&m, &i).adaptive.unwrap();
        assert_eq!(half.moved_bytes * 2, none.moved_bytes);
        assert!(half.transfer < none.transfer);
    }

    #[test]
    fn kdn_backlog_means_text() {
        let m = m8b();
        let mut i = inputs(64, 8192, Some(link(400.0)));
        assert_eq!(adaptive(&m, &i).mode, InjectionMode::Kv);
        // reported queue delay
        i.transfer.as_mut().unwrap().kdn_queue_ms = 5000.0;
        let d = adaptive(&m, &i);
        assert_eq!(d.mode, InjectionMode::Text, "{d:?}");
        assert!(close(d.adaptive.unwrap().kdn_wait, 5000.0));
        // pending jobs at a reported throughput
        let t = i.transfer.as_mut().unwrap();
        t.kdn_queue_ms = 0.0;
        t.kdn_pending = 50;
        t.kdn_bytes_per_sec = 2e9;
        assert_eq!(adaptive(&m, &i).mode, InjectionMode::Text);
        // a slow KDN caps the transfer rate below the link
        let t = i.transfer.as_mut().unwrap();
        t.kdn_pending = 0;
        t.kdn_bytes_per_sec = 1e7;
        let d = adaptive(&m, &i);
        assert_eq!(d.mode, InjectionMode::Text, "{d:?}");
        // our own link backlog counts too, once
        let t = i.transfer.as_mut().unwrap();
        t.kdn_bytes_per_sec = 0.0;
        t.link_busy_ms = 3000.0;
        t.kdn_queue_ms = 3000.0;
        let a = adaptive(&m, &i).adaptive.unwrap();
        assert!(close(a.kdn_wait, 3000.0));
    }

    #[test]
    fn no_knowledge_or_no_usable_kv_means_text() {
        let m = m8b();
        let d = adaptive(&m, &inputs(64, 0, Some(link(100.0))));
        assert_eq!((d.mode, d.reason), (InjectionMode::Text, "no_knowledge"));
        let d = adaptive(&m, &inputs(64, 4096, None));
        assert_eq!((d.mode, d.reason), (InjectionMode::Text, "no_usable_kv"));
        assert!(d.predicted_kv_ms.is_infinite());
        let d = adaptive(&m, &inputs(64, 4096, Some(link(0.0))));
        assert_eq!(d.reason, "no_usable_kv");
        // knowledge shorter than a chunk: nothing cacheable
        let d = adaptive(&m, &inputs(64, 200, Some(link(100.0))));
        assert_eq!(d.reason, "no_usable_kv");
        // the decision serialises (infinite → null)
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["predicted_kv_ms"], serde_json::Value::Null);
        assert_eq!(v["strategy"], "adaptive");
        assert_eq!(v["mode"], "text");
    }

    #[test]
    fn corrections_move_predictions() {
        let m = m8b();
        let i = inputs(64, 8192, Some(link(400.0)));
        let mut c = Corrections::new();
        let d0 = adaptive(&m, &i);
        assert_eq!(d0.mode, InjectionMode::Kv);
        let a = d0.adaptive.unwrap();
        // KV keeps coming in 4× slower than predicted
        for _ in 0..30 {
            c.observe("i0", InjectionMode::Kv, a.kv_raw_ms, a.kv_raw_ms * 4.0);
        }
        assert!(c.factor("i0", InjectionMode::Kv) > 3.5);
        assert!(c.factor("i0", InjectionMode::Kv) <= CORRECTION_MAX);
        assert_eq!(c.factor("i0", InjectionMode::Text), 1.0);
        assert_eq!(c.factor("other", InjectionMode::Kv), 1.0);
        let d1 = decide(
            InjectionStrategy::Adaptive,
            InjectionPreference::Auto,
            &m,
            &i,
            &c,
        );
        assert!(d1.predicted_kv_ms > d0.predicted_kv_ms * 3.5);
        assert_eq!(d1.mode, InjectionMode::Text, "{d1:?}");
        // text faster than predicted pushes the same way; bounded below
        for _ in 0..50 {
            c.observe("i0", InjectionMode::Text, 100.0, 1.0);
        }
        let f = c.factor("i0", InjectionMode::Text);
        assert!((CORRECTION_MIN..CORRECTION_MIN + 0.01).contains(&f), "{f}");
        // garbage is ignored
        let f = c.factor("i0", InjectionMode::Text);
        assert_eq!(c.observe("i0", InjectionMode::Text, 0.0, 5.0), f);
        assert_eq!(c.observe("i0", InjectionMode::Text, 5.0, f64::NAN), f);
        c.forget("i0");
        assert_eq!(c.factor("i0", InjectionMode::Kv), 1.0);
        // one observation moves by alpha from 1
        c.observe("i1", InjectionMode::Kv, 100.0, 200.0);
        assert!(close(
            c.factor("i1", InjectionMode::Kv),
            1.0 + CORRECTION_ALPHA
        ));
    }

    /// A text prefill that would be faster alone loses on a busy instance: the requests
    /// prefilling beside it pay its extra step time.
    #[test]
    fn text_prefill_costs_the_requests_sharing_its_steps() {
        let m = m8b();
        let mut i = inputs(64, 8192, Some(link(400.0)));
        i.weigh_others = true;
        i.load.queued = 3;
        i.load.queued_prefill_tokens = 3;
        // a link on which KV alone is 1 ms slower than text
        let a = adaptive(&m, &i).adaptive.unwrap();
        let transfer = a.text_raw_ms + 1.0 - a.gpu_load - a.suffix_prefill;
        assert!(transfer > a.queue_wait, "the transfer is not hidden: {a:?}");
        let gbps = a.moved_bytes as f64 * 8.0 / ((transfer - 1.0) * 1e6);
        i.transfer = Some(link(gbps));
        let busy = adaptive(&m, &i);
        let b = busy.adaptive.unwrap();
        assert!(close(b.kv_raw_ms, b.text_raw_ms + 1.0), "{b:?}");
        assert_eq!(b.sharing, 3);
        let extra = b.text_prefill - b.gpu_load - b.suffix_prefill;
        assert!(close(b.text_delay_to_others, 3.0 * extra), "{b:?}");
        assert_eq!(b.kv_delay_to_others, 0.0);
        assert_eq!(
            (busy.mode, busy.reason),
            (InjectionMode::Kv, "kv_spares_others")
        );
        // the predictions stay each mode's own TTFT
        assert!(busy.predicted_kv_ms > busy.predicted_text_ms);
        // nobody beside it: its own TTFT decides
        i.load.queued = 0;
        i.load.queued_prefill_tokens = 0;
        let idle = adaptive(&m, &i);
        assert_eq!(idle.adaptive.unwrap().text_delay_to_others, 0.0);
        assert_eq!(
            (idle.mode, idle.reason),
            (InjectionMode::Text, "text_faster")
        );
        // off (the default): the busy instance decides on its own TTFT
        i.load.queued = 3;
        i.load.queued_prefill_tokens = 3;
        i.weigh_others = false;
        let off = adaptive(&m, &i);
        assert_eq!(off.adaptive.unwrap().text_delay_to_others, 0.0);
        assert_eq!(off.mode, InjectionMode::Text);
    }

    /// Chunks resident in the instance's store serve a text prompt too (LMCache looks
    /// every prompt up): both modes cost the same, and KV names what is reused.
    #[test]
    fn resident_chunks_serve_text_too() {
        let m = m8b();
        let mut i = inputs(64, 4096, Some(link(400.0)));
        i.knowledge.resident_chunks = 16;
        i.store_gbps = 100.0;
        let d = adaptive(&m, &i);
        let a = d.adaptive.unwrap();
        assert_eq!(a.text_cached_tokens, 4096);
        assert!(close(a.text_raw_ms, a.kv_raw_ms), "{a:?}");
        assert!(a.text_prefill < m.prefill_ms(4160), "{a:?}");
        assert_eq!(a.kv_margin, 0.0);
        assert_eq!((d.mode, d.reason), (InjectionMode::Kv, "kv_resident"));
        // a partial chunk is never resident
        i.knowledge.knowledge_tokens = 4000;
        i.knowledge.resident_chunks = 16;
        let a = adaptive(&m, &i).adaptive.unwrap();
        assert_eq!(a.text_cached_tokens, 15 * 256);
    }

    /// What the KDN adds to a job (learned from its finished jobs) is part of the KV
    /// path: a KDN slow enough per job makes text win where the link alone would not.
    #[test]
    fn learned_kdn_overhead_makes_kv_lose() {
        let m = m8b();
        let mut i = inputs(64, 4096, Some(link(400.0)));
        let fast = adaptive(&m, &i);
        assert_eq!(fast.mode, InjectionMode::Kv, "{fast:?}");
        assert_eq!(fast.adaptive.unwrap().kdn_overhead, 0.0);
        let gap = fast.predicted_text_ms - fast.predicted_kv_ms;
        if let Some(t) = i.transfer.as_mut() {
            t.job_fixed_ms = gap;
            t.job_ms_per_mb = 0.01;
        }
        let slow = adaptive(&m, &i);
        let a = slow.adaptive.unwrap();
        let mb = a.moved_bytes as f64 / 1e6;
        assert!(close(a.kdn_overhead, gap + 0.01 * mb), "{a:?}");
        assert!(close(
            slow.predicted_kv_ms,
            fast.predicted_kv_ms + a.kdn_overhead
        ));
        assert_eq!(
            (slow.mode, slow.reason),
            (InjectionMode::Text, "text_faster")
        );
        // nothing to move: no job, no overhead
        i.knowledge.resident_chunks = 16;
        assert_eq!(adaptive(&m, &i).adaptive.unwrap().kdn_overhead, 0.0);
    }

    /// A text factor above KV's lifts KV's too: a slow instance is slow in both modes.
    #[test]
    fn kv_is_corrected_at_least_as_much_as_text() {
        let m = m8b();
        let i = inputs(64, 4096, Some(link(400.0)));
        let mut c = Corrections::new();
        for _ in 0..20 {
            c.observe("i0", InjectionMode::Text, 100.0, 300.0);
        }
        let d = decide(
            InjectionStrategy::Adaptive,
            InjectionPreference::Auto,
            &m,
            &i,
            &c,
        );
        let a = d.adaptive.unwrap();
        assert!(a.text_factor > 2.5, "{a:?}");
        assert_eq!(a.kv_factor, a.text_factor);
        // the same choice as with no correction at all
        assert_eq!(d.mode, adaptive(&m, &i).mode);
        // a KV factor below 1 does not drop KV under text's either
        let mut c = Corrections::new();
        c.observe("i0", InjectionMode::Kv, 100.0, 30.0);
        let a = adaptive_terms(&m, &i, &c);
        assert_eq!(a.kv_factor, 1.0);
    }

    /// Resident KV teaches no correction; moved KV the KV factor.
    #[test]
    fn only_moved_kv_corrects_kv() {
        let m = m8b();
        let mut i = inputs(64, 4096, Some(link(400.0)));
        let moved = adaptive(&m, &i);
        assert_eq!(moved.mode, InjectionMode::Kv);
        let raw = moved.adaptive.unwrap().kv_raw_ms;
        assert_eq!(moved.correction_sample(), Some((InjectionMode::Kv, raw)));
        i.knowledge.resident_chunks = 16;
        let resident = adaptive(&m, &i);
        assert_eq!(resident.reason, "kv_resident");
        assert_eq!(resident.correction_sample(), None);
        let iws = decide(
            InjectionStrategy::Iws,
            InjectionPreference::Auto,
            &m,
            &i,
            &Corrections::new(),
        );
        assert_eq!(iws.correction_sample(), None);
    }

    /// A remote store's link is paid on every KV load: slow enough, and text wins.
    #[test]
    fn a_slow_store_link_makes_kv_loads_cost() {
        let m = m8b();
        let mut i = inputs(64, 4096, Some(link(400.0)));
        let local = adaptive(&m, &i);
        assert_eq!(local.mode, InjectionMode::Kv, "{local:?}");
        let bytes = 4096 * m.kv_bytes_per_token;
        i.store_gbps = 10.0;
        let remote = adaptive(&m, &i);
        let (a, b) = (local.adaptive.unwrap(), remote.adaptive.unwrap());
        let link_ms = bytes as f64 * 8.0 / 10e9 * 1000.0;
        assert!(close(b.gpu_load - a.gpu_load, link_ms), "{a:?} {b:?}");
        assert_eq!(remote.mode, InjectionMode::Text, "{remote:?}");
    }

    #[test]
    fn hybrid_alternates_and_follows_the_client() {
        let m = m8b();
        let c = Corrections::new();
        let mut i = inputs(64, 4096, Some(link(0.01)));
        let modes: Vec<_> = (0..4)
            .map(|turn| {
                i.turn = turn;
                let d = decide(
                    InjectionStrategy::Hybrid,
                    InjectionPreference::Auto,
                    &m,
                    &i,
                    &c,
                );
                assert_eq!(d.reason, "hybrid_turn");
                d.mode
            })
            .collect();
        use InjectionMode::{Kv, Text};
        assert_eq!(modes, [Kv, Text, Kv, Text]);
        let d = decide(
            InjectionStrategy::Hybrid,
            InjectionPreference::Text,
            &m,
            &i,
            &c,
        );
        assert_eq!((d.mode, d.reason), (Text, "client_preference"));
    }

    #[test]
    fn fixed_strategies_follow_the_client() {
        let m = m8b();
        let i = inputs(64, 4096, Some(link(0.01)));
        let c = Corrections::new();
        use InjectionPreference as P;
        use InjectionStrategy as S;
        for (s, p, mode, reason) in [
            (S::Text, P::Auto, InjectionMode::Text, "fixed"),
            (S::Text, P::Kv, InjectionMode::Kv, "client_preference"),
            (S::Kv, P::Auto, InjectionMode::Kv, "fixed"),
            (S::Kv, P::Text, InjectionMode::Text, "client_preference"),
        ] {
            let d = decide(s, p, &m, &i, &c);
            assert_eq!((d.mode, d.reason), (mode, reason), "{s:?} {p:?}");
            assert!(!d.client_overridden);
            assert!(
                d.adaptive.is_some(),
                "predictions logged for fixed strategies"
            );
        }
        // iws and adaptive override the client
        let d = decide(S::Adaptive, P::Kv, &m, &i, &c);
        assert_eq!(d.mode, InjectionMode::Text);
        assert!(d.client_overridden);
        let fast = inputs(64, 16384, Some(link(400.0)));
        let d = decide(S::Iws, P::Text, &m, &fast, &c);
        assert_eq!(d.mode, InjectionMode::Kv);
        assert!(d.client_overridden);
    }

    #[test]
    fn strategy_serde() {
        for (s, name) in [
            (InjectionStrategy::Text, "\"text\""),
            (InjectionStrategy::Kv, "\"kv\""),
            (InjectionStrategy::Hybrid, "\"hybrid\""),
            (InjectionStrategy::Iws, "\"iws\""),
            (InjectionStrategy::Adaptive, "\"adaptive\""),
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), name);
            assert_eq!(serde_json::from_str::<InjectionStrategy>(name).unwrap(), s);
            assert_eq!(format!("\"{}\"", s.as_str()), name);
        }
        assert_eq!(InjectionStrategy::default(), InjectionStrategy::Adaptive);
        let c = {
            let mut c = Corrections::new();
            c.observe("a", InjectionMode::Kv, 1.0, 2.0);
            c
        };
        let back: Corrections = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
