//! Knowledge records: a block's text and metadata, and per model its prefix, keys,
//! status and residency ([`ModelEntry`]); their content digest and JSON views.

use std::collections::BTreeMap;

use cacheroute_decisions::prompt::ChatTemplate;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Where a block stands for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockStatus {
    /// Laid out and keyed; its KV is not (known to be) in the KDN store yet.
    Registered,
    /// A producer is computing its KV.
    Warming,
    /// Every chunk key of the prefix is in the KDN store: it can be injected.
    KvReady,
    /// Warm-up failed (`error` says why); the block can still be used as text.
    Failed,
    /// Registered while the warm-up queue was full (`max_pending_warmups`): it is warmed
    /// up when the queue has room again; it can be used as text meanwhile.
    Deferred,
}

impl BlockStatus {
    pub const ALL: [BlockStatus; 5] = [
        BlockStatus::Registered,
        BlockStatus::Warming,
        BlockStatus::KvReady,
        BlockStatus::Failed,
        BlockStatus::Deferred,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BlockStatus::Registered => "registered",
            BlockStatus::Warming => "warming",
            BlockStatus::KvReady => "kv_ready",
            BlockStatus::Failed => "failed",
            BlockStatus::Deferred => "deferred",
        }
    }
}

/// A block's prefix and KV state for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub status: BlockStatus,
    /// Why the last warm-up failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The template the prefix was laid out for.
    pub template: ChatTemplate,
    /// Prefix tokens (template head + padded content): a multiple of `chunk_size`.
    pub tokens: usize,
    /// Chunks of the prefix (`tokens / chunk_size`).
    pub chunks: usize,
    pub chunk_size: usize,
    /// Padding units appended to the text.
    pub padding: usize,
    /// Logical KV bytes of the prefix (`tokens × kv_bytes_per_token`).
    pub bytes: u64,
    /// Ranks per chunk (one key each).
    pub world_size: u32,
    /// The exact content of the leading system message the gateway must send.
    pub content: String,
    /// LMCache keys, chunk-major (chunk 0 rank 0, chunk 0 rank 1, …).
    pub keys: Vec<String>,
    /// Injection targets (configured name, or store URL) that received the whole block.
    #[serde(default)]
    pub resident: Vec<String>,
    /// Unix seconds of the last change.
    pub updated_at: f64,
}

/// One knowledge block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Normalised text.
    pub text: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form client metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Value>,
    /// Unix seconds.
    pub created_at: f64,
    /// Per served model name.
    pub models: BTreeMap<String, ModelEntry>,
}

/// What a JSON view of a record includes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Detail {
    /// Each model's padded `content`.
    pub content: bool,
    /// Each model's chunk `keys`.
    pub keys: bool,
    /// The block's `text` (on by default in views made by [`KnowledgeRecord::to_json`]).
    pub omit_text: bool,
}

impl KnowledgeRecord {
    /// Text the search index sees.
    pub fn index_text(&self) -> String {
        cacheroute_decisions::bm25::document_text(self.title.as_deref(), &self.tags, &self.text)
    }

    /// Size of the text in bytes.
    pub fn text_bytes(&self) -> usize {
        self.text.len()
    }

    /// SHA-256 (hex) over everything a gateway copies as text: title, tags, text and each
    /// model's `content`. Status, residency and timestamps are left out, so the digest
    /// changes only when the bytes a gateway must fetch change.
    pub fn content_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        // length-prefixed fields, so that moving bytes between fields changes the digest
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(self.title.as_deref().unwrap_or("").as_bytes());
        field(&[u8::from(self.title.is_some())]);
        for t in &self.tags {
            field(t.as_bytes());
        }
        field(b"\0text");
        field(self.text.as_bytes());
        for (name, m) in &self.models {
            field(name.as_bytes());
            field(m.content.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Whether `other` has the same digest inputs (cheaper than hashing both).
    pub(super) fn same_content(&self, other: &KnowledgeRecord) -> bool {
        self.title == other.title
            && self.tags == other.tags
            && self.text == other.text
            && self.models.len() == other.models.len()
            && self
                .models
                .iter()
                .zip(&other.models)
                .all(|((a, x), (b, y))| a == b && x.content == y.content)
    }

    /// The API view: `{"id","object","title","text","tags","created_at","models":{name:
    /// {status, error?, tokens, chunks, chunk_size, bytes, padding, world_size, resident,
    /// updated_at, content?, keys?}}}`.
    pub fn to_json(&self, detail: Detail) -> Value {
        let mut models = Map::new();
        for (name, m) in &self.models {
            let mut v = json!({
                "status": m.status,
                "template": m.template,
                "tokens": m.tokens,
                "chunks": m.chunks,
                "chunk_size": m.chunk_size,
                "bytes": m.bytes,
                "padding": m.padding,
                "world_size": m.world_size,
                "resident": m.resident,
                "updated_at": m.updated_at,
            });
            if let Some(e) = &m.error {
                v["error"] = json!(e);
            }
            if detail.content {
                v["content"] = json!(m.content);
            }
            if detail.keys {
                v["keys"] = json!(m.keys);
            }
            models.insert(name.clone(), v);
        }
        let mut v = json!({
            "id": self.id,
            "object": "knowledge",
            "title": self.title,
            "tags": self.tags,
            "text_bytes": self.text.len(),
            "created_at": self.created_at,
            "models": models,
        });
        if !detail.omit_text {
            v["text"] = json!(self.text);
        }
        if let Some(m) = &self.meta {
            v["meta"] = m.clone();
        }
        v
    }
}
