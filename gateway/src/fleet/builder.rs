//! [`FleetBuilder`]: builds a [`Fleet`](super::Fleet) from a validated config: pools,
//! pickers, filter chains, tokenizers, cost models, resolved instance addresses.

use super::health::FixedDiscovery;
use super::{
    Fleet, InstanceMetrics, InstanceRegistry, Pool, PoolInstance, PoolProxy, ReloadableHealthCheck,
    SharedCheck,
};
use crate::config::{Config, InstanceUrl, UpstreamDefaults};
use crate::metrics::Metrics;
use crate::pickers::Pickers;
use crate::pipeline::{build_chain, RequestFilter};
use anyhow::{Context, Result};
use cacheroute_decisions::cost_model::{builtin_profile, CostModel, BUILTIN_PROFILES};
use cacheroute_lmcache::tokenizer::{Tokenizer, TokenizerChoice, LLAMA3_VOCAB_SIZE};
use pingora::lb::{Backend, Backends, HealthRegistry};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What building a fleet needs besides the config: shared live state and
/// the model lists discovered from instances.
pub struct FleetBuilder {
    pub instances: InstanceRegistry,
    pub health: Arc<HealthRegistry>,
    pub check: Arc<ReloadableHealthCheck>,
    /// Instance pickers, kept across reloads with their state.
    pub pickers: Pickers,
    /// Request filters added through the library's builder (see `pipeline::build_chain`).
    pub custom_filters: Vec<Arc<dyn RequestFilter>>,
}

impl FleetBuilder {
    pub fn new(defaults: &UpstreamDefaults) -> Self {
        let check = Arc::new(ReloadableHealthCheck::new(defaults));
        let health = Arc::new(HealthRegistry::new());
        health.set_health_check(Box::new(SharedCheck(check.clone())));
        FleetBuilder {
            instances: InstanceRegistry::default(),
            health,
            check,
            pickers: Pickers::default(),
            custom_filters: Vec::new(),
        }
    }

    /// Build a fleet from a validated config. Host names are resolved here,
    /// off the request path; pools without a model list get the models their
    /// instances report (`discovered`, keyed by instance base URL).
    pub async fn build(
        &self,
        config: Config,
        version: u64,
        discovered: &BTreeMap<String, Vec<String>>,
        metrics: &Metrics,
    ) -> Result<Fleet> {
        self.check.update(&config.upstream);
        let chain = Arc::new(build_chain(&config, &self.custom_filters)?);
        let health_interval = Duration::from_millis(config.upstream.health_check_interval_ms);
        let mut pools = Vec::with_capacity(config.pools.len());
        let mut profiles: HashMap<String, Arc<CostModel>> = HashMap::new();
        for pc in &config.pools {
            let profile = pc
                .profile
                .clone()
                .unwrap_or_else(|| config.proxy.profile.clone());
            let cost = match profiles.get(&profile) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(load_profile(&profile)?);
                    profiles.insert(profile.clone(), c.clone());
                    c
                }
            };
            let proxy = PoolProxy {
                injection: pc.injection.unwrap_or(config.proxy.injection),
                release: pc.release.unwrap_or(config.proxy.release),
                kv_deadline: Duration::from_millis(
                    pc.kv_deadline_ms
                        .unwrap_or(config.proxy.kv_deadline_ms)
                        .max(1),
                ),
                cost,
            };
            let mut instances = Vec::with_capacity(pc.instances.len());
            for ic in &pc.instances {
                let url = InstanceUrl::parse(&ic.url)?;
                let addr = resolve(&url).await?;
                let backend = Backend::new_with_weight(&addr.to_string(), ic.weight as usize)
                    .map_err(|e| anyhow::anyhow!("instance {}: {e}", url.base))?;
                let state = self.instances.get(&url.base);
                let inflight_gauge = metrics.inflight.with_label_values(&[&pc.name, &url.base]);
                inflight_gauge.set(state.inflight() as i64);
                let settings = pc.settings(&config.upstream);
                instances.push(PoolInstance {
                    host_header: format!("{}:{}", url.host, url.port),
                    connect_timeout: Duration::from_millis(
                        ic.connect_timeout_ms.unwrap_or(settings.connect_timeout_ms),
                    ),
                    read_timeout: Duration::from_millis(
                        ic.read_timeout_ms.unwrap_or(settings.read_timeout_ms),
                    ),
                    first_byte_timeout: Duration::from_millis(settings.first_byte_ms(
                        ic.first_byte_timeout_ms,
                        ic.read_timeout_ms.unwrap_or(settings.read_timeout_ms),
                    )),
                    state,
                    inflight_gauge,
                    metrics: Arc::new(InstanceMetrics::new(metrics, &url.base)),
                    url,
                    addr,
                    weight: ic.weight as u32,
                    backend,
                    max_inflight: ic.max_inflight.unwrap_or(settings.max_inflight),
                    kv_target: ic.kv_target.clone(),
                });
            }
            let set: BTreeSet<Backend> = instances.iter().map(|i| i.backend.clone()).collect();
            let backends = Backends::new_with_health_registry(
                Box::new(FixedDiscovery(set)),
                self.health.clone(),
            );
            backends
                .update(|_| {})
                .await
                .map_err(|e| anyhow::anyhow!("pool `{}`: {e}", pc.name))?;
            let (models, was_discovered) = if pc.models.is_empty() {
                let mut models = BTreeSet::new();
                for inst in &instances {
                    if let Some(list) = discovered.get(&inst.url.base) {
                        models.extend(list.iter().cloned());
                    }
                }
                (models.into_iter().collect(), true)
            } else {
                (pc.models.clone(), false)
            };
            let scheduled = ["none", "explicit", "retrieved"].map(|source| {
                ["no", "yes"].map(|kdn| {
                    metrics
                        .scheduling
                        .with_label_values(&[&pc.name, source, kdn])
                })
            });
            pools.push(Pool {
                name: pc.name.clone(),
                proxy,
                scheduled,
                rag_always: pc.rag_always,
                kv_target: pc.kv_target.clone(),
                models,
                discovered: was_discovered,
                picker: self
                    .pickers
                    .build(&pc.name, pc.settings(&config.upstream).policy),
                settings: pc.settings(&config.upstream),
                instances,
                backends,
                health_interval,
            });
        }
        let mut by_model: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, p) in pools.iter().enumerate() {
            for m in &p.models {
                by_model.entry(m.clone()).or_default().push(i);
            }
        }
        let mut models: Vec<String> = by_model.keys().cloned().collect();
        models.sort();
        // Parsing a tokenizer.json (the embedded Llama-3 one: once per process) blocks.
        let choice = config.proxy.tokenizer.clone();
        let names = models.clone();
        let (tokenizers, fallback_tokenizer) = tokio::task::spawn_blocking(move || {
            let fallback = match &choice {
                TokenizerChoice::File(_) => choice.resolve(&[], LLAMA3_VOCAB_SIZE)?,
                _ => Arc::new(Tokenizer::approx(LLAMA3_VOCAB_SIZE)),
            };
            let mut by_name = HashMap::with_capacity(names.len());
            for m in names {
                let t = match &choice {
                    TokenizerChoice::File(_) => fallback.clone(),
                    _ => choice.resolve(&[&m], LLAMA3_VOCAB_SIZE)?,
                };
                by_name.insert(m, t);
            }
            anyhow::Ok((by_name, fallback))
        })
        .await
        .context("loading tokenizers")?
        .with_context(|| format!("proxy.tokenizer {}", config.proxy.tokenizer))?;
        Ok(Fleet {
            chain,
            version,
            tokenizers,
            fallback_tokenizer,
            config,
            pools,
            by_model,
            models,
        })
    }
}

/// The default profile: Llama-3-8B on one H100 (conf/profiles/).
const DEFAULT_PROFILE: &str = "h100-llama3-8b";

/// A pool's cost model from a shipped profile's short name (`h100-llama3-8b`,
/// `h100x8-llama3-70b-tp8`, `rtx5090x8-llama3-70b`...; "" = `h100-llama3-8b`) or a file.
fn load_profile(path: &str) -> Result<CostModel> {
    let name = if path.is_empty() {
        DEFAULT_PROFILE
    } else {
        path
    };
    let text = match builtin_profile(name) {
        Some(json) => json.to_string(),
        None => std::fs::read_to_string(path).with_context(|| {
            format!(
                "profile {path} (not a file, nor a shipped profile: {})",
                BUILTIN_PROFILES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
    };
    CostModel::from_profile_json(&text).map_err(|e| {
        anyhow::anyhow!(
            "profile {}: {e}",
            if path.is_empty() { "(built-in)" } else { path }
        )
    })
}

async fn resolve(url: &InstanceUrl) -> Result<SocketAddr> {
    let target = format!(
        "{}:{}",
        url.host.trim_start_matches('[').trim_end_matches(']'),
        url.port
    );
    let mut addrs = tokio::net::lookup_host(target.as_str())
        .await
        .with_context(|| format!("cannot resolve instance {}", url.base))?;
    addrs
        .next()
        .with_context(|| format!("instance {} resolves to no address", url.base))
}
