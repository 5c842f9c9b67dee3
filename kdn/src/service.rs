//! The KDN's logic, independent of HTTP: registration (layout, keys, registry), warm-up
//! through a producer, deletion, inject requests and load.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Semaphore};

use cacheroute_wire::error::ErrorBody;
use cacheroute_wire::kdn::{KdnLoad, KdnTargetLoad};

use cacheroute_decisions::prompt::{knowledge_prefix, normalize_knowledge_text};

use crate::config::{is_store_url, KdnConfig, ModelConfig};
use crate::inject::{BlockSpec, Injector, InjectorConfig, Job, SubmitError, Target};
use crate::keys::{chunk_keys_all_ranks, KeyParams};
use crate::layout::layout_knowledge;
use crate::limits::{Refused, ShareGate, TokenBucket};
use crate::metrics::KdnMetrics;
use crate::registry::{
    redact_url, BlockStatus, KnowledgeRecord, ModelEntry, RegisterError, Registered, Registry,
};
use crate::store::{open_store, KvStore};
use crate::tokenizer::{Tokenizer, TokenizerChoice};

/// An error answered as `{"error":{"message","type","code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct KdnError {
    pub status: StatusCode,
    /// `invalid_request_error`, `not_found_error`, `conflict_error`, `server_error`, …
    pub kind: &'static str,
    /// A stable machine-readable code, e.g. `text_empty`, `unknown_model`.
    pub code: &'static str,
    pub message: String,
    /// Seconds to answer in `Retry-After` (429, 503).
    pub retry_after_s: Option<u64>,
}

impl KdnError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        KdnError {
            status,
            kind,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", code, message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "unauthorized",
            message,
        )
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict_error", code, message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            code,
            message,
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.message.clone(), self.kind, Some(self.code))
    }
}

impl std::fmt::Display for KdnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for KdnError {}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

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

/// An inject request (`POST /v1/inject`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRequest {
    pub knowledge_ids: Vec<String>,
    /// Served model name.
    pub model: String,
    /// A configured target name, or a store URL (`redis://…`, `memory://NAME`).
    pub target: String,
    /// Answer when the job finished (or after `timeout_ms`).
    #[serde(default)]
    pub wait: bool,
    /// Limit of `wait`, in ms (default 600000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// One model, ready to lay out and key prefixes.
pub struct ModelRuntime {
    pub cfg: ModelConfig,
    pub key_params: KeyParams,
    pub tokenizer: Arc<Tokenizer>,
}

impl ModelRuntime {
    pub fn new(cfg: &ModelConfig) -> anyhow::Result<ModelRuntime> {
        let key_params = cfg.key_params()?;
        let tokenizer = cfg
            .tokenizer
            .resolve(&[&cfg.name, &cfg.lmcache_model], cfg.vocab_size)
            .with_context(|| format!("model {}", cfg.name))?;
        Ok(ModelRuntime {
            cfg: cfg.clone(),
            key_params,
            tokenizer,
        })
    }

    /// Lay out and key `text` (normalised) for this model: the entry and the prefix ids.
    fn prepare(&self, text: &str) -> Result<(ModelEntry, Vec<u32>), KdnError> {
        let cfg = &self.cfg;
        let layout = layout_knowledge(cfg.template, &self.tokenizer, text, cfg.chunk_size)
            .map_err(|e| {
                KdnError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request_error",
                    "layout_failed",
                    format!("model {}: {e}", cfg.name),
                )
            })?;
        let keys = self.keys(&layout.token_ids)?;
        let tokens = layout.token_ids.len();
        Ok((
            ModelEntry {
                status: BlockStatus::Registered,
                error: None,
                template: cfg.template,
                tokens,
                chunks: tokens / cfg.chunk_size,
                chunk_size: cfg.chunk_size,
                padding: layout.padding,
                bytes: tokens as u64 * cfg.kv_bytes_per_token,
                world_size: cfg.world_size,
                content: layout.content,
                keys,
                resident: Vec::new(),
                updated_at: unix_now(),
            },
            layout.token_ids,
        ))
    }

    /// Chunk-major keys of every rank.
    fn keys(&self, ids: &[u32]) -> Result<Vec<String>, KdnError> {
        let per_rank = chunk_keys_all_ranks(&self.key_params, ids)
            .map_err(|e| KdnError::internal(format!("model {}: {e}", self.cfg.name)))?;
        let chunks = per_rank.first().map_or(0, |r| r.len());
        let mut keys = Vec::with_capacity(chunks * per_rank.len());
        for c in 0..chunks {
            for rank in &per_rank {
                keys.push(rank[c].key.clone());
            }
        }
        Ok(keys)
    }

    /// The prefix ids of a registered entry (re-tokenised), checked against its keys.
    fn ids_of(&self, entry: &ModelEntry) -> Result<Vec<u32>, String> {
        let prefix = knowledge_prefix(entry.template, &entry.content);
        let ids = self
            .tokenizer
            .encode_with(&prefix, entry.template.add_special_tokens());
        let keys = self.keys(&ids).map_err(|e| e.message)?;
        if ids.len() != entry.tokens || keys != entry.keys {
            return Err(format!(
                "model {}: the tokenizer or key settings changed since the block was \
                 registered (now {} tokens, registered {}); delete and register it again",
                self.cfg.name,
                ids.len(),
                entry.tokens
            ));
        }
        Ok(ids)
    }
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

type WarmKey = (String, String);

/// The KDN.
pub struct Kdn {
    pub config: KdnConfig,
    /// `[kdn] id`, or `kdn@<listen>`.
    pub id: String,
    models: BTreeMap<String, Arc<ModelRuntime>>,
    pub registry: Arc<Registry>,
    pub store: Arc<dyn KvStore>,
    pub injector: Arc<Injector>,
    pub metrics: Arc<KdnMetrics>,
    targets: Vec<Target>,
    http: reqwest::Client,
    warm_sem: Arc<Semaphore>,
    /// Warm-ups in progress: (block, model) → becomes true when finished.
    warming: Mutex<HashMap<WarmKey, watch::Receiver<bool>>>,
    /// Prefix ids computed at registration, used once by the warm-up.
    prepared_ids: Mutex<HashMap<WarmKey, Vec<u32>>>,
    /// Warm-ups that found the queue full, oldest first: started as others finish.
    /// Bounded by the registry (`max_blocks` × models).
    deferred: Mutex<Deferred>,
    /// Producer URL → when warm-ups may next use it (`warmup_max_share`).
    gates: Mutex<HashMap<String, ShareGate>>,
    /// Registrations admitted (`max_registrations_per_s`, `registration_burst`).
    registrations: Mutex<TokenBucket>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    fn push(&mut self, key: WarmKey) {
        if self.live.insert(key.clone()) {
            self.order.push_back(key);
        }
        if self.order.len() > 2 * self.live.len() + 64 {
            let live = &self.live;
            self.order.retain(|k| live.contains(k));
        }
    }

    fn pop(&mut self) -> Option<WarmKey> {
        while let Some(k) = self.order.pop_front() {
            if self.live.remove(&k) {
                return Some(k);
            }
        }
        None
    }

    fn forget_block(&mut self, id: &str, models: impl Iterator<Item = String>) {
        for m in models {
            self.live.remove(&(id.to_string(), m));
        }
    }

    fn len(&self) -> usize {
        self.live.len()
    }
}

impl Kdn {
    /// Open the registry and the store, load tokenizers, resume unfinished warm-ups and
    /// register the preload files.
    pub async fn start(config: KdnConfig) -> anyhow::Result<Arc<Kdn>> {
        config.validate()?;
        let mut models = BTreeMap::new();
        for m in &config.models {
            models.insert(m.name.clone(), Arc::new(ModelRuntime::new(m)?));
        }
        let registry = Arc::new(
            Registry::open(&config.kdn.registry, &config.kdn.registry_prefix)
                .await
                .context("opening the knowledge registry")?,
        );
        registry.set_max_blocks(config.kdn.max_blocks);
        let store = open_store(&config.kdn.store)
            .await
            .with_context(|| format!("opening the KDN store {}", redact_url(&config.kdn.store)))?;
        let metrics = Arc::new(KdnMetrics::new());
        let injector = Injector::new(
            InjectorConfig {
                max_concurrent: config.kdn.max_concurrent_injections,
                max_queue: config.kdn.max_queue,
                batch_chunks: config.kdn.batch_chunks,
                job_history: config.kdn.job_history,
            },
            store.clone(),
            &config.kdn.store,
            registry.clone(),
            metrics.clone(),
        );
        let targets = config
            .targets
            .iter()
            .map(|t| Target {
                name: t.name.clone(),
                url: t.store.clone(),
                link_gbps: t.link_gbps,
            })
            .collect();
        let bucket = TokenBucket::new(
            config.kdn.max_registrations_per_s,
            config.kdn.registration_burst,
        );
        let kdn = Arc::new(Kdn {
            id: config.kdn.id_or_default(),
            warm_sem: Arc::new(Semaphore::new(config.kdn.max_concurrent_warmups.max(1))),
            config,
            models,
            registry,
            store,
            injector,
            metrics,
            targets,
            http: reqwest::Client::new(),
            warming: Mutex::default(),
            prepared_ids: Mutex::default(),
            deferred: Mutex::default(),
            gates: Mutex::default(),
            registrations: Mutex::new(bucket),
        });
        // warm-ups a previous process left unfinished
        let mut resume = Vec::new();
        kdn.registry.for_each(|r| {
            for (model, e) in &r.models {
                if matches!(
                    e.status,
                    BlockStatus::Registered | BlockStatus::Warming | BlockStatus::Deferred
                ) && kdn.models.contains_key(model)
                {
                    resume.push((r.id.clone(), model.clone()));
                }
            }
        });
        if !resume.is_empty() {
            tracing::info!("resuming {} unfinished warm-ups", resume.len());
            kdn.spawn_warmups(resume);
        }
        for path in kdn.config.kdn.preload.clone() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading preload file {}", path.display()))?;
            match kdn.register_jsonl(&text, false).await {
                Ok(v) => tracing::info!(
                    "preloaded {} knowledge blocks from {}",
                    v.len(),
                    path.display()
                ),
                Err(e) => anyhow::bail!("preloading {}: {}", path.display(), e.message),
            }
        }
        Ok(kdn)
    }

    /// The configured models.
    pub fn models(&self) -> impl Iterator<Item = &ModelConfig> {
        self.models.values().map(|m| &m.cfg)
    }

    /// The configured targets.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    fn model(&self, name: &str) -> Result<&Arc<ModelRuntime>, KdnError> {
        self.models.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            KdnError::bad_request(
                "unknown_model",
                format!(
                    "unknown model {name:?}; this KDN serves: {}",
                    if known.is_empty() {
                        "no models (add [[models]] to its configuration)".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })
    }

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

    /// Warm-ups queued or running at most: `max_concurrent_warmups` +
    /// `max_pending_warmups`.
    fn warm_cap(&self) -> usize {
        self.config.kdn.max_concurrent_warmups.max(1) + self.config.kdn.max_pending_warmups
    }

    /// Warm-ups that can be queued now.
    fn warm_room(&self) -> usize {
        self.warm_cap().saturating_sub(lock(&self.warming).len())
    }

    fn deferred_reason(&self) -> String {
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
        self.set_status(id, model, status, result.err()).await;
    }

    async fn warm_inner(
        &self,
        rt: &Arc<ModelRuntime>,
        entry: &ModelEntry,
        prepared: Option<Vec<u32>>,
    ) -> Result<(), String> {
        let store_url = redact_url(&self.config.kdn.store);
        let keys = &entry.keys;
        let ws = entry.world_size.max(1) as usize;
        let present = self
            .store
            .longest_present_prefix(keys)
            .await
            .map_err(|e| format!("checking the KDN store {store_url}: {e}"))?;
        if present == keys.len() {
            return Ok(());
        }
        let cfg = &rt.cfg;
        let Some(producer) = &cfg.producer else {
            return Err(format!(
                "no producer is configured for model {} and the block's KV is not in the KDN \
                 store {store_url}; set `producer` for the model (it can still be used as text)",
                cfg.name
            ));
        };
        let ids = match prepared {
            Some(ids) => ids,
            None => {
                let rt = rt.clone();
                let entry = entry.clone();
                tokio::task::spawn_blocking(move || rt.ids_of(&entry))
                    .await
                    .map_err(|e| format!("tokenizing: {e}"))??
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
            .map_err(|e| format!("producer {url} unreachable: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let excerpt: String = text.chars().take(400).collect();
            return Err(format!("producer {url} answered HTTP {status}: {excerpt}"));
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
            let present = self
                .store
                .longest_present_prefix(keys)
                .await
                .map_err(|e| format!("checking the KDN store {store_url}: {e}"))?;
            if present == keys.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "after the producer's prefill only {} of {} chunks are in the KDN store \
                     {store_url} (first missing key {}); check that the producer's LMCache \
                     writes to this store with the same settings: lmcache_model {:?}, scheme \
                     {}, chunk_size {}, hash seed {:?}, dtype {}, world_size {}",
                    present / ws,
                    keys.len() / ws,
                    keys[present],
                    cfg.lmcache_model,
                    cfg.scheme,
                    cfg.chunk_size,
                    cfg.hash_seed,
                    cfg.dtype,
                    cfg.world_size
                ));
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

    /// Delete a block from the registry and (unless `keep_kv`) its chunks from the KDN
    /// store and from the `memory://` targets it was injected into, except chunks that
    /// another registered block also uses. O(the block's keys): the registry counts
    /// references per key, so nothing else is scanned. Chunks copied into Redis targets
    /// are left to those instances' LMCache (it may hold the same keys from its own
    /// prefills, and evicts them itself).
    pub async fn delete(&self, id: &str, keep_kv: bool) -> Result<Value, KdnError> {
        let rec = self
            .registry
            .remove(id)
            .await
            .map_err(|e| KdnError::unavailable("registry_unavailable", e.to_string()))?
            .ok_or_else(|| {
                KdnError::not_found("knowledge_not_found", format!("knowledge {id:?} not found"))
            })?;
        lock(&self.deferred).forget_block(id, rec.models.keys().cloned());
        let mut deleted = 0usize;
        let mut target_deleted = 0usize;
        let mut kv_error = None;
        if !keep_kv {
            let mut seen = HashSet::new();
            let keys: Vec<String> = rec
                .models
                .values()
                .flat_map(|m| m.keys.iter())
                .filter(|k| !self.registry.key_in_use(k) && seen.insert(k.as_str()))
                .cloned()
                .collect();
            match self.store.delete_chunks(&keys).await {
                Ok(n) => deleted = n,
                Err(e) => {
                    kv_error = Some(format!(
                        "deleting chunks from the KDN store {}: {e}",
                        redact_url(&self.config.kdn.store)
                    ))
                }
            }
            let resident: HashSet<&String> = rec
                .models
                .values()
                .flat_map(|m| m.resident.iter())
                .collect();
            for name in resident {
                let url = self
                    .targets
                    .iter()
                    .find(|t| &t.name == name)
                    .map_or(name.as_str(), |t| t.url.as_str());
                if !url.starts_with("memory://") {
                    continue;
                }
                let r = match self.injector.open_target(url).await {
                    Ok(t) => t.delete_chunks(&keys).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(n) => target_deleted += n,
                    Err(e) => {
                        kv_error.get_or_insert(format!("deleting chunks from target {name}: {e}"));
                    }
                }
            }
        }
        Ok(json!({
            "id": id,
            "object": "knowledge.deleted",
            "deleted": true,
            "kv_chunks_deleted": deleted,
            "target_chunks_deleted": target_deleted,
            "kv_error": kv_error,
        }))
    }

    /// Resolve an inject target: a configured name, or a store URL.
    pub fn resolve_target(&self, target: &str) -> Result<Target, KdnError> {
        if let Some(t) = self.targets.iter().find(|t| t.name == target) {
            return Ok(t.clone());
        }
        if let Some(t) = self.targets.iter().find(|t| t.url == target) {
            return Ok(t.clone());
        }
        if is_store_url(target) {
            if !self.config.kdn.allow_url_targets {
                return Err(KdnError::forbidden(
                    "target_not_allowed",
                    format!(
                        "target {target:?} is a store URL; this KDN injects only into its \
                         configured [[targets]] (set [kdn] allow_url_targets to allow URLs)"
                    ),
                ));
            }
            return Ok(Target {
                name: target.to_string(),
                url: target.to_string(),
                link_gbps: None,
            });
        }
        let known: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
        Err(KdnError::bad_request(
            "unknown_target",
            format!(
                "unknown target {target:?}: give a configured target ({}) or a store URL \
                 (redis://host:port[/db], memory://NAME)",
                if known.is_empty() {
                    "none configured".to_string()
                } else {
                    known.join(", ")
                }
            ),
        ))
    }

    /// Validate and queue an inject request.
    pub fn inject(&self, req: &InjectRequest) -> Result<Arc<Job>, KdnError> {
        if req.knowledge_ids.is_empty() {
            return Err(KdnError::bad_request(
                "no_knowledge",
                "knowledge_ids is empty",
            ));
        }
        let rt = self.model(&req.model)?;
        let target = self.resolve_target(&req.target)?;
        let mut blocks = Vec::with_capacity(req.knowledge_ids.len());
        for id in &req.knowledge_ids {
            let rec = self.registry.get(id).ok_or_else(|| {
                KdnError::not_found("knowledge_not_found", format!("knowledge {id:?} not found"))
            })?;
            let entry = rec.models.get(&req.model).ok_or_else(|| {
                KdnError::conflict(
                    "not_registered_for_model",
                    format!(
                        "knowledge {id:?} is not registered for model {:?}; register it again \
                         with that model",
                        req.model
                    ),
                )
            })?;
            if entry.status != BlockStatus::KvReady {
                return Err(KdnError::conflict(
                    "not_kv_ready",
                    format!(
                        "knowledge {id:?} is not kv_ready for model {:?} (status: {}{}); use \
                         text injection",
                        req.model,
                        entry.status.name(),
                        entry
                            .error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                ));
            }
            blocks.push(BlockSpec {
                block_id: id.clone(),
                keys: entry.keys.clone(),
                world_size: entry.world_size,
                logical_bytes_per_key: rt.cfg.logical_bytes_per_key(),
            });
        }
        self.injector
            .submit(&req.model, target, blocks)
            .map_err(|e| match e {
                SubmitError::QueueFull { .. } => KdnError::unavailable("queue_full", e.to_string()),
                SubmitError::Empty => KdnError::bad_request("no_knowledge", e.to_string()),
            })
    }

    /// `/v1/load`.
    pub fn load(&self) -> Value {
        let mut v = serde_json::to_value(self.load_report()).expect("serialisable");
        v["object"] = json!("kdn.load");
        v
    }

    /// `/v1/load` as the wire type gateways read.
    pub fn load_report(&self) -> KdnLoad {
        let s = self.injector.load(&self.targets);
        let (warming, deferred) = self.warmup_counts();
        KdnLoad {
            kdn_id: self.id.clone(),
            pending_jobs: s.pending_jobs as u64,
            active_jobs: s.active_jobs as u64,
            pending_transfers: s.pending_transfers as u64,
            active_transfers: s.active_transfers as u64,
            queue_wait_ms: s.queue_wait_ms,
            oldest_pending_ms: s.oldest_pending_ms,
            recent_bytes_per_s: s.recent_bytes_per_s,
            bandwidth_bytes_per_s: s.bandwidth_bytes_per_s,
            backlog_bytes: s.backlog_bytes,
            max_concurrent_injections: s.max_concurrent_injections as u64,
            max_queue: s.max_queue as u64,
            knowledge_blocks: self.registry.len() as u64,
            warmups_queued: warming as u64,
            warmups_deferred: deferred as u64,
            targets: s
                .targets
                .into_iter()
                .map(|(name, t)| {
                    let t = KdnTargetLoad {
                        store: t.store,
                        pending_transfers: t.pending_transfers as u64,
                        active_transfers: t.active_transfers as u64,
                        recent_bytes_per_s: t.recent_bytes_per_s,
                        link_gbps: t.link_gbps,
                        link_backlog_ms: t.link_backlog_ms,
                    };
                    (name, t)
                })
                .collect(),
        }
    }

    /// `/metrics`.
    pub fn render_metrics(&self) -> String {
        let mut counts: HashMap<(String, BlockStatus), i64> = HashMap::new();
        self.registry.for_each(|r| {
            for (m, e) in &r.models {
                *counts.entry((m.clone(), e.status)).or_default() += 1;
            }
        });
        self.metrics.blocks.reset();
        for m in self.models.keys() {
            for s in BlockStatus::ALL {
                let n = counts.get(&(m.clone(), s)).copied().unwrap_or(0);
                self.metrics.blocks.with_label_values(&[m, s.name()]).set(n);
            }
        }
        // refresh the load gauges
        let _ = self.injector.load(&self.targets);
        self.metrics.render()
    }

    /// `GET /v1/models`: the configured models.
    pub fn models_json(&self) -> Value {
        let data: Vec<Value> = self
            .models
            .values()
            .map(|m| {
                let c = &m.cfg;
                json!({
                    "id": c.name,
                    "object": "kdn.model",
                    "lmcache_model": c.lmcache_model,
                    "template": c.template,
                    "tokenizer": match (&c.tokenizer, m.tokenizer.is_exact()) {
                        (TokenizerChoice::File(_), _) => "tokenizer.json",
                        (_, true) => "llama3",
                        (_, false) => "approximation",
                    },
                    "scheme": c.scheme,
                    "chunk_size": c.chunk_size,
                    "dtype": c.dtype,
                    "world_size": c.world_size,
                    "hash_seed_digest": crate::keys::hash_seed_digest(&c.hash_seed),
                    "save_unfull_chunk": false,
                    "kv_bytes_per_token": c.kv_bytes_per_token,
                    "producer": c.producer,
                })
            })
            .collect();
        json!({"object": "list", "data": data})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(id: &str) -> WarmKey {
        (id.to_string(), "m".to_string())
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
