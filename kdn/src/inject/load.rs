//! The injector's load report (`/v1/load`): queue and worker counts, recent throughput
//! per target, moving averages of queue wait and bandwidth, and link backlogs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Injector, Job, Status, Target, Transfer};
use crate::registry::redact_url;

/// Recent activity, for `/v1/load`.
#[derive(Debug, Default)]
pub(super) struct LoadTracker {
    pub(super) queue_wait_ema_ms: f64,
    pub(super) bandwidth_ema: f64,
    /// (when, target name, logical bytes)
    pub(super) window: VecDeque<(Instant, String, u64)>,
}

/// Length of the recent-throughput window.
pub const LOAD_WINDOW: Duration = Duration::from_secs(10);

impl LoadTracker {
    fn prune(&mut self) {
        let now = Instant::now();
        while let Some((t, _, _)) = self.window.front() {
            if now.duration_since(*t) > LOAD_WINDOW {
                self.window.pop_front();
            } else {
                break;
            }
        }
    }

    fn recent(&mut self) -> (f64, HashMap<String, f64>) {
        self.prune();
        let secs = LOAD_WINDOW.as_secs_f64();
        let mut per: HashMap<String, f64> = HashMap::new();
        let mut total = 0.0;
        for (_, target, b) in &self.window {
            *per.entry(target.clone()).or_default() += *b as f64 / secs;
            total += *b as f64 / secs;
        }
        (total, per)
    }
}

/// Load per target in [`LoadSnapshot`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetLoad {
    pub store: String,
    pub pending_transfers: usize,
    pub active_transfers: usize,
    pub recent_bytes_per_s: f64,
    pub link_gbps: Option<f64>,
    /// How long a new transfer would wait for the emulated link, in ms.
    pub link_backlog_ms: f64,
}

/// What the scheduler's KDN overload filter reads.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoadSnapshot {
    pub object: &'static str,
    /// Jobs none of whose transfers has started.
    pub pending_jobs: usize,
    /// Jobs with a transfer started and not all finished.
    pub active_jobs: usize,
    /// Transfers waiting for a worker.
    pub pending_transfers: usize,
    /// Transfers copying.
    pub active_transfers: usize,
    /// Moving average (0.8 old / 0.2 new) of the time transfers waited for a worker.
    pub queue_wait_ms: f64,
    /// How long the oldest waiting transfer has waited.
    pub oldest_pending_ms: f64,
    /// Logical KV bytes injected per second over the last 10 s.
    pub recent_bytes_per_s: f64,
    /// Moving average of finished transfers' copy bandwidth (logical bytes/s).
    pub bandwidth_bytes_per_s: f64,
    /// Logical bytes still to copy for queued and running transfers.
    pub backlog_bytes: u64,
    pub max_concurrent_injections: usize,
    pub max_queue: usize,
    pub targets: BTreeMap<String, TargetLoad>,
}

impl Injector {
    /// Current load.
    pub fn load(&self, targets: &[Target]) -> LoadSnapshot {
        let now = Instant::now();
        let (jobs, inflight): (Vec<Arc<Job>>, Vec<Arc<Transfer>>) = {
            let st = self.state();
            (
                st.jobs.values().cloned().collect(),
                st.inflight.values().cloned().collect(),
            )
        };
        let (mut pending_jobs, mut active_jobs) = (0, 0);
        for j in &jobs {
            match j.status() {
                Status::Queued => pending_jobs += 1,
                Status::Running => active_jobs += 1,
                _ => {}
            }
        }
        let mut per: BTreeMap<String, TargetLoad> = BTreeMap::new();
        for t in targets {
            per.insert(
                t.name.clone(),
                TargetLoad {
                    store: redact_url(&t.url),
                    pending_transfers: 0,
                    active_transfers: 0,
                    recent_bytes_per_s: 0.0,
                    link_gbps: t.link_gbps,
                    link_backlog_ms: 0.0,
                },
            );
        }
        let (mut pending, mut active, mut oldest, mut backlog) = (0, 0, 0.0f64, 0u64);
        for t in &inflight {
            let entry = per.entry(t.target.name.clone()).or_insert(TargetLoad {
                store: redact_url(&t.target.url),
                pending_transfers: 0,
                active_transfers: 0,
                recent_bytes_per_s: 0.0,
                link_gbps: t.target.link_gbps,
                link_backlog_ms: 0.0,
            });
            match t.status() {
                Status::Queued => {
                    pending += 1;
                    entry.pending_transfers += 1;
                    oldest = oldest.max((now - t.queued_at).as_secs_f64() * 1e3);
                }
                Status::Running => {
                    active += 1;
                    entry.active_transfers += 1;
                }
                _ => {}
            }
            backlog += t.remaining_logical();
        }
        {
            let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            for tl in per.values_mut() {
                if let Some((_, l)) = links.iter().find(|(u, _)| redact_url(u) == tl.store) {
                    tl.link_backlog_ms = l.backlog().as_secs_f64() * 1e3;
                }
            }
        }
        let mut load = self.load.lock().unwrap_or_else(|p| p.into_inner());
        let (recent, recent_per) = load.recent();
        for (name, rate) in recent_per {
            if let Some(tl) = per.get_mut(&name) {
                tl.recent_bytes_per_s = rate;
            }
        }
        self.metrics.bandwidth.set(recent);
        self.metrics.queue_wait_ms.set(load.queue_wait_ema_ms);
        LoadSnapshot {
            object: "kdn.load",
            pending_jobs,
            active_jobs,
            pending_transfers: pending,
            active_transfers: active,
            queue_wait_ms: load.queue_wait_ema_ms,
            oldest_pending_ms: oldest,
            recent_bytes_per_s: recent,
            bandwidth_bytes_per_s: load.bandwidth_ema,
            backlog_bytes: backlog,
            max_concurrent_injections: self.cfg.max_concurrent,
            max_queue: self.cfg.max_queue,
            targets: per,
        }
    }
}
