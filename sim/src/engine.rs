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
//!    in FIFO order with their first chunk. A sequence with `cached_tokens` (a prefix-cache
//!    hit) starts with those tokens already computed, and the step pays
//!    `h2d_ms(kv_bytes(cached_tokens))` to load them;
//! 3. KV blocks (16 tokens) are allocated for every computed token; when a running sequence
//!    cannot grow, the most recently admitted one is preempted (recompute: its blocks are
//!    freed and it goes back to the front of the queue), as vLLM does;
//! 4. the step lasts `CostModel::step_cost(shape) + load time`; at its end a sequence whose
//!    computed tokens reach its length samples one token (the first one at the end of the
//!    step that finishes its prefill: its TTFT).

use crate::metrics::SimMetrics;
use cacheroute_filters::cost_model::{CostModel, StepShape};
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
}

impl SchedulerConfig {
    pub fn kv_capacity_tokens(&self) -> u64 {
        self.num_gpu_blocks * self.block_size
    }
}

/// A request as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeqSpec {
    pub id: u64,
    pub prompt_tokens: u64,
    /// Leading prompt tokens whose KV is a prefix-cache hit (loaded, not computed).
    pub cached_tokens: u64,
    pub max_tokens: u64,
    /// Virtual arrival time (ms).
    pub arrival_ms: f64,
}

#[derive(Debug, Clone)]
struct Seq {
    spec: SeqSpec,
    num_computed: u64,
    generated: u64,
    blocks: u64,
    first_token_ms: Option<f64>,
    scheduled_ms: Option<f64>,
}

impl Seq {
    fn num_tokens(&self) -> u64 {
        self.spec.prompt_tokens + self.generated
    }
}

/// What one step runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    /// (sequence id, tokens computed this step).
    pub scheduled: Vec<(u64, u64)>,
    pub shape: StepShape,
    /// Cached tokens loaded from the host this step.
    pub loaded_tokens: u64,
    /// h2d time of those tokens (ms).
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
}

/// Continuous-batching scheduler over a virtual clock.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    cost: CostModel,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    used_blocks: u64,
    pub preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, cost: CostModel) -> Scheduler {
        Scheduler {
            cfg,
            cost,
            waiting: VecDeque::new(),
            running: Vec::new(),
            used_blocks: 0,
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
        // at least one prompt token is always computed (vLLM caps hits at prompt - 1)
        spec.cached_tokens = spec.cached_tokens.min(spec.prompt_tokens - 1);
        self.waiting.push_back(Seq {
            spec,
            num_computed: 0,
            generated: 0,
            blocks: 0,
            first_token_ms: None,
            scheduled_ms: None,
        });
    }

    /// Drop a request (client gone). Returns whether it was known.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(i) = self.running.iter().position(|s| s.spec.id == id) {
            let s = self.running.remove(i);
            self.used_blocks -= s.blocks;
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
        if self.cfg.num_gpu_blocks == 0 {
            0.0
        } else {
            self.used_blocks as f64 / self.cfg.num_gpu_blocks as f64
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

    fn free_blocks(&self) -> u64 {
        self.cfg.num_gpu_blocks.saturating_sub(self.used_blocks)
    }

    fn preempt_last(&mut self) -> u64 {
        let mut s = self.running.pop().expect("something to preempt");
        self.used_blocks -= s.blocks;
        s.blocks = 0;
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
            let need = self.blocks_for(s.num_computed + n).saturating_sub(s.blocks);
            let mut self_preempted = false;
            while need > self.free_blocks() {
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
            let s = &mut self.running[i];
            s.blocks += need;
            self.used_blocks += need;
            let decoding = s.generated > 0 && n == 1 && s.num_computed + 1 == s.num_tokens();
            if decoding {
                plan.shape.add_decode(s.num_computed);
            } else {
                plan.shape.add_prefill(s.num_computed, n);
            }
            plan.scheduled.push((s.spec.id, n));
            budget -= n;
            i += 1;
        }
        // 2. admit waiting sequences (FIFO) while there is budget and room
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs && plan.preempted.is_empty()
        {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let start = front.spec.cached_tokens;
            let n = (front.num_tokens() - start).min(budget);
            let need = self.blocks_for(start + n);
            if need > self.free_blocks() {
                break;
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            s.num_computed = start;
            s.blocks = need;
            self.used_blocks += need;
            s.scheduled_ms.get_or_insert(now_ms);
            plan.loaded_tokens += start;
            plan.shape.add_prefill(start, n);
            plan.scheduled.push((s.spec.id, n));
            budget -= n;
            self.running.push(s);
        }
        plan.compute_ms = self.cost.step_cost(&plan.shape);
        plan.load_ms = if plan.loaded_tokens > 0 {
            self.cost.h2d_ms(self.cost.kv_bytes(plan.loaded_tokens))
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
}

/// A request handed to the engine task.
pub struct Submit {
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
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
        cached_tokens: s.cached_tokens,
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
            cached_tokens: 0,
            max_tokens,
            arrival_ms: 0.0,
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
            sched.add(*s);
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
        s.cached_tokens = 7680;
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
        s.cached_tokens = 512;
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
            sched.add(*s);
        }
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled.len(), 3);
        assert!(sched.kv_usage() > 0.8);
        let mut sched2 = Scheduler::new(c, cost());
        for s in &specs {
            sched2.add(*s);
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
}
