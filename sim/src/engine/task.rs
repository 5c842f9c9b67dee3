//! The engine task: the tokio loop that takes submissions, runs the [`Scheduler`]'s
//! steps paced in (scaled) real time, streams each sequence's events to its client and
//! publishes counters and metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Admission, CachedSplit, ExternalHit, Scheduler, SeqEvent, SeqSpec};
use crate::apc::ApcStats;
use crate::metrics::SimMetrics;

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
    /// Simulated ms of forward time spent on prefill (see [`StepPlan::prefill_compute_ms`](super::StepPlan::prefill_compute_ms)).
    pub prefill_ms: f64,
    /// Simulated ms spent in steps loading LMCache hits (host-to-device, and the store
    /// link for blocking loads).
    pub load_ms: f64,
    /// Simulated ms the store link spent prefetching off the steps (async loading).
    pub prefetch_ms: f64,
    /// Sequences waiting for their prefetch (vLLM's WAITING_FOR_REMOTE_KVS).
    pub waiting_for_kv: usize,
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
            if let Some(ready) = sched.next_ready_ms(vnow) {
                // every sequence that could run waits for its prefetch: idle until the
                // first one is in, or until a request arrives
                let start = Instant::now();
                anchor = (start, vnow);
                last_deadline = None;
                let deadline = start + Duration::from_secs_f64((ready - vnow) / 1000.0 / scale);
                publish(&sched, &metrics, &stats, &mut st, vnow);
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.into()) => vnow = ready,
                    got = rx.recv() => match got {
                        Some((s, at)) => {
                            vnow = v_at(anchor, Instant::now()).min(ready);
                            let arrival = v_at(anchor, at).min(vnow);
                            admit(&mut sched, &mut clients, &mut next_id, s, arrival);
                        }
                        None => {
                            // every handle is gone: finish what is queued
                            tokio::time::sleep_until(deadline.into()).await;
                            vnow = ready;
                        }
                    },
                }
                continue;
            }
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
    st.waiting_for_kv = sched.num_waiting_for_kv(vnow);
    st.prefetch_ms = sched.prefetch_ms;
    st.apc = sched.apc_stats();
    metrics.running.set(st.running as i64);
    metrics.waiting.set(st.waiting as i64);
    metrics.gpu_cache_usage.set(st.kv_usage);
    metrics.kv_cache_usage.set(st.kv_usage);
    *stats.lock().expect("stats lock") = st.clone();
}
