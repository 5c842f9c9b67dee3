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
//!
//! This module holds the [`Injector`] (its limits, the request types and `submit`);
//! `link` holds the link shaper, `job` the transfers and jobs and their views,
//! `copy` the transfer worker (the pipelined copy), `load` the load report.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{watch, Semaphore};

use crate::metrics::KdnMetrics;
use crate::registry::{redact_url, Registry};
use crate::store::{open_store, KvStore, StoreError};

mod copy;
mod job;
mod link;
mod load;

pub use copy::CopyError;
use job::{futures_join_all, TransferState};
pub use job::{Job, Status, Transfer};
pub use link::LinkShaper;
use load::LoadTracker;
pub use load::{LoadSnapshot, TargetLoad, LOAD_WINDOW};

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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{Chunk, MemoryStore};
    use bytes::Bytes;

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
