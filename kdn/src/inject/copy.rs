//! The transfer worker: waiting for a copy slot, copying what the target lacks in
//! pipelined batches through the link shaper, and recording the outcome (residency in
//! the registry, metrics, bandwidth).

use std::sync::Arc;
use std::time::Instant;

use super::{unix_now, Injector, Status, Transfer};
use crate::registry::{redact_url, BlockStatus};
use crate::store::{Chunk, StoreError};

/// Why a transfer failed; its message is the transfer's `error` in the job's view.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("the injector is shutting down")]
    ShuttingDown,
    #[error("cannot open {target}: {source}")]
    OpenTarget {
        target: String,
        #[source]
        source: StoreError,
    },
    #[error("checking {target} for chunks already present: {source}")]
    CheckTarget {
        target: String,
        #[source]
        source: StoreError,
    },
    #[error("reading the KDN store {store}: {source} (0 of {total} chunks copied)")]
    CheckSource {
        store: String,
        total: usize,
        #[source]
        source: StoreError,
    },
    #[error(
        "the KV of this block is not (or no longer) complete in the KDN store {store}: \
         chunk key {key} is missing; register the block again to re-warm it"
    )]
    MissingInSource { store: String, key: String },
    #[error("reading the KDN store {store} failed after {done} of {total} chunks: {source}")]
    ReadSource {
        store: String,
        done: usize,
        total: usize,
        #[source]
        source: StoreError,
    },
    #[error(
        "chunk key {key} vanished from the KDN store {store} during the copy (after {done} \
         of {total} chunks)"
    )]
    Vanished {
        key: String,
        store: String,
        done: usize,
        total: usize,
    },
    #[error("writing to {target} failed after {done} of {total} chunks: {source}")]
    Write {
        target: String,
        done: usize,
        total: usize,
        #[source]
        source: StoreError,
    },
}

impl Injector {
    pub(super) async fn run(self: Arc<Self>, t: Arc<Transfer>) {
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
            Err(CopyError::ShuttingDown)
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
                    st.error = Some(e.to_string());
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
    /// Copy what the target lacks. Errors become the job's `error` message.
    async fn copy(&self, t: &Transfer) -> Result<(), CopyError> {
        let target = format!("target {} ({})", t.target.name, redact_url(&t.target.url));
        let dst =
            self.open_target(&t.target.url)
                .await
                .map_err(|source| CopyError::OpenTarget {
                    target: target.clone(),
                    source,
                })?;
        let keys = &t.keys;
        let ws = t.world_size;
        let total_chunks = keys.len() / ws;
        let present =
            dst.longest_present_prefix(keys)
                .await
                .map_err(|source| CopyError::CheckTarget {
                    target: target.clone(),
                    source,
                })?;
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
            .map_err(|source| CopyError::CheckSource {
                store: self.source_url.clone(),
                total: total_chunks,
                source,
            })?;
        if in_source < rest.len() {
            let err = CopyError::MissingInSource {
                store: self.source_url.clone(),
                key: rest[in_source].clone(),
            };
            self.mark_missing_in_source(t, &err.to_string()).await;
            return Err(err);
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
            let got = got.map_err(|source| CopyError::ReadSource {
                store: self.source_url.clone(),
                done: done_chunks(t),
                total: total_chunks,
                source,
            })?;
            let mut items = Vec::with_capacity(batch.len());
            for (k, c) in batch.iter().zip(got) {
                match c {
                    Some(c) => items.push((k.clone(), c)),
                    None => {
                        return Err(CopyError::Vanished {
                            key: k.clone(),
                            store: self.source_url.clone(),
                            done: done_chunks(t),
                            total: total_chunks,
                        })
                    }
                }
            }
            let stored: u64 = items.iter().map(|(_, c)| c.size()).sum();
            let write_err = |source: StoreError| CopyError::Write {
                target: target.clone(),
                done: done_chunks(t),
                total: total_chunks,
                source,
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
}
