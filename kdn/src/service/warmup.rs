//! Warm-ups: putting a registered block's KV into the KDN store by prefilling its
//! prefix on the model's producer, at most `max_concurrent_warmups` +
//! `max_pending_warmups` at once, the rest kept in the [`Deferred`] list until room frees.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;

use super::model::PrefixError;
use super::{lock, unix_now, Kdn, KdnError, ModelRuntime, WarmKey};
use crate::registry::{redact_url, BlockStatus, KnowledgeRecord, ModelEntry};
use crate::store::StoreError;

/// Why a warm-up failed; its message is kept as the entry's `error` in the registry.
#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    #[error("checking the KDN store {store}: {source}")]
    Store {
        store: String,
        #[source]
        source: StoreError,
    },
    #[error(
        "no producer is configured for model {model} and the block's KV is not in the KDN \
         store {store}; set `producer` for the model (it can still be used as text)"
    )]
    NoProducer { model: String, store: String },
    #[error("tokenizing: {0}")]
    Tokenizing(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Prefix(#[from] PrefixError),
    #[error("producer {url} unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("producer {url} answered HTTP {status}: {excerpt}")]
    Refused {
        url: String,
        status: reqwest::StatusCode,
        excerpt: String,
    },
    #[error(
        "after the producer's prefill only {present} of {total} chunks are in the KDN store \
         {store} (first missing key {first_missing}); check that the producer's LMCache \
         writes to this store with the same settings: lmcache_model {lmcache_model:?}, scheme \
         {scheme}, chunk_size {chunk_size}, hash seed {hash_seed:?}, dtype {dtype}, world_size \
         {world_size}"
    )]
    Missing {
        present: usize,
        total: usize,
        store: String,
        first_missing: String,
        lmcache_model: String,
        scheme: String,
        chunk_size: usize,
        hash_seed: String,
        dtype: String,
        world_size: u32,
    },
}

/// Deferred warm-ups: each pair once (a set beside the order), forgotten when its block
/// is deleted; entries left in the order by deletes are dropped when they outnumber the
/// live ones, so the list stays within a small multiple of the registry.
#[derive(Default)]
pub struct Deferred {
    order: VecDeque<WarmKey>,
    live: HashSet<WarmKey>,
}

impl Deferred {
    pub(super) fn push(&mut self, key: WarmKey) {
        if self.live.insert(key.clone()) {
            self.order.push_back(key);
        }
        if self.order.len() > 2 * self.live.len() + 64 {
            let live = &self.live;
            self.order.retain(|k| live.contains(k));
        }
    }

    pub(super) fn pop(&mut self) -> Option<WarmKey> {
        while let Some(k) = self.order.pop_front() {
            if self.live.remove(&k) {
                return Some(k);
            }
        }
        None
    }

    pub(super) fn forget_block(&mut self, id: &str, models: impl Iterator<Item = String>) {
        for m in models {
            self.live.remove(&(id.to_string(), m));
        }
    }

    pub(super) fn len(&self) -> usize {
        self.live.len()
    }
}

impl Kdn {
    /// Warm-ups queued or running at most: `max_concurrent_warmups` +
    /// `max_pending_warmups`.
    fn warm_cap(&self) -> usize {
        self.config.kdn.max_concurrent_warmups.max(1) + self.config.kdn.max_pending_warmups
    }

    /// Warm-ups that can be queued now.
    pub(super) fn warm_room(&self) -> usize {
        self.warm_cap().saturating_sub(lock(&self.warming).len())
    }

    pub(super) fn deferred_reason(&self) -> String {
        format!(
            "warm-up deferred: {} warm-ups are already queued or running ([kdn] \
             max_concurrent_warmups + max_pending_warmups); it starts when they finish (use \
             the block as text meanwhile)",
            self.warm_cap()
        )
    }

    /// Start warm-ups of (block, model) pairs (one at a time per pair); returns a receiver
    /// per pair started or already running, which turns true when its warm-up finished.
    /// Pairs past the queue's room wait in the deferred list (no receiver).
    pub fn spawn_warmups(self: &Arc<Self>, pairs: Vec<WarmKey>) -> Vec<watch::Receiver<bool>> {
        let mut out = Vec::new();
        let cap = self.warm_cap();
        let mut warming = lock(&self.warming);
        for key in pairs {
            if let Some(rx) = warming.get(&key) {
                out.push(rx.clone());
                continue;
            }
            if warming.len() >= cap {
                lock(&self.deferred).push(key);
                continue;
            }
            out.push(self.spawn_one(&mut warming, key));
        }
        out
    }

    fn spawn_one(
        self: &Arc<Self>,
        warming: &mut HashMap<WarmKey, watch::Receiver<bool>>,
        key: WarmKey,
    ) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        warming.insert(key.clone(), rx.clone());
        let me = self.clone();
        tokio::spawn(async move {
            me.warm(&key.0, &key.1).await;
            lock(&me.warming).remove(&key);
            tx.send_replace(true);
            me.start_deferred();
        });
        rx
    }

    /// Move deferred warm-ups into the queue while it has room (each is looked at once:
    /// O(1) per warm-up finished, amortised).
    fn start_deferred(self: &Arc<Self>) {
        let cap = self.warm_cap();
        let mut warming = lock(&self.warming);
        while warming.len() < cap {
            let Some(key) = lock(&self.deferred).pop() else {
                break;
            };
            let still = self.registry.get(&key.0).is_some_and(|r| {
                r.models.get(&key.1).is_some_and(|e| {
                    matches!(
                        e.status,
                        BlockStatus::Deferred | BlockStatus::Registered | BlockStatus::Warming
                    )
                })
            });
            if still && !warming.contains_key(&key) {
                self.spawn_one(&mut warming, key);
            }
        }
    }

    /// Warm-ups queued or running, and deferred (for `/v1/load` and tests).
    pub fn warmup_counts(&self) -> (usize, usize) {
        (lock(&self.warming).len(), lock(&self.deferred).len())
    }

    async fn set_status(&self, id: &str, model: &str, status: BlockStatus, error: Option<String>) {
        let r = self
            .registry
            .update(id, |r| {
                if let Some(e) = r.models.get_mut(model) {
                    e.status = status;
                    e.error = error;
                    e.updated_at = unix_now();
                }
            })
            .await;
        if let Err(e) = r {
            tracing::warn!("recording status {} of {id}/{model}: {e}", status.name());
        }
    }

    /// Warm one block up for one model: unless its keys are already in the KDN store,
    /// prefill its prefix on the model's producer (`max_tokens: 1`, prompt as token ids)
    /// and wait for the keys to appear.
    async fn warm(self: &Arc<Self>, id: &str, model: &str) {
        let _permit = self.warm_sem.acquire().await;
        let key = (id.to_string(), model.to_string());
        let prepared = self
            .prepared_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let Some(entry) = self
            .registry
            .get(id)
            .and_then(|r| r.models.get(model).cloned())
        else {
            return;
        };
        let Ok(rt) = self.model(model).cloned() else {
            return;
        };
        if entry.status == BlockStatus::KvReady {
            return;
        }
        self.set_status(id, model, BlockStatus::Warming, None).await;
        let started = Instant::now();
        let result = self.warm_inner(&rt, &entry, prepared).await;
        let (status, label) = match &result {
            Ok(()) => (BlockStatus::KvReady, "kv_ready"),
            Err(_) => (BlockStatus::Failed, "failed"),
        };
        match &result {
            Ok(()) => tracing::info!(
                block = id,
                model,
                chunks = entry.chunks,
                "warm-up done in {:.0} ms",
                started.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => tracing::warn!(block = id, model, "warm-up failed: {e}"),
        }
        self.metrics
            .warmups
            .with_label_values(&[model, label])
            .inc();
        self.set_status(id, model, status, result.err().map(|e| e.to_string()))
            .await;
    }

    /// How many leading chunks of `keys` the store holds (read before a warm-up, to
    /// skip it, and after, to verify the producer's saves).
    async fn present_chunks(&self, keys: &[String], store_url: &str) -> Result<usize, WarmupError> {
        self.store
            .longest_present_prefix(keys)
            .await
            .map_err(|source| WarmupError::Store {
                store: store_url.to_string(),
                source,
            })
    }

    async fn warm_inner(
        &self,
        rt: &Arc<ModelRuntime>,
        entry: &ModelEntry,
        prepared: Option<Vec<u32>>,
    ) -> Result<(), WarmupError> {
        let store_url = redact_url(&self.config.kdn.store);
        let keys = &entry.keys;
        let ws = entry.world_size.max(1) as usize;
        if self.present_chunks(keys, &store_url).await? == keys.len() {
            return Ok(());
        }
        let cfg = &rt.cfg;
        let Some(producer) = &cfg.producer else {
            return Err(WarmupError::NoProducer {
                model: cfg.name.clone(),
                store: store_url,
            });
        };
        let ids = match prepared {
            Some(ids) => ids,
            None => {
                let rt = rt.clone();
                let entry = entry.clone();
                tokio::task::spawn_blocking(move || rt.ids_of(&entry))
                    .await
                    .map_err(WarmupError::Tokenizing)??
            }
        };
        let url = format!("{}/v1/completions", producer.trim_end_matches('/'));
        // the producer may also serve traffic: warm-ups take at most warmup_max_share
        // of its time
        let pause = lock(&self.gates)
            .entry(producer.clone())
            .or_default()
            .wait(Instant::now());
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let prefill_started = Instant::now();
        let body = json!({
            "model": cfg.name,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0,
        });
        let resp = self
            .http
            .post(&url)
            .timeout(Duration::from_secs_f64(self.config.kdn.warmup_timeout_s))
            .json(&body)
            .send()
            .await
            .map_err(|source| WarmupError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let excerpt: String = text.chars().take(400).collect();
            return Err(WarmupError::Refused {
                url,
                status,
                excerpt,
            });
        }
        let _ = resp.bytes().await;
        lock(&self.gates).entry(producer.clone()).or_default().ran(
            prefill_started.elapsed(),
            Instant::now(),
            self.config.kdn.warmup_max_share,
        );
        // the producer's LMCache stores after the prefill; give it a moment
        let deadline = Instant::now() + Duration::from_secs_f64(self.config.kdn.warmup_verify_s);
        loop {
            let present = self.present_chunks(keys, &store_url).await?;
            if present == keys.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(WarmupError::Missing {
                    present: present / ws,
                    total: keys.len() / ws,
                    store: store_url,
                    first_missing: keys[present].clone(),
                    lmcache_model: cfg.lmcache_model.clone(),
                    scheme: cfg.scheme.clone(),
                    chunk_size: cfg.chunk_size,
                    hash_seed: cfg.hash_seed.clone(),
                    dtype: cfg.dtype.clone(),
                    world_size: cfg.world_size,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Warm a registered block up again (models given, or all of its models); failed
    /// entries are retried. Returns the record after the warm-ups when `wait`.
    pub async fn rewarm(
        self: &Arc<Self>,
        id: &str,
        wait: bool,
    ) -> Result<KnowledgeRecord, KdnError> {
        let rec = self.registry.get(id).ok_or_else(|| {
            KdnError::not_found("knowledge_not_found", format!("knowledge {id:?} not found"))
        })?;
        let mut pairs = Vec::new();
        for (model, e) in &rec.models {
            if e.status != BlockStatus::Warming && self.models.contains_key(model) {
                if e.status == BlockStatus::KvReady {
                    // re-check the store: a kv_ready block may have lost its KV
                    self.set_status(id, model, BlockStatus::Registered, None)
                        .await;
                }
                pairs.push((id.to_string(), model.clone()));
            }
        }
        let waiters = self.spawn_warmups(pairs);
        if wait {
            for mut w in waiters {
                let _ = w.wait_for(|d| *d).await;
            }
        }
        Ok(self.registry.get(id).unwrap_or(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(id: &str) -> WarmKey {
        (id.to_string(), "m".to_string())
    }

    /// The registry keeps the warm-up error as text: it must name what to fix.
    #[test]
    fn warmup_errors_say_what_to_configure() {
        let e = WarmupError::Missing {
            present: 1,
            total: 3,
            store: "redis://kdn:6379".into(),
            first_missing: "m@1@0@ab@bfloat16".into(),
            lmcache_model: "meta-llama/Llama-3.1-8B-Instruct".into(),
            scheme: "lmcache-0.3.15".into(),
            chunk_size: 256,
            hash_seed: "0".into(),
            dtype: "bfloat16".into(),
            world_size: 2,
        }
        .to_string();
        assert!(e.contains("only 1 of 3 chunks"), "{e}");
        assert!(e.contains("first missing key m@1@0@ab@bfloat16"), "{e}");
        assert!(
            e.contains("lmcache_model \"meta-llama/Llama-3.1-8B-Instruct\""),
            "{e}"
        );
        assert!(
            e.contains("hash seed \"0\", dtype bfloat16, world_size 2"),
            "{e}"
        );
        let e = WarmupError::NoProducer {
            model: "m16".into(),
            store: "memory://kdn".into(),
        }
        .to_string();
        assert!(
            e.starts_with("no producer is configured for model m16"),
            "{e}"
        );
        assert!(e.contains("set `producer` for the model"), "{e}");
    }

    #[test]
    fn deferred_warmups_are_kept_once_and_forgotten_with_their_block() {
        let mut d = Deferred::default();
        d.push(k("a"));
        d.push(k("b"));
        d.push(k("a"));
        assert_eq!(d.len(), 2);
        d.forget_block("a", ["m".to_string()].into_iter());
        assert_eq!(d.pop(), Some(k("b")));
        assert_eq!(d.pop(), None);
        // registered-and-deleted blocks do not grow the list without bound
        for i in 0..10_000 {
            let id = format!("x{i}");
            d.push(k(&id));
            d.forget_block(&id, ["m".to_string()].into_iter());
        }
        assert_eq!(d.len(), 0);
        assert!(d.order.len() <= 64 + 1, "{}", d.order.len());
    }
}
