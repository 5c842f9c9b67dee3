//! Transfers (one block, one model, one target store) and jobs (one inject request, made
//! of transfers, some shared with other jobs): their state and their JSON views.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{LinkShaper, Target};
use crate::registry::redact_url;

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
pub(super) struct TransferState {
    pub(super) status: Status,
    /// Keys already in the target when the transfer started.
    pub(super) keys_skipped: usize,
    /// Keys copied (their batch's write returned).
    pub(super) keys_copied: usize,
    /// Bytes written to the target store.
    pub(super) stored_bytes: u64,
    pub(super) error: Option<String>,
    pub(super) started_at: Option<Instant>,
    pub(super) copy_started_at: Option<Instant>,
    pub(super) finished_at: Option<Instant>,
}

/// The copy of one block for one model into one target store.
#[derive(Debug)]
pub struct Transfer {
    pub(super) block_id: String,
    pub(super) model: String,
    pub(super) target: Target,
    pub(super) link: Option<Arc<LinkShaper>>,
    pub(super) keys: Vec<String>,
    pub(super) world_size: usize,
    pub(super) logical_bytes_per_key: u64,
    pub(super) queued_at: Instant,
    pub(super) st: Mutex<TransferState>,
    pub(super) done: watch::Sender<bool>,
}

impl Transfer {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, TransferState> {
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

    pub(super) fn remaining_logical(&self) -> u64 {
        let st = self.state();
        let left = self
            .keys
            .len()
            .saturating_sub(st.keys_skipped + st.keys_copied);
        left as u64 * self.logical_bytes_per_key
    }

    pub(super) async fn wait(&self) {
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
    pub(super) created: Instant,
    pub(super) created_unix: f64,
    /// (transfer, deduplicated)
    pub(super) parts: Vec<(Arc<Transfer>, bool)>,
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

pub(super) async fn futures_join_all(ts: impl Iterator<Item = Arc<Transfer>>) {
    for t in ts {
        t.wait().await;
    }
}
