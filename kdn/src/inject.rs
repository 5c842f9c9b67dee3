//! Injection: copying knowledge blocks' KV chunks from the KDN store into target
//! (instance) stores.
//!
//! * A **job** is one inject request: some blocks, one model, one target.
//! * A job is made of **transfers**, one per (block, model, target store). A transfer
//!   already queued or running for the same triple is shared (deduplicated) instead of
//!   copying the block twice.
//! * At most `max_concurrent` transfers copy at once (a FIFO semaphore); at most
//!   `max_queue` wait; a job that would exceed that is refused as a whole.
//! * A transfer first asks the target which leading chunks it already holds and copies
//!   only the rest, in pipelined batches (batch n+1 is read from the KDN store while batch
//!   n is written), `kv_bytes` before `metadata` per chunk. A chunk counts as done only
//!   after the write of its batch returned, i.e. after its `metadata` is written.
//! * Optional link shaping per target: a token bucket (GCRA form, no burst: `n` bytes
//!   occupy the link `n / rate` seconds, back to back across all transfers to the same
//!   store) on **logical** bytes, i.e. the real KV size (`chunk_size ×
//!   kv_bytes_per_token` per chunk), even when the stored blobs are scaled down. A batch
//!   is finished no earlier than its slot on the emulated link ends.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

use crate::metrics::KdnMetrics;
use crate::registry::{redact_url, BlockStatus, Registry};
use crate::store::{open_store, Chunk, KvStore, StoreError};

/// Limits of the injector.
#[derive(Debug, Clone)]
pub struct InjectorConfig {
    /// Transfers copying at the same time.
    pub max_concurrent: usize,
    /// Transfers allowed to wait for a worker.
    pub max_queue: usize,
    /// Keys per pipelined batch.
    pub batch_chunks: usize,
    /// Finished jobs kept for lookups.
    pub job_history: usize,
}

impl Default for InjectorConfig {
    fn default() -> Self {
        InjectorConfig {
            max_concurrent: 4,
            max_queue: 256,
            batch_chunks: 4,
            job_history: 1000,
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Link shaping

/// A token bucket on bytes with no burst (GCRA / virtual clock): each reservation of `n`
/// bytes occupies the link for `n / rate` seconds after the previous reservation ends.
#[derive(Debug)]
pub struct LinkShaper {
    bytes_per_sec: f64,
    /// Theoretical arrival time: when the link is free again.
    tat: Mutex<Option<Instant>>,
}

impl LinkShaper {
    pub fn new(bytes_per_sec: f64) -> Self {
        LinkShaper {
            bytes_per_sec: bytes_per_sec.max(1.0),
            tat: Mutex::new(None),
        }
    }

    /// A link of `gbps` gigabits (10^9 bits) per second.
    pub fn from_gbps(gbps: f64) -> Self {
        Self::new(gbps * 1e9 / 8.0)
    }

    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes_per_sec
    }

    /// Reserve the link for `bytes`; returns when that transmission ends.
    pub fn reserve(&self, bytes: u64) -> Instant {
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let start = tat.map_or(now, |t| t.max(now));
        let end = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
        *tat = Some(end);
        end
    }

    /// How long a reservation made now would wait for the link.
    pub fn backlog(&self) -> Duration {
        let tat = *self.tat.lock().unwrap_or_else(|p| p.into_inner());
        tat.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        })
    }
}

// ---------------------------------------------------------------------------
// Requests

/// Where to inject.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The configured target name, or the store URL for an ad-hoc target.
    pub name: String,
    /// The store URL.
    pub url: String,
    /// Emulated link speed (configured targets only).
    pub link_gbps: Option<f64>,
}

/// One block to inject, as the registry knows it for the job's model.
#[derive(Debug, Clone)]
pub struct BlockSpec {
    pub block_id: String,
    /// Chunk-major keys (chunk 0 rank 0, chunk 0 rank 1, …).
    pub keys: Vec<String>,
    pub world_size: u32,
    /// Logical (real) KV bytes of one key.
    pub logical_bytes_per_key: u64,
}

/// Why a job was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(
        "the injection queue is full: {waiting} transfers waiting, this job needs {needed} \
         more, max_queue is {max_queue}; retry later or use text injection"
    )]
    QueueFull {
        waiting: usize,
        needed: usize,
        max_queue: usize,
    },
    #[error("no knowledge blocks to inject")]
    Empty,
}

// ---------------------------------------------------------------------------
// Transfers and jobs

/// State of a transfer or job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Done,
    Failed,
}

impl Status {
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Done | Status::Failed)
    }
}

#[derive(Debug)]
struct TransferState {
    status: Status,
    /// Keys already in the target when the transfer started.
    keys_skipped: usize,
    /// Keys copied (their batch's write returned).
    keys_copied: usize,
    /// Bytes written to the target store.
    stored_bytes: u64,
    error: Option<String>,
    started_at: Option<Instant>,
    copy_started_at: Option<Instant>,
    finished_at: Option<Instant>,
}

/// The copy of one block for one model into one target store.
#[derive(Debug)]
pub struct Transfer {
    block_id: String,
    model: String,
    target: Target,
    link: Option<Arc<LinkShaper>>,
    keys: Vec<String>,
    world_size: usize,
    logical_bytes_per_key: u64,
    queued_at: Instant,
    st: Mutex<TransferState>,
    done: watch::Sender<bool>,
}

impl Transfer {
    fn state(&self) -> std::sync::MutexGuard<'_, TransferState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> Status {
        self.state().status
    }

    /// Whole chunks (all ranks) present in the target as far as this transfer knows.
    pub fn chunks_done(&self) -> usize {
        let st = self.state();
        (st.keys_skipped + st.keys_copied) / self.world_size
    }

    pub fn chunks_total(&self) -> usize {
        self.keys.len() / self.world_size
    }

    pub fn error(&self) -> Option<String> {
        self.state().error.clone()
    }

    fn logical_total(&self) -> u64 {
        self.keys.len() as u64 * self.logical_bytes_per_key
    }

    fn remaining_logical(&self) -> u64 {
        let st = self.state();
        let left = self
            .keys
            .len()
            .saturating_sub(st.keys_skipped + st.keys_copied);
        left as u64 * self.logical_bytes_per_key
    }

    async fn wait(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    fn view(&self, deduplicated: bool) -> Value {
        let st = self.state();
        let now = Instant::now();
        let queue_wait = st.started_at.unwrap_or(now) - self.queued_at;
        let elapsed = st.finished_at.unwrap_or(now) - self.queued_at;
        let copy_time = st
            .copy_started_at
            .map(|s| st.finished_at.unwrap_or(now).saturating_duration_since(s));
        let moved = st.keys_copied as u64 * self.logical_bytes_per_key;
        let bw = match copy_time {
            Some(t) if t.as_secs_f64() > 0.0 => moved as f64 / t.as_secs_f64(),
            _ => 0.0,
        };
        let stored_bw = match copy_time {
            Some(t) if t.as_secs_f64() > 0.0 => st.stored_bytes as f64 / t.as_secs_f64(),
            _ => 0.0,
        };
        json!({
            "id": self.block_id,
            "status": st.status,
            "deduplicated": deduplicated,
            "already_resident": st.status == Status::Done
                && st.keys_skipped == self.keys.len(),
            "chunks_total": self.keys.len() / self.world_size,
            "chunks_done": (st.keys_skipped + st.keys_copied) / self.world_size,
            "chunks_skipped": st.keys_skipped / self.world_size,
            "bytes_total": self.logical_total(),
            "bytes_done": (st.keys_skipped + st.keys_copied) as u64 * self.logical_bytes_per_key,
            "bytes_moved": moved,
            "stored_bytes": st.stored_bytes,
            "queue_wait_ms": queue_wait.as_secs_f64() * 1e3,
            "elapsed_ms": elapsed.as_secs_f64() * 1e3,
            "bandwidth_bytes_per_s": bw,
            "stored_bandwidth_bytes_per_s": stored_bw,
            "error": st.error,
        })
    }
}

/// One inject request.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub model: String,
    pub target: Target,
    created: Instant,
    created_unix: f64,
    /// (transfer, deduplicated)
    parts: Vec<(Arc<Transfer>, bool)>,
}

impl Job {
    /// Done when every transfer is done; failed when every transfer finished and one
    /// failed; running when one runs or some finished; else queued.
    pub fn status(&self) -> Status {
        let s: Vec<Status> = self.parts.iter().map(|(t, _)| t.status()).collect();
        if s.iter().all(|s| *s == Status::Done) {
            Status::Done
        } else if s.iter().all(|s| s.is_finished()) {
            Status::Failed
        } else if s.iter().any(|s| *s != Status::Queued) {
            Status::Running
        } else {
            Status::Queued
        }
    }

    /// Wait until every transfer finished, or `timeout`; whether it finished.
    pub async fn wait(&self, timeout: Duration) -> bool {
        let all = futures_join_all(self.parts.iter().map(|(t, _)| t.clone()));
        tokio::time::timeout(timeout, all).await.is_ok()
    }

    /// The first error of a failed transfer.
    pub fn error(&self) -> Option<String> {
        self.parts
            .iter()
            .find_map(|(t, _)| t.error().map(|e| format!("knowledge {}: {e}", t.block_id)))
    }

    /// The API view.
    pub fn view(&self) -> Value {
        let parts: Vec<Value> = self.parts.iter().map(|(t, d)| t.view(*d)).collect();
        let sum = |f: &str| -> f64 { parts.iter().filter_map(|p| p[f].as_f64()).sum() };
        let sum_u = |f: &str| -> u64 { parts.iter().filter_map(|p| p[f].as_u64()).sum() };
        let max = |f: &str| -> f64 {
            parts
                .iter()
                .filter_map(|p| p[f].as_f64())
                .fold(0.0, f64::max)
        };
        let status = self.status();
        // the job's bandwidth: logical bytes moved over the span of its transfers' copies
        let elapsed_ms = if status.is_finished() {
            max("elapsed_ms")
        } else {
            self.created.elapsed().as_secs_f64() * 1e3
        };
        let moved = sum_u("bytes_moved");
        let copy_ms = elapsed_ms - max("queue_wait_ms");
        json!({
            "id": self.id,
            "object": "kdn.inject_job",
            "status": status,
            "model": self.model,
            "target": self.target.name,
            "target_store": redact_url(&self.target.url),
            "link_gbps": self.target.link_gbps,
            "created_at": self.created_unix,
            "knowledge": parts,
            "chunks_total": sum_u("chunks_total"),
            "chunks_done": sum_u("chunks_done"),
            "bytes_total": sum_u("bytes_total"),
            "bytes_done": sum_u("bytes_done"),
            "bytes_moved": moved,
            "stored_bytes": sum_u("stored_bytes"),
            "queue_wait_ms": max("queue_wait_ms"),
            "elapsed_ms": elapsed_ms,
            "bandwidth_bytes_per_s": if copy_ms > 0.0 { moved as f64 / (copy_ms / 1e3) } else { 0.0 },
            "transfer_bandwidth_bytes_per_s": sum("bandwidth_bytes_per_s"),
            "error": self.error(),
        })
    }
}

async fn futures_join_all(ts: impl Iterator<Item = Arc<Transfer>>) {
    for t in ts {
        t.wait().await;
    }
}

// ---------------------------------------------------------------------------
// Load

/// Recent activity, for `/v1/load`.
#[derive(Debug, Default)]
struct LoadTracker {
    queue_wait_ema_ms: f64,
    bandwidth_ema: f64,
    /// (when, target name, logical bytes)
    window: VecDeque<(Instant, String, u64)>,
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

// ---------------------------------------------------------------------------
// The injector

type DedupKey = (String, String, String);

#[derive(Default)]
struct State {
    jobs: HashMap<String, Arc<Job>>,
    finished: VecDeque<String>,
    inflight: HashMap<DedupKey, Arc<Transfer>>,
}

/// The injection engine.
pub struct Injector {
    cfg: InjectorConfig,
    source: Arc<dyn KvStore>,
    source_url: String,
    registry: Arc<Registry>,
    metrics: Arc<KdnMetrics>,
    sem: Arc<Semaphore>,
    state: Mutex<State>,
    stores: tokio::sync::Mutex<HashMap<String, Arc<dyn KvStore>>>,
    links: Mutex<HashMap<String, Arc<LinkShaper>>>,
    load: Mutex<LoadTracker>,
    seq: AtomicU64,
}

impl Injector {
    pub fn new(
        cfg: InjectorConfig,
        source: Arc<dyn KvStore>,
        source_url: &str,
        registry: Arc<Registry>,
        metrics: Arc<KdnMetrics>,
    ) -> Arc<Injector> {
        Arc::new(Injector {
            sem: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
            cfg,
            source,
            source_url: redact_url(source_url),
            registry,
            metrics,
            state: Mutex::default(),
            stores: tokio::sync::Mutex::default(),
            links: Mutex::default(),
            load: Mutex::default(),
            seq: AtomicU64::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shaper of a target's link (one per store URL), if it has a speed.
    fn link(&self, target: &Target) -> Option<Arc<LinkShaper>> {
        let gbps = target.link_gbps?;
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        Some(
            links
                .entry(target.url.clone())
                .or_insert_with(|| Arc::new(LinkShaper::from_gbps(gbps)))
                .clone(),
        )
    }

    /// Queue a job. Transfers of the same (block, model, target store) already queued or
    /// running are joined instead of copied again.
    pub fn submit(
        self: &Arc<Self>,
        model: &str,
        target: Target,
        blocks: Vec<BlockSpec>,
    ) -> Result<Arc<Job>, SubmitError> {
        if blocks.is_empty() {
            return Err(SubmitError::Empty);
        }
        let link = self.link(&target);
        let mut st = self.state();
        let waiting = st
            .inflight
            .values()
            .filter(|t| t.status() == Status::Queued)
            .count();
        let mut new_keys: Vec<DedupKey> = Vec::new();
        for b in &blocks {
            let k = (b.block_id.clone(), model.to_string(), target.url.clone());
            if !st.inflight.contains_key(&k) && !new_keys.contains(&k) {
                new_keys.push(k);
            }
        }
        let free = self.sem.available_permits();
        let would_wait = (waiting + new_keys.len()).saturating_sub(free);
        if would_wait > self.cfg.max_queue {
            return Err(SubmitError::QueueFull {
                waiting,
                needed: new_keys.len(),
                max_queue: self.cfg.max_queue,
            });
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let created_unix = unix_now();
        let id = format!("inj-{}-{seq}", (created_unix * 1e3) as u64);
        let mut parts = Vec::with_capacity(blocks.len());
        for b in blocks {
            let k = (b.block_id.clone(), model.to_string(), target.url.clone());
            if let Some(t) = st.inflight.get(&k) {
                // joined: an earlier job's transfer, or a duplicate id in this job
                self.metrics
                    .transfers
                    .with_label_values(&["deduplicated"])
                    .inc();
                parts.push((t.clone(), true));
                continue;
            }
            let (done, _) = watch::channel(false);
            let t = Arc::new(Transfer {
                block_id: b.block_id,
                model: model.to_string(),
                target: target.clone(),
                link: link.clone(),
                world_size: b.world_size.max(1) as usize,
                keys: b.keys,
                logical_bytes_per_key: b.logical_bytes_per_key,
                queued_at: Instant::now(),
                st: Mutex::new(TransferState {
                    status: Status::Queued,
                    keys_skipped: 0,
                    keys_copied: 0,
                    stored_bytes: 0,
                    error: None,
                    started_at: None,
                    copy_started_at: None,
                    finished_at: None,
                }),
                done,
            });
            st.inflight.insert(k, t.clone());
            tokio::spawn(self.clone().run(t.clone()));
            parts.push((t, false));
        }
        let job = Arc::new(Job {
            id: id.clone(),
            model: model.to_string(),
            target,
            created: Instant::now(),
            created_unix,
            parts,
        });
        st.jobs.insert(id, job.clone());
        drop(st);
        self.update_gauges();
        let me = self.clone();
        let watched = job.clone();
        tokio::spawn(async move {
            futures_join_all(watched.parts.iter().map(|(t, _)| t.clone())).await;
            let result = match watched.status() {
                Status::Done => "done",
                _ => "failed",
            };
            me.metrics.jobs.with_label_values(&[result]).inc();
            let mut st = me.state();
            st.finished.push_back(watched.id.clone());
            while st.finished.len() > me.cfg.job_history {
                if let Some(old) = st.finished.pop_front() {
                    st.jobs.remove(&old);
                }
            }
        });
        Ok(job)
    }

    /// A job by id (unfinished, or among the last `job_history` finished).
    pub fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.state().jobs.get(id).cloned()
    }

    pub(crate) async fn open_target(&self, url: &str) -> Result<Arc<dyn KvStore>, StoreError> {
        let mut stores = self.stores.lock().await;
        if let Some(s) = stores.get(url) {
            return Ok(s.clone());
        }
        let s = open_store(url).await?;
        stores.insert(url.to_string(), s.clone());
        Ok(s)
    }

    async fn run(self: Arc<Self>, t: Arc<Transfer>) {
        let permit = self.sem.clone().acquire_owned().await;
        let started = Instant::now();
        {
            let mut st = t.state();
            st.status = Status::Running;
            st.started_at = Some(started);
        }
        {
            let wait_ms = (started - t.queued_at).as_secs_f64() * 1e3;
            let mut load = self.load.lock().unwrap_or_else(|p| p.into_inner());
            load.queue_wait_ema_ms = 0.8 * load.queue_wait_ema_ms + 0.2 * wait_ms;
        }
        self.update_gauges();
        let result = if permit.is_ok() {
            self.copy(&t).await
        } else {
            Err("the injector is shutting down".to_string())
        };
        drop(permit);
        let result_label = match &result {
            Ok(()) => {
                let resident_before = t.state().keys_copied == 0;
                let name = t.target.name.clone();
                let model = t.model.clone();
                if let Err(e) = self
                    .registry
                    .update(&t.block_id, |r| {
                        if let Some(m) = r.models.get_mut(&model) {
                            if !m.resident.contains(&name) {
                                m.resident.push(name.clone());
                                m.updated_at = unix_now();
                            }
                        }
                    })
                    .await
                {
                    tracing::warn!("recording residency of {}: {e}", t.block_id);
                }
                if resident_before {
                    "resident"
                } else {
                    "done"
                }
            }
            Err(_) => "failed",
        };
        self.metrics
            .transfers
            .with_label_values(&[result_label])
            .inc();
        let finished = Instant::now();
        {
            let mut st = t.state();
            st.finished_at = Some(finished);
            match result {
                Ok(()) => st.status = Status::Done,
                Err(e) => {
                    tracing::warn!(
                        block = %t.block_id, model = %t.model, target = %t.target.name,
                        "injection failed: {e}"
                    );
                    st.status = Status::Failed;
                    st.error = Some(e);
                }
            }
            if let Some(cs) = st.copy_started_at {
                let secs = (finished - cs).as_secs_f64();
                if secs > 0.0 && st.keys_copied > 0 {
                    let bw = st.keys_copied as f64 * t.logical_bytes_per_key as f64 / secs;
                    let mut load = self.load.lock().unwrap_or_else(|p| p.into_inner());
                    load.bandwidth_ema = if load.bandwidth_ema == 0.0 {
                        bw
                    } else {
                        0.8 * load.bandwidth_ema + 0.2 * bw
                    };
                }
            }
        }
        {
            let mut st = self.state();
            let k = (t.block_id.clone(), t.model.clone(), t.target.url.clone());
            if st.inflight.get(&k).is_some_and(|x| Arc::ptr_eq(x, &t)) {
                st.inflight.remove(&k);
            }
        }
        self.update_gauges();
        t.done.send_replace(true);
    }

    fn update_gauges(&self) {
        let (queued, active) = {
            let st = self.state();
            let mut q = 0;
            let mut a = 0;
            for t in st.inflight.values() {
                match t.status() {
                    Status::Queued => q += 1,
                    Status::Running => a += 1,
                    _ => {}
                }
            }
            (q, a)
        };
        self.metrics.queue_len.set(queued);
        self.metrics.active.set(active);
    }

    /// Copy what the target lacks. Errors are messages for the job's `error`.
    async fn copy(&self, t: &Transfer) -> Result<(), String> {
        let target = format!("target {} ({})", t.target.name, redact_url(&t.target.url));
        let dst = self
            .open_target(&t.target.url)
            .await
            .map_err(|e| format!("cannot open {target}: {e}"))?;
        let keys = &t.keys;
        let ws = t.world_size;
        let total_chunks = keys.len() / ws;
        let present = dst
            .longest_present_prefix(keys)
            .await
            .map_err(|e| format!("checking {target} for chunks already present: {e}"))?;
        let start = present / ws * ws;
        t.state().keys_skipped = start;
        if start == keys.len() {
            return Ok(());
        }
        let rest = &keys[start..];
        let in_source = self
            .source
            .longest_present_prefix(rest)
            .await
            .map_err(|e| {
                format!(
                    "reading the KDN store {}: {e} (0 of {total_chunks} chunks copied)",
                    self.source_url
                )
            })?;
        if in_source < rest.len() {
            let msg = format!(
                "the KV of this block is not (or no longer) complete in the KDN store {}: \
                 chunk key {} is missing; register the block again to re-warm it",
                self.source_url, rest[in_source]
            );
            self.mark_missing_in_source(t, &msg).await;
            return Err(msg);
        }
        t.state().copy_started_at = Some(Instant::now());
        let done_chunks = |t: &Transfer| {
            let st = t.state();
            (st.keys_skipped + st.keys_copied) / ws
        };
        let batches: Vec<&[String]> = rest.chunks(self.cfg.batch_chunks.max(1)).collect();
        let mut prefetched: Option<Result<Vec<Option<Chunk>>, StoreError>> = None;
        for (i, batch) in batches.iter().enumerate() {
            let logical = batch.len() as u64 * t.logical_bytes_per_key;
            let slot_end = t.link.as_ref().map(|l| l.reserve(logical));
            let got = match prefetched.take() {
                Some(r) => r,
                None => self.source.get_chunks(batch).await,
            };
            let got = got.map_err(|e| {
                format!(
                    "reading the KDN store {} failed after {} of {total_chunks} chunks: {e}",
                    self.source_url,
                    done_chunks(t)
                )
            })?;
            let mut items = Vec::with_capacity(batch.len());
            for (k, c) in batch.iter().zip(got) {
                match c {
                    Some(c) => items.push((k.clone(), c)),
                    None => {
                        return Err(format!(
                            "chunk key {k} vanished from the KDN store {} during the copy \
                             (after {} of {total_chunks} chunks)",
                            self.source_url,
                            done_chunks(t)
                        ))
                    }
                }
            }
            let stored: u64 = items.iter().map(|(_, c)| c.size()).sum();
            let write_err = |e: StoreError| {
                format!(
                    "writing to {target} failed after {} of {total_chunks} chunks: {e}",
                    done_chunks(t)
                )
            };
            match batches.get(i + 1) {
                Some(next) => {
                    let (w, r) = tokio::join!(dst.put_chunks(&items), self.source.get_chunks(next));
                    w.map_err(write_err)?;
                    prefetched = Some(r);
                }
                None => dst.put_chunks(&items).await.map_err(write_err)?,
            }
            {
                let mut st = t.state();
                st.keys_copied += batch.len();
                st.stored_bytes += stored;
            }
            self.metrics
                .injected_bytes
                .with_label_values(&[&t.target.name])
                .inc_by(logical);
            self.metrics
                .stored_bytes
                .with_label_values(&[&t.target.name])
                .inc_by(stored);
            self.load
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .window
                .push_back((Instant::now(), t.target.name.clone(), logical));
            if let Some(end) = slot_end {
                tokio::time::sleep_until(end.into()).await;
            }
        }
        Ok(())
    }

    async fn mark_missing_in_source(&self, t: &Transfer, msg: &str) {
        let model = t.model.clone();
        let msg = msg.to_string();
        let r = self
            .registry
            .update(&t.block_id, |r| {
                if let Some(m) = r.models.get_mut(&model) {
                    if m.status == BlockStatus::KvReady {
                        m.status = BlockStatus::Failed;
                        m.error = Some(msg);
                        m.updated_at = unix_now();
                    }
                }
            })
            .await;
        if let Err(e) = r {
            tracing::warn!("recording the missing KV of {}: {e}", t.block_id);
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use bytes::Bytes;

    #[test]
    fn shaper_serialises_reservations() {
        let l = LinkShaper::new(1_000_000.0); // 1 MB/s
        let t0 = Instant::now();
        let a = l.reserve(100_000);
        let b = l.reserve(100_000);
        assert!(a >= t0 + Duration::from_millis(99));
        assert!(b >= a + Duration::from_millis(99));
        assert!(l.backlog() >= Duration::from_millis(150));
        assert_eq!(LinkShaper::from_gbps(8.0).bytes_per_sec(), 1e9);
    }

    async fn setup(
        n_keys: usize,
        name: &str,
    ) -> (Arc<Injector>, MemoryStore, Vec<String>, Arc<Registry>) {
        let src = MemoryStore::new();
        let keys: Vec<String> = (0..n_keys)
            .map(|i| format!("m@1@0@{i:x}@bfloat16"))
            .collect();
        for k in &keys {
            src.put_chunk(
                k,
                &Chunk {
                    kv_bytes: Bytes::from(vec![7u8; 1000]),
                    metadata: Bytes::from(vec![1u8; 28]),
                },
            )
            .await
            .unwrap();
        }
        let reg = Arc::new(
            Registry::open(&format!("memory://inject-unit-{name}"), "x:")
                .await
                .unwrap(),
        );
        let inj = Injector::new(
            InjectorConfig {
                max_concurrent: 1,
                max_queue: 1,
                batch_chunks: 2,
                job_history: 2,
            },
            Arc::new(src.clone()),
            "memory://src",
            reg.clone(),
            Arc::new(KdnMetrics::new()),
        );
        (inj, src, keys, reg)
    }

    fn spec(id: &str, keys: &[String]) -> BlockSpec {
        BlockSpec {
            block_id: id.into(),
            keys: keys.to_vec(),
            world_size: 1,
            logical_bytes_per_key: 1_000_000,
        }
    }

    #[tokio::test]
    async fn copies_dedups_shapes_and_queues() {
        let (inj, _src, keys, _reg) = setup(6, "a").await;
        let target = Target {
            name: "t".into(),
            url: "memory://inject-unit-target-a".into(),
            link_gbps: Some(0.4), // 50 MB/s: 6 MB take 120 ms
        };
        let j1 = inj
            .submit("m", target.clone(), vec![spec("b1", &keys)])
            .unwrap();
        let j2 = inj
            .submit("m", target.clone(), vec![spec("b1", &keys)])
            .unwrap();
        assert_eq!(j2.view()["knowledge"][0]["deduplicated"], true);
        // the worker is busy with b1: one transfer may wait, a second may not
        let j3 = inj
            .submit("m", target.clone(), vec![spec("b2", &keys[..2])])
            .unwrap();
        let e = inj
            .submit("m", target.clone(), vec![spec("b3", &keys[..2])])
            .unwrap_err();
        assert!(matches!(e, SubmitError::QueueFull { .. }), "{e}");
        let load = inj.load(std::slice::from_ref(&target));
        assert_eq!(load.active_transfers + load.pending_transfers, 2);
        assert!(load.backlog_bytes > 0);
        assert!(j1.wait(Duration::from_secs(5)).await);
        assert!(j2.wait(Duration::from_secs(5)).await);
        assert!(j3.wait(Duration::from_secs(5)).await);
        let v = j1.view();
        assert_eq!(v["status"], "done", "{v}");
        assert_eq!(v["chunks_done"], 6);
        assert_eq!(v["bytes_done"], 6_000_000);
        assert_eq!(v["stored_bytes"], 6 * 1028);
        let bw = v["knowledge"][0]["bandwidth_bytes_per_s"].as_f64().unwrap();
        assert!(bw > 0.0 && bw <= 52e6, "shaped to 50 MB/s: {bw}");
        let dst = crate::store::named_memory_store("inject-unit-target-a");
        assert_eq!(dst.longest_present_prefix(&keys).await.unwrap(), 6);
        // again: already resident, nothing moved
        let j4 = inj.submit("m", target, vec![spec("b1", &keys)]).unwrap();
        assert!(j4.wait(Duration::from_secs(5)).await);
        let v = j4.view();
        assert_eq!(v["knowledge"][0]["already_resident"], true, "{v}");
        assert_eq!(v["bytes_moved"], 0);
        // history is bounded: the oldest finished job is dropped (by the task that
        // finishes a job; wait for that, not for a guessed 50 ms)
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while inj.job(&j1.id).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "history never trimmed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(inj.job(&j4.id).is_some());
    }

    #[tokio::test]
    async fn missing_source_chunks_fail_clearly() {
        let (inj, src, keys, _reg) = setup(4, "b").await;
        src.raw_delete(&crate::keys::redis_metadata_key(&keys[2]));
        let target = Target {
            name: "memory://inject-unit-target-b".into(),
            url: "memory://inject-unit-target-b".into(),
            link_gbps: None,
        };
        let j = inj.submit("m", target, vec![spec("b1", &keys)]).unwrap();
        assert!(j.wait(Duration::from_secs(5)).await);
        assert_eq!(j.status(), Status::Failed);
        let err = j.error().unwrap();
        assert!(err.contains("not (or no longer) complete"), "{err}");
        assert_eq!(j.view()["chunks_done"], 0);
        let dst = crate::store::named_memory_store("inject-unit-target-b");
        assert_eq!(dst.chunk_count(), 0);
    }
}
