//! One instance's live state (in flight, prefill backlog, recent connect failures, idle
//! connections), shared across reloads by URL; its metric series; and the guards that
//! count a request on it for as long as the request lives.

use super::PoolInstance;
use crate::admission::Admission;
use crate::idle_pool::IdlePool;
use crate::metrics::Metrics;
use cacheroute_decisions::openai::Route;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Idle connections kept per instance, and for how long.
const IDLE_CAPACITY: usize = 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Live state of one instance, shared by every fleet that lists its URL.
#[derive(Debug)]
pub struct InstanceState {
    inflight: AtomicU64,
    /// Idle keep-alive connections to this instance.
    pub idle: IdlePool,
    /// Milliseconds since `epoch` of the last failed connect; 0 = never.
    last_connect_failure_ms: AtomicU64,
    epoch: Instant,
    /// Slots and the waiting queue.
    pub admission: Arc<Admission>,
    /// KV-mode requests waiting for their KV outside the queue (`text_bypass`)
    /// keep their order through this.
    pub kv_gate: tokio::sync::Mutex<()>,
    /// KV-mode requests waiting for their KV outside the queue right now.
    pub kv_waiting: AtomicU64,
    /// Requests sent to the instance whose first byte has not come back: the
    /// engine's prefill backlog as the gateway sees it (see [`PrefillGuard`]).
    prefilling: AtomicU64,
    /// Σ prompt tokens those requests make the engine compute.
    prefill_tokens: AtomicU64,
    /// When the instance's store link is free of the KV loads the gateway sent it,
    /// µs since `epoch` (see [`InstanceState::reserve_store_link`]).
    store_link_free_us: AtomicU64,
}

impl InstanceState {
    fn new() -> Self {
        InstanceState {
            inflight: AtomicU64::new(0),
            idle: IdlePool::new(IDLE_CAPACITY, IDLE_TIMEOUT),
            last_connect_failure_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            admission: Arc::new(Admission::default()),
            kv_gate: tokio::sync::Mutex::new(()),
            kv_waiting: AtomicU64::new(0),
            prefilling: AtomicU64::new(0),
            prefill_tokens: AtomicU64::new(0),
            store_link_free_us: AtomicU64::new(0),
        }
    }

    /// How long the KV loads the gateway already sent here keep the instance's store
    /// link busy, ms (an estimate: the gateway counts the KV it had moved into the
    /// store, which the engine then loads over the link one load after another).
    pub fn store_link_backlog_ms(&self) -> f64 {
        let now = self.epoch.elapsed().as_micros() as u64;
        self.store_link_free_us
            .load(Ordering::Relaxed)
            .saturating_sub(now) as f64
            / 1000.0
    }

    /// Count a load of `ms` on the store link, after those already counted.
    pub fn reserve_store_link(&self, ms: f64) {
        if !(ms.is_finite() && ms > 0.0) {
            return;
        }
        let now = self.epoch.elapsed().as_micros() as u64;
        let add = (ms * 1000.0) as u64;
        let _ =
            self.store_link_free_us
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |free| {
                    Some(free.max(now).saturating_add(add))
                });
    }

    /// Requests sent and not yet answered with a first byte, and the prompt tokens
    /// they make the engine compute.
    pub fn prefilling(&self) -> (u64, u64) {
        (
            self.prefilling.load(Ordering::Relaxed),
            self.prefill_tokens.load(Ordering::Relaxed),
        )
    }

    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot on this instance.
    pub fn queued(&self) -> u64 {
        self.admission.queued()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Passive health: a refused connection takes the instance out of
    /// rotation until the next active health check could have seen it again.
    pub fn mark_connect_failure(&self) {
        self.last_connect_failure_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn clear_connect_failure(&self) {
        self.last_connect_failure_ms.store(0, Ordering::Relaxed);
    }

    pub(super) fn failed_recently(&self, window: Duration) -> bool {
        let t = self.last_connect_failure_ms.load(Ordering::Relaxed);
        t != 0 && self.now_ms().saturating_sub(t) < window.as_millis() as u64
    }
}

/// The per-request metric series of one instance, resolved at build time so
/// that the hot path does no label lookups: `[chat, completions]`.
pub struct InstanceMetrics {
    pub url: String,
    pub ok: [prometheus::IntCounter; 2],
    pub ttft: [prometheus::Histogram; 2],
}

impl InstanceMetrics {
    pub(super) fn new(metrics: &Metrics, url: &str) -> Self {
        let routes = [Route::Chat.label(), Route::Completions.label()];
        InstanceMetrics {
            url: url.to_string(),
            ok: routes.map(|r| metrics.requests.with_label_values(&[r, "200", url])),
            ttft: routes.map(|r| metrics.ttft.with_label_values(&[r, url])),
        }
    }

    pub fn route_index(route: &str) -> Option<usize> {
        match route {
            "chat" => Some(0),
            "completions" => Some(1),
            _ => None,
        }
    }
}

/// Counts a request in flight on an instance for as long as it lives.
pub struct InflightGuard<'a> {
    inst: &'a PoolInstance,
}

impl<'a> InflightGuard<'a> {
    pub fn new(inst: &'a PoolInstance) -> Self {
        let now = inst.state.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        inst.inflight_gauge.set(now as i64);
        InflightGuard { inst }
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let now = self.inst.state.inflight.fetch_sub(1, Ordering::Relaxed) - 1;
        self.inst.inflight_gauge.set(now as i64);
    }
}

/// Counts a request in the instance's prefill backlog from the moment it is sent
/// until its first byte comes back (or it ends). The engine's own queue is
/// invisible to the gateway when admission is unbounded; this is what the
/// injection decision reads as the requests ahead of and beside a new one.
pub struct PrefillGuard<'a> {
    state: &'a InstanceState,
    tokens: u64,
}

impl<'a> PrefillGuard<'a> {
    pub fn new(state: &'a InstanceState, tokens: u64) -> Self {
        state.prefilling.fetch_add(1, Ordering::Relaxed);
        state.prefill_tokens.fetch_add(tokens, Ordering::Relaxed);
        PrefillGuard { state, tokens }
    }
}

impl Drop for PrefillGuard<'_> {
    fn drop(&mut self) {
        self.state.prefilling.fetch_sub(1, Ordering::Relaxed);
        self.state
            .prefill_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// Instance states by URL, kept across reloads.
#[derive(Default)]
pub struct InstanceRegistry {
    states: Mutex<HashMap<String, Arc<InstanceState>>>,
}

impl InstanceRegistry {
    pub(super) fn get(&self, url: &str) -> Arc<InstanceState> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states
            .entry(url.to_string())
            .or_insert_with(|| Arc::new(InstanceState::new()))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_link_loads_queue_one_after_another() {
        let s = InstanceState::new();
        assert_eq!(s.store_link_backlog_ms(), 0.0);
        s.reserve_store_link(f64::NAN);
        s.reserve_store_link(-1.0);
        assert_eq!(s.store_link_backlog_ms(), 0.0);
        s.reserve_store_link(60_000.0);
        s.reserve_store_link(60_000.0);
        let b = s.store_link_backlog_ms();
        // both loads are queued (minus the few µs this test took)
        assert!(b > 119_000.0 && b <= 120_000.0, "{b}");
    }
}
