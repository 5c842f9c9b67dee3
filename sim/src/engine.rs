//! The simulated engine: a continuous-batching scheduler like vLLM's (v1), driven by a
//! virtual clock, and the tokio task that paces it in (scaled) real time.
//!
//! [`Scheduler`] is plain logic over a virtual clock (milliseconds of simulated GPU time),
//! so it can be tested without sleeping. Each step:
//!
//! 1. every running sequence gets its next tokens in admission order: a decoding sequence 1
//!    token, a sequence still in prefill a chunk of `min(remaining, budget)` tokens, where
//!    the budget starts at `max_num_batched_tokens` (chunked prefill; decode tokens count 1);
//! 2. while budget is left and fewer than `max_num_seqs` run, waiting sequences are admitted
//!    in FIFO order with their first chunk. At admission the sequence's cached prefix is
//!    decided: the GPU prefix cache ([`crate::apc`], vLLM's APC) gives the longest run of
//!    leading cached blocks, LMCache (looked up at submission, [`ExternalHit`]) its
//!    contiguous chunks; the sequence starts with the longer of the two computed. The GPU
//!    part costs nothing extra; what LMCache supplies beyond it costs the step
//!    `h2d_ms(bytes)` (CPU tier) or `h2d_ms(bytes)` plus `bytes` over the store link
//!    (remote store, `--kv-store-gbps`);
//! 3. KV blocks (16 tokens) come from the [`BlockPool`](crate::apc::BlockPool) for every
//!    computed token (full prompt blocks are cached as they are allocated); when a running
//!    sequence cannot grow, the most recently admitted one is preempted (recompute: its
//!    blocks are freed, staying cached, and it goes back to the front of the queue), as
//!    vLLM does;
//! 4. the step lasts `CostModel::step_cost(shape) + load time`; at its end a sequence whose
//!    computed tokens reach its length samples one token (the first one at the end of the
//!    step that finishes its prefill: its TTFT).

use crate::apc::{ApcStats, BlockId, BlockPool};
use crate::metrics::SimMetrics;
use cacheroute_decisions::cost_model::{CostModel, StepShape};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

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

#[derive(Debug, Clone)]
struct Seq {
    spec: SeqSpec,
    num_computed: u64,
    generated: u64,
    /// KV blocks held, in token order.
    table: Vec<BlockId>,
    /// Leading blocks of `table` already registered in the prefix cache.
    cached_upto: usize,
    /// Cached prefix as decided at the first admission (what the response reports).
    split: Option<CachedSplit>,
    first_token_ms: Option<f64>,
    scheduled_ms: Option<f64>,
}

impl Seq {
    fn num_tokens(&self) -> u64 {
        self.spec.prompt_tokens + self.generated
    }
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
    /// Of those, tokens that came over the remote store's link.
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

/// Continuous-batching scheduler over a virtual clock.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    cost: CostModel,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    pool: BlockPool,
    pub preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, cost: CostModel) -> Scheduler {
        Scheduler {
            cfg,
            cost,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pool: BlockPool::new(cfg.num_gpu_blocks, cfg.enable_prefix_caching),
            preemptions: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn cost(&self) -> &CostModel {
        &self.cost
    }

    /// Queue a request. Requests that can never fit the KV cache must be refused before.
    pub fn add(&mut self, spec: SeqSpec) {
        let mut spec = spec;
        spec.max_tokens = spec.max_tokens.max(1);
        spec.prompt_tokens = spec.prompt_tokens.max(1);
        self.waiting.push_back(Seq {
            spec,
            num_computed: 0,
            generated: 0,
            table: Vec::new(),
            cached_upto: 0,
            split: None,
            first_token_ms: None,
            scheduled_ms: None,
        });
    }

    /// Drop a request (client gone). Returns whether it was known.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(i) = self.running.iter().position(|s| s.spec.id == id) {
            let s = self.running.remove(i);
            self.pool.free(&s.table);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|s| s.spec.id == id) {
            self.waiting.remove(i);
            return true;
        }
        false
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Fraction of KV blocks in use (vLLM's `gpu_cache_usage_perc`, 0..1).
    pub fn kv_usage(&self) -> f64 {
        if self.pool.num_blocks() == 0 {
            0.0
        } else {
            self.pool.num_used() as f64 / self.pool.num_blocks() as f64
        }
    }

    /// The GPU prefix cache's sizes and counters.
    pub fn apc_stats(&self) -> ApcStats {
        self.pool.stats()
    }

    /// Transfer time of `bytes` over the remote store's link (0 when it is free).
    pub fn link_ms(&self, bytes: u64) -> f64 {
        let gbps = self.cfg.kv_store_gbps;
        if gbps.is_finite() && gbps > 0.0 {
            bytes as f64 / (gbps * 1e9 / 8.0) * 1000.0
        } else {
            0.0
        }
    }

    /// Tokens whose KV the running sequences hold.
    pub fn kv_tokens(&self) -> u64 {
        self.running.iter().map(|s| s.num_computed).sum()
    }

    /// Ids of all known sequences (running then waiting).
    pub fn ids(&self) -> Vec<u64> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .map(|s| s.spec.id)
            .collect()
    }

    fn blocks_for(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.cfg.block_size)
    }

    /// Register the full prompt blocks of running sequence `i` within its first `upto`
    /// tokens in the prefix cache.
    fn cache_blocks(&mut self, i: usize, upto: u64) {
        let s = &mut self.running[i];
        let full = (upto.min(s.spec.prompt_tokens) / self.cfg.block_size) as usize;
        let full = full.min(s.spec.block_hashes.len()).min(s.table.len());
        for j in s.cached_upto..full {
            self.pool.cache(s.table[j], s.spec.block_hashes[j]);
        }
        s.cached_upto = s.cached_upto.max(full);
    }

    fn preempt_last(&mut self) -> u64 {
        let mut s = self.running.pop().expect("something to preempt");
        self.pool.free(&s.table);
        s.table.clear();
        s.cached_upto = 0;
        s.num_computed = 0;
        self.preemptions += 1;
        let id = s.spec.id;
        self.waiting.push_front(s);
        id
    }

    /// Plan the next step at virtual time `now_ms`. An empty plan means nothing can run.
    pub fn schedule(&mut self, now_ms: f64) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens.max(1);
        // 1. running sequences, in admission order
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let n = (s.num_tokens() - s.num_computed).min(budget);
            let need = self
                .blocks_for(s.num_computed + n)
                .saturating_sub(s.table.len() as u64);
            let mut self_preempted = false;
            while need > self.pool.num_free() {
                let last = self.running.len() - 1;
                plan.preempted.push(self.preempt_last());
                if last == i {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            let new = self.pool.allocate(need).expect("checked free blocks");
            let s = &mut self.running[i];
            s.table.extend(new);
            let upto = s.num_computed + n;
            let decoding = s.generated > 0 && n == 1 && s.num_computed + 1 == s.num_tokens();
            if decoding {
                plan.shape.add_decode(s.num_computed);
            } else {
                plan.shape.add_prefill(s.num_computed, n);
            }
            plan.scheduled.push((s.spec.id, n));
            self.cache_blocks(i, upto);
            budget -= n;
            i += 1;
        }
        // 2. admit waiting sequences (FIFO) while there is budget and room
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs && plan.preempted.is_empty()
        {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let prompt = front.spec.prompt_tokens;
            // the cached prefix: GPU blocks first, then LMCache's chunks; at least the last
            // prompt token is always computed (vLLM caps both hits at prompt − 1)
            let max_blocks = ((prompt - 1) / self.cfg.block_size) as usize;
            let hit = self.pool.lookup(&front.spec.block_hashes, max_blocks);
            let gpu = hit.len() as u64 * self.cfg.block_size;
            let ext = front
                .spec
                .external
                .as_ref()
                .map_or(0, |e| e.tokens())
                .min(prompt - 1);
            let start = gpu.max(ext);
            let n = (front.num_tokens() - start).min(budget);
            let new_blocks = self.blocks_for(start + n) - hit.len() as u64;
            // taking unpinned hit blocks out of the free queue counts against the room
            if new_blocks + self.pool.num_unpinned(&hit) > self.pool.num_free() {
                break;
            }
            let (split, chunks) = CachedSplit::of(gpu, front.spec.external.as_deref(), start);
            let mut s = self.waiting.pop_front().expect("front exists");
            self.pool.touch(&hit);
            s.table = hit;
            s.table
                .extend(self.pool.allocate(new_blocks).expect("checked free blocks"));
            s.cached_upto = 0;
            s.num_computed = start;
            s.split.get_or_insert(split);
            s.scheduled_ms.get_or_insert(now_ms);
            plan.admitted.push(Admission {
                id: s.spec.id,
                prompt_tokens: prompt,
                split,
                apc: self.pool.enabled(),
                external: s.spec.external.is_some(),
                keys_loaded: chunks * s.spec.external.as_ref().map_or(0, |e| e.keys_per_chunk),
            });
            plan.loaded_tokens += split.cpu + split.remote;
            plan.remote_tokens += split.remote;
            plan.shape.add_prefill(start, n);
            plan.scheduled.push((s.spec.id, n));
            budget -= n;
            self.running.push(s);
            let last = self.running.len() - 1;
            self.cache_blocks(last, start + n);
        }
        plan.compute_ms = self.cost.step_cost(&plan.shape);
        plan.load_ms = if plan.loaded_tokens > 0 {
            self.cost.h2d_ms(self.cost.kv_bytes(plan.loaded_tokens))
                + self.link_ms(self.cost.kv_bytes(plan.remote_tokens))
        } else {
            0.0
        };
        plan
    }

    /// Apply a planned step that ended at virtual time `end_ms`; returns sampled tokens.
    pub fn complete(&mut self, plan: &StepPlan, end_ms: f64) -> Vec<SeqEvent> {
        let mut events = Vec::new();
        let mut finished = Vec::new();
        for &(id, n) in &plan.scheduled {
            let Some(s) = self.running.iter_mut().find(|s| s.spec.id == id) else {
                continue; // aborted during the step
            };
            s.num_computed += n;
            if s.num_computed < s.num_tokens() {
                continue; // prefill chunk, more to go
            }
            s.generated += 1;
            let first = *s.first_token_ms.get_or_insert(end_ms);
            let done = s.generated >= s.spec.max_tokens;
            events.push(SeqEvent {
                id,
                index: s.generated - 1,
                finished: done,
                since_arrival_ms: end_ms - s.spec.arrival_ms,
                ttft_ms: first - s.spec.arrival_ms,
                queue_ms: s.scheduled_ms.unwrap_or(end_ms) - s.spec.arrival_ms,
                cached: s.split.unwrap_or_default(),
            });
            if done {
                finished.push(id);
            }
        }
        for id in finished {
            self.abort(id);
        }
        events
    }
}

/// Engine counters, for `/debug/engine` and tests.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineStats {
    /// Simulated time (ms) of the engine clock.
    pub virtual_now_ms: f64,
    /// Steps run.
    pub steps: u64,
    /// Simulated ms spent in steps.
    pub busy_ms: f64,
    /// Largest number of sequences in one step.
    pub max_batch: usize,
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    pub completed: u64,
    pub aborted: u64,
    pub preemptions: u64,
    /// The GPU prefix cache (blocks in use, cached, evicted).
    pub apc: ApcStats,
    /// Cached prompt tokens supplied at admission, by tier (a re-admitted preempted
    /// sequence counts again).
    pub cached_tokens: CachedSplit,
    /// Simulated ms of forward time spent on prefill (see [`StepPlan::prefill_compute_ms`]).
    pub prefill_ms: f64,
    /// Simulated ms spent loading LMCache hits (host-to-device and the store link).
    pub load_ms: f64,
}

/// Count an admission in the prefix-cache metrics (vLLM's names and the sim's per tier).
pub fn record_admission(metrics: &SimMetrics, a: &Admission) {
    if a.apc {
        metrics.prefix_cache_queries.inc_by(a.prompt_tokens);
        metrics.prefix_cache_hits.inc_by(a.split.gpu);
    }
    if a.external {
        metrics
            .external_prefix_cache_queries
            .inc_by(a.prompt_tokens);
        metrics
            .external_prefix_cache_hits
            .inc_by(a.split.cpu + a.split.remote);
        metrics.lmcache_chunks_loaded.inc_by(a.keys_loaded);
    }
    for (tier, n) in [
        ("gpu", a.split.gpu),
        ("cpu", a.split.cpu),
        ("remote", a.split.remote),
    ] {
        metrics.cached_tokens.with_label_values(&[tier]).inc_by(n);
    }
}

/// A request handed to the engine task.
pub struct Submit {
    pub prompt_tokens: u64,
    /// See [`SeqSpec::block_hashes`].
    pub block_hashes: Arc<[u64]>,
    /// See [`SeqSpec::external`].
    pub external: Option<Arc<ExternalHit>>,
    pub max_tokens: u64,
    /// `finished_reason` label for `vllm:request_success_total`.
    pub finish_reason: &'static str,
    /// Where sampled tokens go; dropping the receiver aborts the request.
    pub events: mpsc::UnboundedSender<SeqEvent>,
}

/// Handle on a running engine task.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<(Submit, Instant)>,
    pub stats: Arc<Mutex<EngineStats>>,
}

impl EngineHandle {
    /// Start the engine task on the current tokio runtime. It ends when every handle is gone.
    pub fn spawn(sched: Scheduler, time_scale: f64, metrics: Arc<SimMetrics>) -> EngineHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        tokio::spawn(engine_loop(sched, rx, time_scale, metrics, stats.clone()));
        EngineHandle { tx, stats }
    }

    /// Queue a request; returns false when the engine is gone.
    pub fn submit(&self, s: Submit) -> bool {
        self.tx.send((s, Instant::now())).is_ok()
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().expect("stats lock").clone()
    }
}

struct Client {
    events: mpsc::UnboundedSender<SeqEvent>,
    finish_reason: &'static str,
}

async fn engine_loop(
    mut sched: Scheduler,
    mut rx: mpsc::UnboundedReceiver<(Submit, Instant)>,
    time_scale: f64,
    metrics: Arc<SimMetrics>,
    stats: Arc<Mutex<EngineStats>>,
) {
    let scale = if time_scale.is_finite() && time_scale > 0.0 {
        time_scale
    } else {
        1.0
    };
    let mut next_id: u64 = 0;
    let mut clients: HashMap<u64, Client> = HashMap::new();
    // virtual clock: at wall time anchor.0 the virtual time was anchor.1
    let mut anchor = (Instant::now(), 0.0f64);
    let mut vnow = 0.0f64;
    let mut last_deadline: Option<Instant> = None;
    let mut st = EngineStats::default();

    let v_at = |anchor: (Instant, f64), t: Instant| -> f64 {
        anchor.1 + t.saturating_duration_since(anchor.0).as_secs_f64() * 1000.0 * scale
    };

    loop {
        if sched.is_idle() {
            last_deadline = None;
            let Some(first) = rx.recv().await else {
                return;
            };
            let now = Instant::now();
            vnow = vnow.max(v_at(anchor, now));
            anchor = (now, vnow);
            let mut pending = vec![first];
            while let Ok(x) = rx.try_recv() {
                pending.push(x);
            }
            for (s, at) in pending {
                admit(
                    &mut sched,
                    &mut clients,
                    &mut next_id,
                    s,
                    v_at(anchor, at).min(vnow),
                );
            }
        } else {
            while let Ok((s, at)) = rx.try_recv() {
                let arrival = v_at(anchor, at).min(vnow);
                admit(&mut sched, &mut clients, &mut next_id, s, arrival);
            }
        }
        // abort requests whose client went away
        clients.retain(|id, c| {
            if c.events.is_closed() {
                sched.abort(*id);
                st.aborted += 1;
                false
            } else {
                true
            }
        });
        if sched.is_idle() {
            publish(&sched, &metrics, &stats, &mut st, vnow);
            continue;
        }

        let plan = sched.schedule(vnow);
        if plan.scheduled.is_empty() {
            // nothing fits (cannot happen with requests checked against the KV capacity):
            // refuse the head of the queue rather than spin
            if let Some(id) = sched.ids().into_iter().next() {
                sched.abort(id);
                clients.remove(&id);
                st.aborted += 1;
            }
            continue;
        }
        let dur_ms = plan.duration_ms();
        let now = Instant::now();
        // pace steps back to back on wall deadlines so timer granularity does not add up;
        // after a long stall (over 50 ms late) start afresh from now
        let base = match last_deadline {
            Some(d) if now.saturating_duration_since(d) < Duration::from_millis(50) => d,
            _ => now,
        };
        // arrivals during this step map onto it: v = vnow + (t - base) * scale
        anchor = (base, vnow);
        let deadline = base + Duration::from_secs_f64(dur_ms / 1000.0 / scale);
        publish(&sched, &metrics, &stats, &mut st, vnow);
        if deadline > Instant::now() {
            tokio::time::sleep_until(deadline.into()).await;
        } else {
            tokio::task::yield_now().await;
        }
        last_deadline = Some(deadline);
        vnow += dur_ms;
        st.steps += 1;
        st.busy_ms += dur_ms;
        st.max_batch = st.max_batch.max(plan.scheduled.len());
        st.preemptions = sched.preemptions;
        for a in &plan.admitted {
            record_admission(&metrics, a);
            st.cached_tokens.gpu += a.split.gpu;
            st.cached_tokens.cpu += a.split.cpu;
            st.cached_tokens.remote += a.split.remote;
        }
        let prefill_ms = plan.prefill_compute_ms();
        st.prefill_ms += prefill_ms;
        st.load_ms += plan.load_ms;
        metrics.gpu_prefill_seconds.inc_by(prefill_ms / 1000.0);

        for ev in sched.complete(&plan, vnow) {
            metrics.generation_tokens.inc();
            if ev.index == 0 {
                metrics.ttft.observe(ev.ttft_ms / 1000.0);
            }
            let Some(c) = clients.get(&ev.id) else {
                continue;
            };
            if ev.finished {
                metrics.e2e.observe(ev.since_arrival_ms / 1000.0);
                metrics
                    .request_success
                    .with_label_values(&[c.finish_reason])
                    .inc();
                st.completed += 1;
            }
            let gone = c.events.send(ev).is_err();
            if ev.finished {
                clients.remove(&ev.id);
            } else if gone {
                sched.abort(ev.id);
                clients.remove(&ev.id);
                st.aborted += 1;
            }
        }
        publish(&sched, &metrics, &stats, &mut st, vnow);
    }
}

fn admit(
    sched: &mut Scheduler,
    clients: &mut HashMap<u64, Client>,
    next_id: &mut u64,
    s: Submit,
    arrival_ms: f64,
) {
    let id = *next_id;
    *next_id += 1;
    sched.add(SeqSpec {
        id,
        prompt_tokens: s.prompt_tokens,
        block_hashes: s.block_hashes,
        external: s.external,
        max_tokens: s.max_tokens,
        arrival_ms,
    });
    clients.insert(
        id,
        Client {
            events: s.events,
            finish_reason: s.finish_reason,
        },
    );
}

fn publish(
    sched: &Scheduler,
    metrics: &SimMetrics,
    stats: &Mutex<EngineStats>,
    st: &mut EngineStats,
    vnow: f64,
) {
    st.virtual_now_ms = vnow;
    st.running = sched.num_running();
    st.waiting = sched.num_waiting();
    st.kv_usage = sched.kv_usage();
    st.apc = sched.apc_stats();
    metrics.running.set(st.running as i64);
    metrics.waiting.set(st.waiting as i64);
    metrics.gpu_cache_usage.set(st.kv_usage);
    metrics.kv_cache_usage.set(st.kv_usage);
    *stats.lock().expect("stats lock") = st.clone();
}

#[cfg(test)]
mod tests {
    use super::*;

    const P8B: &str = include_str!("../../conf/profiles/h100-llama3-8b.json");

    fn cost() -> CostModel {
        CostModel::from_profile_json(P8B).unwrap()
    }

    fn cfg() -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            num_gpu_blocks: 20000,
            enable_prefix_caching: true,
            kv_store_gbps: 25.0,
        }
    }

    /// Run the scheduler on a virtual clock until `specs` (arriving at their
    /// `arrival_ms`) are done; returns every event and the number of steps.
    fn simulate(mut sched: Scheduler, mut specs: Vec<SeqSpec>) -> (Vec<SeqEvent>, u64) {
        specs.sort_by(|a, b| a.arrival_ms.total_cmp(&b.arrival_ms));
        let mut pending: VecDeque<SeqSpec> = specs.into();
        let mut now = 0.0;
        let mut events = Vec::new();
        let mut steps = 0;
        loop {
            while pending.front().is_some_and(|s| s.arrival_ms <= now) {
                sched.add(pending.pop_front().unwrap());
            }
            if sched.is_idle() {
                match pending.front() {
                    Some(s) => {
                        now = s.arrival_ms;
                        continue;
                    }
                    None => break,
                }
            }
            let plan = sched.schedule(now);
            assert!(!plan.scheduled.is_empty());
            now += plan.duration_ms();
            steps += 1;
            events.extend(sched.complete(&plan, now));
            assert!(steps < 1_000_000);
        }
        (events, steps)
    }

    fn spec(id: u64, prompt: u64, max_tokens: u64) -> SeqSpec {
        SeqSpec {
            id,
            prompt_tokens: prompt,
            block_hashes: Arc::from(Vec::new()),
            external: None,
            max_tokens,
            arrival_ms: 0.0,
        }
    }

    /// A request whose prompt is `ids` (hashed for the GPU prefix cache).
    fn spec_ids(id: u64, ids: &[u32], max_tokens: u64) -> SeqSpec {
        SeqSpec {
            block_hashes: crate::apc::block_hashes(ids, 16).into(),
            ..spec(id, ids.len() as u64, max_tokens)
        }
    }

    fn first(events: &[SeqEvent], id: u64) -> SeqEvent {
        *events.iter().find(|e| e.id == id && e.index == 0).unwrap()
    }

    fn last(events: &[SeqEvent], id: u64) -> SeqEvent {
        *events.iter().rfind(|e| e.id == id).unwrap()
    }

    #[test]
    fn single_request_timing_matches_cost_model() {
        let c = cost();
        let (ev, steps) = simulate(Scheduler::new(cfg(), c.clone()), vec![spec(1, 1000, 4)]);
        assert_eq!(ev.len(), 4);
        assert_eq!(steps, 4);
        assert!(ev.last().unwrap().finished);
        let ttft = first(&ev, 1).ttft_ms;
        assert!((ttft - c.prefill_ms(1000)).abs() < 1e-9);
        let e2e = last(&ev, 1).since_arrival_ms;
        let expect = c.prefill_ms(1000)
            + c.decode_step_ms(1, 1000)
            + c.decode_step_ms(1, 1001)
            + c.decode_step_ms(1, 1002);
        assert!((e2e - expect).abs() < 1e-9, "{e2e} vs {expect}");
    }

    #[test]
    fn long_prompt_has_larger_ttft() {
        let (short, _) = simulate(Scheduler::new(cfg(), cost()), vec![spec(1, 200, 1)]);
        let (long, _) = simulate(Scheduler::new(cfg(), cost()), vec![spec(1, 16000, 1)]);
        let (s, l) = (first(&short, 1).ttft_ms, first(&long, 1).ttft_ms);
        assert!(l > 10.0 * s, "short {s} long {l}");
    }

    #[test]
    fn chunked_prefill_respects_budget() {
        let mut sched = Scheduler::new(cfg(), cost());
        sched.add(spec(1, 20000, 2));
        let p1 = sched.schedule(0.0);
        assert_eq!(p1.scheduled, vec![(1, 8192)]);
        assert!(sched.complete(&p1, 1.0).is_empty());
        let p2 = sched.schedule(1.0);
        assert_eq!(p2.scheduled, vec![(1, 8192)]);
        assert_eq!(p2.shape.prefill_context_pairs, 8192.0 * 8192.0);
        sched.complete(&p2, 2.0);
        let p3 = sched.schedule(2.0);
        assert_eq!(p3.scheduled, vec![(1, 20000 - 2 * 8192)]);
        let ev = sched.complete(&p3, 3.0);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].ttft_ms, 3.0);
        // a decode step of 1 token now, and a new request shares the step
        sched.add(spec(2, 100, 1));
        let p4 = sched.schedule(3.0);
        assert_eq!(p4.scheduled, vec![(1, 1), (2, 100)]);
        assert_eq!(p4.shape.decode_batch, 1);
        assert_eq!(p4.shape.decode_context_tokens, 20000);
        assert_eq!(p4.shape.prefill_new_tokens, 100);
        let ev = sched.complete(&p4, 4.0);
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| e.finished));
        assert!(sched.is_idle());
        assert_eq!(sched.kv_usage(), 0.0);
    }

    #[test]
    fn batching_beats_serial() {
        let one = {
            let (ev, _) = simulate(Scheduler::new(cfg(), cost()), vec![spec(0, 1000, 64)]);
            last(&ev, 0).since_arrival_ms
        };
        let specs: Vec<SeqSpec> = (0..8).map(|i| spec(i, 1000, 64)).collect();
        let (ev, steps) = simulate(Scheduler::new(cfg(), cost()), specs);
        let all = (0..8)
            .map(|i| last(&ev, i).since_arrival_ms)
            .fold(0.0, f64::max);
        assert_eq!(steps, 64, "all 8 prefill in one step, then decode together");
        assert!(all < 2.0 * one, "8 concurrent {all} vs one {one}");
        assert!(all >= one);
    }

    #[test]
    fn max_num_seqs_queues_the_rest() {
        let mut c = cfg();
        c.max_num_seqs = 2;
        let specs: Vec<SeqSpec> = (0..4).map(|i| spec(i, 100, 10)).collect();
        let mut sched = Scheduler::new(c, cost());
        for s in &specs {
            sched.add(s.clone());
        }
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled.len(), 2);
        assert_eq!((sched.num_running(), sched.num_waiting()), (2, 2));
        let (ev, _) = simulate(Scheduler::new(c, cost()), specs);
        // the third request waits for the first two to finish
        assert!(first(&ev, 2).queue_ms >= last(&ev, 0).since_arrival_ms - 1e-9);
        assert!(first(&ev, 2).ttft_ms > first(&ev, 1).ttft_ms);
    }

    #[test]
    fn cached_tokens_skip_prefill_but_pay_load() {
        let c = cost();
        let mut s = spec(1, 8000, 1);
        s.external = Some(Arc::new(ExternalHit::single(7680, Tier::Cpu)));
        let mut sched = Scheduler::new(cfg(), c.clone());
        sched.add(s);
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled, vec![(1, 320)]);
        assert_eq!(p.loaded_tokens, 7680);
        assert!((p.load_ms - c.h2d_ms(7680 * c.kv_bytes_per_token)).abs() < 1e-9);
        assert!((p.compute_ms - c.cached_prefill_ms(7680, 320)).abs() < 1e-9);
        let hit = p.duration_ms();
        let (ev, _) = simulate(Scheduler::new(cfg(), c.clone()), vec![spec(1, 8000, 1)]);
        assert!(hit < first(&ev, 1).ttft_ms / 2.0, "hit {hit} miss {:?}", ev);
        // a full hit still computes one token
        let mut sched = Scheduler::new(cfg(), c);
        let mut s = spec(2, 512, 1);
        s.external = Some(Arc::new(ExternalHit::single(512, Tier::Cpu)));
        sched.add(s);
        assert_eq!(sched.schedule(0.0).scheduled, vec![(2, 1)]);
    }

    #[test]
    fn aborted_sequences_leave_the_batch() {
        let mut sched = Scheduler::new(cfg(), cost());
        sched.add(spec(1, 100, 10));
        sched.add(spec(2, 100, 10));
        let p = sched.schedule(0.0);
        assert!(sched.abort(1));
        let ev = sched.complete(&p, 1.0);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].id, 2);
        assert_eq!(sched.num_running(), 1);
        assert!(!sched.abort(1));
        assert!(sched.abort(2));
        assert!(sched.is_idle());
        assert_eq!(sched.kv_usage(), 0.0);
    }

    #[test]
    fn kv_pressure_preempts_and_still_finishes() {
        let mut c = cfg();
        c.num_gpu_blocks = 20; // 320 tokens
        let specs: Vec<SeqSpec> = (0..3).map(|i| spec(i, 90, 40)).collect();
        let mut sched = Scheduler::new(c, cost());
        for s in &specs {
            sched.add(s.clone());
        }
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled.len(), 3);
        assert!(sched.kv_usage() > 0.8);
        let mut sched2 = Scheduler::new(c, cost());
        for s in &specs {
            sched2.add(s.clone());
        }
        let (ev, _) = simulate(Scheduler::new(c, cost()), specs);
        for i in 0..3 {
            assert_eq!(ev.iter().filter(|e| e.id == i).count(), 40);
            assert!(last(&ev, i).finished);
        }
        // preemption happened along the way
        let mut now = 0.0;
        while !sched2.is_idle() {
            let p = sched2.schedule(now);
            now += p.duration_ms();
            sched2.complete(&p, now);
        }
        assert!(sched2.preemptions > 0);
    }

    /// Run `spec` alone on `sched` (from `now`) to completion; returns its admission, its
    /// first planned step and the end time.
    fn run_one(sched: &mut Scheduler, spec: SeqSpec, now: f64) -> (Admission, StepPlan, f64) {
        sched.add(spec);
        let mut now = now;
        let first = sched.schedule(now);
        let adm = first.admitted[0];
        now += first.duration_ms();
        sched.complete(&first, now);
        while !sched.is_idle() {
            let p = sched.schedule(now);
            now += p.duration_ms();
            sched.complete(&p, now);
        }
        (adm, first, now)
    }

    fn prompt(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(7919) ^ salt) % 128000)
            .collect()
    }

    #[test]
    fn a_repeated_prompt_is_a_gpu_hit_decided_at_admission() {
        let c = cost();
        let mut sched = Scheduler::new(cfg(), c.clone());
        let ids = prompt(1000, 0);
        let (a, p, now) = run_one(&mut sched, spec_ids(1, &ids, 2), 0.0);
        assert_eq!(a.split, CachedSplit::default());
        assert!((p.compute_ms - c.prefill_ms(1000)).abs() < 1e-9);
        // the repeat: 62 full blocks cached, capped below the whole prompt
        let (a, p, _) = run_one(&mut sched, spec_ids(2, &ids, 2), now);
        assert_eq!(a.split.gpu, 992);
        assert_eq!((a.split.cpu, a.split.remote), (0, 0));
        assert_eq!(p.scheduled, vec![(2, 8)]);
        assert_eq!(p.load_ms, 0.0, "a GPU hit loads nothing");
        assert!((p.compute_ms - c.cached_prefill_ms(992, 8)).abs() < 1e-9);
        // a prompt of exactly 62 blocks hits 61 of them (the last token is computed)
        let (a, _, _) = run_one(&mut sched, spec_ids(3, &ids[..992], 1), 0.0);
        assert_eq!(a.split.gpu, 976);
        // the events carry the split
        let mut sched = Scheduler::new(cfg(), c);
        let (ev, _) = simulate(sched.clone(), vec![spec_ids(1, &ids, 1)]);
        assert_eq!(ev[0].cached, CachedSplit::default());
        run_one(&mut sched, spec_ids(1, &ids, 1), 0.0);
        sched.add(spec_ids(2, &ids, 1));
        let p = sched.schedule(0.0);
        let ev = sched.complete(&p, 1.0);
        assert_eq!(ev[0].cached.gpu, 992);
        let s = sched.apc_stats();
        assert_eq!((s.cached_blocks, s.used_blocks), (62, 0));
    }

    #[test]
    fn disabled_prefix_caching_never_hits() {
        let mut c = cfg();
        c.enable_prefix_caching = false;
        let mut sched = Scheduler::new(c, cost());
        let ids = prompt(1000, 0);
        run_one(&mut sched, spec_ids(1, &ids, 1), 0.0);
        let (a, p, _) = run_one(&mut sched, spec_ids(2, &ids, 1), 0.0);
        assert_eq!(a.split.total(), 0);
        assert!(!a.apc);
        assert_eq!(p.scheduled, vec![(2, 1000)]);
        assert_eq!(sched.apc_stats().cached_blocks, 0);
    }

    #[test]
    fn a_full_gpu_evicts_the_least_recently_used_prefix() {
        let mut c = cfg();
        c.num_gpu_blocks = 100;
        let mut sched = Scheduler::new(c, cost());
        let a_ids = prompt(1000, 1);
        let b_ids = prompt(1000, 2);
        run_one(&mut sched, spec_ids(1, &a_ids, 1), 0.0);
        // b takes the 37 never-used blocks, then a's 26 freed last: a's tail (freed first)
        run_one(&mut sched, spec_ids(2, &b_ids, 1), 0.0);
        assert_eq!(
            sched.apc_stats().evictions,
            25,
            "a's partial block had no hash"
        );
        let (a, _, _) = run_one(&mut sched, spec_ids(3, &a_ids, 1), 0.0);
        assert_eq!(a.split.gpu, 37 * 16, "a's first 37 blocks survived");
        // running sequences are pinned: a request that needs more than the unpinned blocks
        // waits
        let mut sched = Scheduler::new(c, cost());
        sched.add(spec_ids(1, &a_ids, 1000));
        sched.add(spec_ids(2, &b_ids, 1));
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled, vec![(1, 1000)]);
        assert_eq!(sched.num_waiting(), 1);
    }

    #[test]
    fn requests_sharing_a_prefix_share_its_blocks() {
        let mut sched = Scheduler::new(cfg(), cost());
        let base = prompt(512, 3);
        let mut a = base.clone();
        a.extend(prompt(100, 4));
        let mut b = base.clone();
        b.extend(prompt(100, 5));
        sched.add(spec_ids(1, &a, 50));
        let p = sched.schedule(0.0);
        sched.complete(&p, 1.0);
        let used = sched.apc_stats().used_blocks;
        assert_eq!(used, 39); // 612 tokens
                              // b arrives while a runs: its first 32 blocks are a's, shared
        sched.add(spec_ids(2, &b, 50));
        let p = sched.schedule(1.0);
        assert_eq!(p.admitted[0].split.gpu, 512);
        assert_eq!(
            sched.apc_stats().used_blocks,
            used + 7,
            "only b's own 7 blocks"
        );
        // a leaves: the shared blocks stay pinned by b
        assert!(sched.abort(1));
        assert_eq!(sched.apc_stats().used_blocks, 39);
        assert!(sched.abort(2));
        assert_eq!(sched.apc_stats().used_blocks, 0);
    }

    #[test]
    fn each_tier_costs_what_it_costs() {
        let c = cost();
        let ext = |chunks: Vec<(u64, Tier)>| {
            Some(Arc::new(ExternalHit {
                chunks,
                keys_per_chunk: 1,
            }))
        };
        let kv = |t: u64| c.kv_bytes(t);
        let link = |bytes: u64| bytes as f64 / (25e9 / 8.0) * 1000.0;
        // no GPU hit: 256 tokens from the CPU tier, 256 from the remote store
        let ids = prompt(600, 6);
        let mut sched = Scheduler::new(cfg(), c.clone());
        let mut s = spec_ids(1, &ids, 1);
        s.external = ext(vec![(256, Tier::Cpu), (512, Tier::Remote)]);
        let (a, p, _) = run_one(&mut sched, s, 0.0);
        assert_eq!(
            a.split,
            CachedSplit {
                gpu: 0,
                cpu: 256,
                remote: 256
            }
        );
        assert_eq!(a.keys_loaded, 2);
        assert_eq!((p.loaded_tokens, p.remote_tokens), (512, 256));
        let want = c.h2d_ms(kv(512)) + link(kv(256));
        assert!((p.load_ms - want).abs() < 1e-9, "{} vs {want}", p.load_ms);
        assert!((p.compute_ms - c.cached_prefill_ms(512, 88)).abs() < 1e-9);
        // the same prompt again: the GPU holds 592 tokens, more than LMCache: all GPU
        let mut s = spec_ids(2, &ids, 1);
        s.external = ext(vec![(256, Tier::Cpu), (512, Tier::Remote)]);
        let (a, p, _) = run_one(&mut sched, s, 0.0);
        assert_eq!(a.split.gpu, 592);
        assert_eq!((a.split.total(), a.keys_loaded), (592, 0));
        assert_eq!(p.load_ms, 0.0);
        // a prompt sharing 300 tokens: the GPU has 288, LMCache supplies the rest to 512
        let mut fork = ids.clone();
        fork[300] = (fork[300] + 1) % 128000;
        let mut s = spec_ids(3, &fork, 1);
        s.external = ext(vec![(256, Tier::Cpu), (512, Tier::Remote)]);
        let (a, p, _) = run_one(&mut sched, s, 0.0);
        assert_eq!(
            a.split,
            CachedSplit {
                gpu: 288,
                cpu: 0,
                remote: 224
            }
        );
        assert_eq!(a.keys_loaded, 1);
        let want = c.h2d_ms(kv(224)) + link(kv(224));
        assert!((p.load_ms - want).abs() < 1e-9);
        // a free link: remote costs only the host-to-device copy
        let mut free = cfg();
        free.kv_store_gbps = 0.0;
        let mut sched = Scheduler::new(free, c.clone());
        let mut s = spec_ids(1, &ids, 1);
        s.external = ext(vec![(512, Tier::Remote)]);
        let (_, p, _) = run_one(&mut sched, s, 0.0);
        assert!((p.load_ms - c.h2d_ms(kv(512))).abs() < 1e-9);
    }

    #[test]
    fn prefill_share_of_a_mixed_step() {
        let mut sched = Scheduler::new(cfg(), cost());
        sched.add(spec(1, 100, 5));
        let p = sched.schedule(0.0);
        assert_eq!(p.prefill_compute_ms(), p.compute_ms);
        sched.complete(&p, 1.0);
        sched.add(spec(2, 99, 1));
        let p = sched.schedule(1.0);
        // one decode token and 99 prefill tokens
        assert!((p.prefill_compute_ms() - p.compute_ms * 0.99).abs() < 1e-9);
        sched.complete(&p, 2.0);
        let p = sched.schedule(2.0);
        assert_eq!(p.prefill_compute_ms(), 0.0, "decode only");
    }
}
