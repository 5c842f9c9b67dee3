//! The KDN's payloads that gateways (and agents) read:
//!
//! * the registry: `GET /v1/knowledge/snapshot` ([`Snapshot`], versioned by its ETag,
//!   `If-None-Match` answers 304) and `GET /v1/knowledge/contents?ids=...`
//!   ([`Contents`]), both made of [`SnapshotBlock`]s;
//! * `GET /v1/load` ([`KdnLoad`]);
//! * injection: `POST /v1/inject` ([`InjectRequest`]) answered, like
//!   `GET /v1/inject/{job}`, by an [`InjectJob`].
//!
//! The KDN writes more fields than listed here (e.g. `created_at`, `padding`,
//! `updated_at` in a block); readers ignore what they do not use.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `status` of a block's model entry whose KV can be injected.
pub const KV_READY: &str = "kv_ready";

/// A block's prefix and KV state for one model, on one KDN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockModel {
    /// `registered`, `warming`, `kv_ready`, `failed` or `deferred`. Kept as text so that
    /// a reader does not fail on a status a newer KDN adds; only `kv_ready` means the
    /// KV can be injected.
    pub status: String,
    /// Chat template the prefix was laid out for (`llama3`, `chatml`, `plain`).
    pub template: String,
    /// Prefix tokens (a whole number of chunks).
    pub tokens: u64,
    pub chunks: u64,
    pub chunk_size: u64,
    /// Logical KV bytes of the prefix.
    pub bytes: u64,
    /// The exact content of the knowledge message, as registered. Absent from a
    /// text-less snapshot (`"text": false`), where it reads as empty until the reader
    /// fetches the block from `/v1/knowledge/contents`; always present there and in
    /// a full snapshot.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content: String,
    /// Injection targets holding the whole block.
    pub resident: Vec<String>,
}

impl BlockModel {
    pub fn kv_ready(&self) -> bool {
        self.status == KV_READY
    }
}

/// One block as a KDN's snapshot or contents lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotBlock {
    pub id: String,
    /// The block's title; null when it has none.
    pub title: Option<String>,
    pub tags: Vec<String>,
    /// The block's text. Absent from a text-less snapshot (`"text": false`), where it
    /// reads as empty until fetched from `/v1/knowledge/contents` (see
    /// [`BlockModel::content`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// Per served model name.
    pub models: BTreeMap<String, BlockModel>,
    /// The KDN's digest of title, tags, text and contents: a block whose digest the
    /// reader already holds need not be fetched again. Absent from a single record's
    /// view (`GET /v1/knowledge/{id}`); always in snapshots and contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Size of the text in bytes (known before the text is fetched).
    pub text_bytes: u64,
}

/// `GET /v1/knowledge/snapshot` (`"object": "knowledge.snapshot"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The KDN's id (`kdn@<listen>` by default).
    pub kdn_id: String,
    /// The registry version (`<epoch>-<counter>`), also the ETag.
    pub version: String,
    /// Whether blocks come with their text and contents (`?text=false` leaves them out).
    pub text: bool,
    pub blocks: Vec<SnapshotBlock>,
}

/// `GET /v1/knowledge/contents?ids=...` (`"object": "list"`): the named blocks whole;
/// ids deleted since the snapshot are left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contents {
    pub data: Vec<SnapshotBlock>,
}

/// One injection target in [`KdnLoad`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KdnTargetLoad {
    /// The target's store URL, credentials redacted.
    pub store: String,
    pub pending_transfers: u64,
    pub active_transfers: u64,
    /// Logical KV bytes injected per second into this target over the last 10 s.
    pub recent_bytes_per_s: f64,
    /// The emulated link speed; null when the target is not shaped.
    pub link_gbps: Option<f64>,
    /// How long a new transfer would wait for the emulated link, in ms.
    pub link_backlog_ms: f64,
}

/// `GET /v1/load` of a KDN (`"object": "kdn.load"`): what the scheduler's KDN overload
/// filter and the injection decision read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KdnLoad {
    /// The KDN's id.
    pub kdn_id: String,
    /// Jobs none of whose transfers has started.
    pub pending_jobs: u64,
    /// Jobs with a transfer started and not all finished.
    pub active_jobs: u64,
    /// Transfers waiting for a worker.
    pub pending_transfers: u64,
    /// Transfers copying.
    pub active_transfers: u64,
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
    pub max_concurrent_injections: u64,
    /// Most transfers waiting; a job past it is refused (503 `queue_full`).
    pub max_queue: u64,
    /// Blocks in the registry.
    pub knowledge_blocks: u64,
    /// Warm-ups queued or running.
    pub warmups_queued: u64,
    /// Blocks whose warm-up waits for room in the queue.
    pub warmups_deferred: u64,
    pub targets: BTreeMap<String, KdnTargetLoad>,
}

/// `POST /v1/inject`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InjectRequest {
    pub knowledge_ids: Vec<String>,
    /// The served model name whose prefix is injected.
    pub model: String,
    /// A configured target name, or a store URL.
    pub target: String,
    /// Answer when the job has finished (or `timeout_ms` passed), not at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
    /// How long `wait` waits; absent: the KDN's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Where an injection job (or one of its transfers) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Failed,
}

impl JobStatus {
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Done | JobStatus::Failed)
    }
}

/// An injection job (`"object": "kdn.inject_job"`), the answer of `POST /v1/inject` and
/// `GET /v1/inject/{job}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InjectJob {
    pub id: String,
    pub status: JobStatus,
    pub model: String,
    /// The target's configured name (or its store URL).
    pub target: String,
    pub chunks_total: u64,
    pub chunks_done: u64,
    /// Logical KV bytes of the job, and those already in the target.
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Logical KV bytes this job copied itself (chunks already in the target, or
    /// copied by a job it joined, are not counted): what its link time is for.
    pub bytes_moved: u64,
    /// Time the job's transfers waited for a copy slot at the KDN, ms.
    pub queue_wait_ms: f64,
    pub elapsed_ms: f64,
    /// Why the job failed; null unless `status` is `failed`.
    pub error: Option<String>,
}
