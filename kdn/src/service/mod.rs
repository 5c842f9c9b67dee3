//! The KDN's logic, independent of HTTP: registration (layout, keys, registry), warm-up
//! through a producer, deletion, inject requests and load.
//!
//! This module holds the [`Kdn`] itself (its state, start-up, load and metrics); each
//! concern lives in its own file: `error` (the HTTP-shaped error), `model` (a
//! model's layout and keys), `register` (validation and registration), `warmup`
//! (warm-ups through a producer and the deferred queue), `delete` (removing a block
//! and its KV) and `injection` (inject requests).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

use cacheroute_wire::kdn::{KdnLoad, KdnTargetLoad};

use crate::config::{KdnConfig, ModelConfig};
use crate::inject::{Injector, InjectorConfig, Target};
use crate::limits::{ShareGate, TokenBucket};
use crate::metrics::KdnMetrics;
use crate::registry::{redact_url, BlockStatus, Registry};
use crate::store::{open_store, KvStore};
use crate::tokenizer::TokenizerChoice;

mod delete;
mod error;
mod injection;
mod model;
mod register;
mod warmup;

pub use error::KdnError;
pub use injection::InjectRequest;
pub use model::ModelRuntime;
pub use register::{default_id, RegisterRequest};
pub use warmup::{Deferred, WarmupError};

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
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
