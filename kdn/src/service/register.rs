//! Registration: a request's validation (text, id, title, tags, meta, models), its
//! layout for each model, the rate limit, and the all-or-none write to the registry
//! that hands the new (block, model) pairs to the warm-up queue.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use cacheroute_decisions::prompt::normalize_knowledge_text;

use super::{lock, unix_now, Kdn, KdnError, WarmKey};
use crate::limits::Refused;
use crate::registry::{BlockStatus, KnowledgeRecord, RegisterError, Registered};

/// A registration (`POST /v1/knowledge` body, or one JSONL line).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The knowledge text (normalised: CRLF → LF, trimmed).
    pub text: String,
    /// Block id (default: SHA-256 hex of the normalised text).
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Served model names to register for (default: every configured model).
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Free-form JSON kept with the record.
    #[serde(default)]
    pub meta: Option<Value>,
    /// Answer only when every warm-up finished.
    #[serde(default)]
    pub wait: bool,
}

/// Ids that name endpoints under `/v1/knowledge/`: such a block could not be read back.
const RESERVED_IDS: [&str; 4] = ["bulk", "search", "snapshot", "contents"];

fn valid_id(id: &str) -> bool {
    !RESERVED_IDS.contains(&id)
        && !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// The default id of a text: SHA-256 of the normalised text, 64 lowercase hex digits
/// (the original CacheRoute's `kid`).
pub fn default_id(normalized_text: &str) -> String {
    hex::encode(Sha256::digest(normalized_text.as_bytes()))
}

impl Kdn {
    /// Check one registration and lay it out for its models (CPU work; no I/O).
    fn prepare(&self, req: &RegisterRequest) -> Result<(KnowledgeRecord, Vec<Vec<u32>>), KdnError> {
        let text = normalize_knowledge_text(&req.text);
        if text.is_empty() {
            return Err(KdnError::bad_request(
                "text_empty",
                "text is empty (after trimming whitespace)",
            ));
        }
        let max = self.config.kdn.max_text_bytes;
        if text.len() > max {
            return Err(KdnError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "text_too_large",
                format!(
                    "text is {} bytes; this KDN accepts at most {max} (max_text_bytes)",
                    text.len()
                ),
            ));
        }
        let id = match &req.id {
            Some(id) if !valid_id(id) => {
                return Err(KdnError::bad_request(
                    "invalid_id",
                    format!(
                        "id {id:?}: use 1-128 characters among A-Z a-z 0-9 - _ . :, \
                         other than {}",
                        RESERVED_IDS.join(", ")
                    ),
                ))
            }
            Some(id) => id.clone(),
            None => default_id(&text),
        };
        if let Some(t) = &req.title {
            if t.chars().count() > 512 {
                return Err(KdnError::bad_request(
                    "invalid_title",
                    "title: at most 512 characters",
                ));
            }
        }
        if req.tags.len() > 32
            || req
                .tags
                .iter()
                .any(|t| t.is_empty() || t.chars().count() > 64)
        {
            return Err(KdnError::bad_request(
                "invalid_tags",
                "tags: at most 32 tags of 1-64 characters each",
            ));
        }
        if let Some(m) = &req.meta {
            if !m.is_object() {
                return Err(KdnError::bad_request(
                    "invalid_meta",
                    "meta must be a JSON object",
                ));
            }
        }
        let names: Vec<String> = match &req.models {
            Some(v) if v.is_empty() => {
                return Err(KdnError::bad_request(
                    "no_models",
                    "models is empty; leave it out to register for every configured model",
                ))
            }
            Some(v) => v.clone(),
            None => self.models.keys().cloned().collect(),
        };
        if names.is_empty() {
            return Err(KdnError::bad_request(
                "no_models",
                "this KDN has no models configured; add [[models]] to its configuration",
            ));
        }
        let mut models = BTreeMap::new();
        let mut ids = Vec::new();
        for name in &names {
            let m = self.model(name)?;
            let (entry, token_ids) = m.prepare(&text)?;
            models.insert(name.clone(), entry);
            ids.push(token_ids);
        }
        Ok((
            KnowledgeRecord {
                id,
                title: req.title.clone(),
                text,
                tags: req.tags.clone(),
                meta: req.meta.clone(),
                created_at: unix_now(),
                models,
            },
            ids,
        ))
    }

    /// Admit `n` registrations through the `max_registrations_per_s` bucket (HTTP
    /// callers; preload files are the operator's own and are not counted).
    pub fn admit_registrations(&self, n: usize) -> Result<(), KdnError> {
        let k = &self.config.kdn;
        match lock(&self.registrations).take(n, Instant::now()) {
            Ok(()) => Ok(()),
            Err(Refused::TooMany { burst }) => Err(KdnError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "too_many_blocks",
                format!(
                    "{n} blocks in one registration; this KDN admits at most {burst} at once \
                     ([kdn] registration_burst): split the bulk"
                ),
            )),
            Err(Refused::Later(s)) => {
                let mut e = KdnError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "rate_limited",
                    format!(
                        "registration rate exceeded: this KDN admits {} blocks a second with \
                         bursts of {} ([kdn] max_registrations_per_s, registration_burst); \
                         retry in {s:.1} s",
                        k.max_registrations_per_s, k.registration_burst
                    ),
                );
                e.retry_after_s = Some(s.ceil().max(1.0) as u64);
                Err(e)
            }
        }
    }

    /// Register blocks, all or none: everything is validated, laid out and keyed before
    /// anything is stored. Warm-ups start in the background; with `wait` this returns
    /// when they finished. Returns the records and whether any was created.
    pub async fn register(
        self: &Arc<Self>,
        reqs: Vec<RegisterRequest>,
        wait: bool,
    ) -> Result<(Vec<KnowledgeRecord>, bool), KdnError> {
        if reqs.is_empty() {
            return Err(KdnError::bad_request("no_knowledge", "nothing to register"));
        }
        let me = self.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            reqs.iter()
                .enumerate()
                .map(|(i, r)| {
                    me.prepare(r).map_err(|mut e| {
                        if reqs.len() > 1 {
                            e.message = format!("line {}: {}", i + 1, e.message);
                        }
                        e
                    })
                })
                .collect::<Result<Vec<_>, KdnError>>()
        })
        .await
        .map_err(|e| KdnError::internal(format!("registration task: {e}")))??;
        let mut records = Vec::with_capacity(prepared.len());
        {
            // warm-ups past the queue's room are registered `deferred` (no task, no
            // prepared ids kept): the queue, not the registration rate, bounds the
            // producer's backlog
            let mut room = self.warm_room();
            let mut cache = self.prepared_ids.lock().unwrap_or_else(|p| p.into_inner());
            for (mut rec, ids) in prepared {
                for ((model, entry), ids) in rec.models.iter_mut().zip(ids) {
                    if room > 0 {
                        room -= 1;
                        cache.insert((rec.id.clone(), model.clone()), ids);
                    } else {
                        entry.status = BlockStatus::Deferred;
                        entry.error = Some(self.deferred_reason());
                    }
                }
                records.push(rec);
            }
        }
        let keys: Vec<WarmKey> = records
            .iter()
            .flat_map(|r| r.models.keys().map(|m| (r.id.clone(), m.clone())))
            .collect();
        let outcome = self.registry.register(records).await.map_err(|e| {
            self.forget_prepared(&keys);
            match e {
                RegisterError::Conflict(_) => KdnError::conflict("id_conflict", e.to_string()),
                RegisterError::Duplicate(_) => KdnError::bad_request("duplicate_id", e.to_string()),
                RegisterError::Full { .. } => KdnError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "capacity_error",
                    "registry_full",
                    e.to_string(),
                ),
                RegisterError::Backend(e) => KdnError::unavailable(
                    "registry_unavailable",
                    format!("the registry could not store the knowledge: {e}"),
                ),
            }
        })?;
        let created = outcome.iter().any(|o| matches!(o, Registered::Created(_)));
        let mut to_warm = Vec::new();
        let mut deferred = Vec::new();
        for o in &outcome {
            let r = o.record();
            for (model, e) in &r.models {
                match e.status {
                    BlockStatus::Registered => to_warm.push((r.id.clone(), model.clone())),
                    BlockStatus::Deferred => deferred.push((r.id.clone(), model.clone())),
                    _ => {}
                }
            }
        }
        {
            let mut d = lock(&self.deferred);
            for k in deferred {
                d.push(k);
            }
        }
        // ids prepared for entries that were not (re)registered are not needed
        let warm_set: HashSet<&WarmKey> = to_warm.iter().collect();
        let unused: Vec<WarmKey> = keys
            .iter()
            .filter(|k| !warm_set.contains(k))
            .cloned()
            .collect();
        self.forget_prepared(&unused);
        let waiters = self.spawn_warmups(to_warm);
        if wait {
            let limit = Duration::from_secs_f64(
                self.config.kdn.warmup_timeout_s + self.config.kdn.warmup_verify_s + 5.0,
            );
            let _ = tokio::time::timeout(limit, async {
                for mut w in waiters {
                    let _ = w.wait_for(|d| *d).await;
                }
            })
            .await;
        }
        let records = outcome
            .iter()
            .map(|o| {
                self.registry
                    .get(&o.record().id)
                    .unwrap_or_else(|| o.record().clone())
            })
            .collect();
        Ok((records, created))
    }

    fn forget_prepared(&self, keys: &[WarmKey]) {
        let mut cache = self.prepared_ids.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            cache.remove(k);
        }
    }

    /// Parse a JSONL body (one [`RegisterRequest`] per non-empty line) and register it.
    pub async fn register_jsonl(
        self: &Arc<Self>,
        body: &str,
        wait: bool,
    ) -> Result<Vec<KnowledgeRecord>, KdnError> {
        let mut reqs = Vec::new();
        for (i, line) in body.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| {
                KdnError::bad_request("invalid_json", format!("line {}: invalid JSON: {e}", i + 1))
            })?;
            let r: RegisterRequest = serde_json::from_value(v).map_err(|e| {
                KdnError::bad_request("invalid_registration", format!("line {}: {e}", i + 1))
            })?;
            reqs.push(r);
        }
        Ok(self.register(reqs, wait).await?.0)
    }
}
