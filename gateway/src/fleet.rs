//! The fleet the gateway routes over: pools of instances, their live state
//! (requests in flight, recent connect failures) and their health.
//!
//! A `Fleet` is immutable and built from one validated `Config`; hot reload
//! builds a new one and swaps it in. Live per-instance state is keyed by the
//! instance URL and outlives reloads, so in-flight counts stay right while
//! requests started on the old fleet finish.

use crate::admission::Admission;
use crate::config::{Config, InstanceUrl, PoolSettings, UpstreamDefaults};
use crate::idle_pool::IdlePool;
use crate::metrics::Metrics;
use crate::pickers::{Picker, Pickers};
use crate::pipeline::{build_chain, Chain, RequestFilter};
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use cacheroute_decisions::cost_model::{builtin_profile, CostModel, BUILTIN_PROFILES};
use cacheroute_decisions::injection::{InjectionStrategy, ReleasePolicy};
use cacheroute_decisions::openai::Route;
use cacheroute_lmcache::tokenizer::{
    looks_like_llama3, Tokenizer, TokenizerChoice, LLAMA3_VOCAB_SIZE,
};
use pingora::http::RequestHeader;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::lb::{Backend, Backends, HealthRegistry};
use pingora::prelude::HttpPeer;
use prometheus::IntGauge;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Idle connections kept per instance, and for how long.
const IDLE_CAPACITY: usize = 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Live state of one instance, shared by every fleet that lists its URL.
#[derive(Debug)]
pub struct InstanceState {
    inflight: AtomicU64,
    /// Idle keep-alive connections to this instance.
    pub idle: IdlePool,
    /// Milliseconds since `epoch` of the last failed connect; 0 = never.
    last_connect_failure_ms: AtomicU64,
    epoch: Instant,
    /// Slots and the waiting queue.
    pub admission: Arc<Admission>,
    /// KV-mode requests waiting for their KV outside the queue (`text_bypass`)
    /// keep their order through this.
    pub kv_gate: tokio::sync::Mutex<()>,
    /// KV-mode requests waiting for their KV outside the queue right now.
    pub kv_waiting: AtomicU64,
    /// Requests sent to the instance whose first byte has not come back: the
    /// engine's prefill backlog as the gateway sees it (see [`PrefillGuard`]).
    prefilling: AtomicU64,
    /// Σ prompt tokens those requests make the engine compute.
    prefill_tokens: AtomicU64,
}

impl InstanceState {
    fn new() -> Self {
        InstanceState {
            inflight: AtomicU64::new(0),
            idle: IdlePool::new(IDLE_CAPACITY, IDLE_TIMEOUT),
            last_connect_failure_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            admission: Arc::new(Admission::default()),
            kv_gate: tokio::sync::Mutex::new(()),
            kv_waiting: AtomicU64::new(0),
            prefilling: AtomicU64::new(0),
            prefill_tokens: AtomicU64::new(0),
        }
    }

    /// Requests sent and not yet answered with a first byte, and the prompt tokens
    /// they make the engine compute.
    pub fn prefilling(&self) -> (u64, u64) {
        (
            self.prefilling.load(Ordering::Relaxed),
            self.prefill_tokens.load(Ordering::Relaxed),
        )
    }

    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot on this instance.
    pub fn queued(&self) -> u64 {
        self.admission.queued()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Passive health: a refused connection takes the instance out of
    /// rotation until the next active health check could have seen it again.
    pub fn mark_connect_failure(&self) {
        self.last_connect_failure_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn clear_connect_failure(&self) {
        self.last_connect_failure_ms.store(0, Ordering::Relaxed);
    }

    fn failed_recently(&self, window: Duration) -> bool {
        let t = self.last_connect_failure_ms.load(Ordering::Relaxed);
        t != 0 && self.now_ms().saturating_sub(t) < window.as_millis() as u64
    }
}

/// The per-request metric series of one instance, resolved at build time so
/// that the hot path does no label lookups: `[chat, completions]`.
pub struct InstanceMetrics {
    pub url: String,
    pub ok: [prometheus::IntCounter; 2],
    pub ttft: [prometheus::Histogram; 2],
}

impl InstanceMetrics {
    fn new(metrics: &Metrics, url: &str) -> Self {
        let routes = [Route::Chat.label(), Route::Completions.label()];
        InstanceMetrics {
            url: url.to_string(),
            ok: routes.map(|r| metrics.requests.with_label_values(&[r, "200", url])),
            ttft: routes.map(|r| metrics.ttft.with_label_values(&[r, url])),
        }
    }

    pub fn route_index(route: &str) -> Option<usize> {
        match route {
            "chat" => Some(0),
            "completions" => Some(1),
            _ => None,
        }
    }
}

/// Counts a request in flight on an instance for as long as it lives.
pub struct InflightGuard<'a> {
    inst: &'a PoolInstance,
}

impl<'a> InflightGuard<'a> {
    pub fn new(inst: &'a PoolInstance) -> Self {
        let now = inst.state.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        inst.inflight_gauge.set(now as i64);
        InflightGuard { inst }
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let now = self.inst.state.inflight.fetch_sub(1, Ordering::Relaxed) - 1;
        self.inst.inflight_gauge.set(now as i64);
    }
}

/// Counts a request in the instance's prefill backlog from the moment it is sent
/// until its first byte comes back (or it ends). The engine's own queue is
/// invisible to the gateway when admission is unbounded; this is what the
/// injection decision reads as the requests ahead of and beside a new one.
pub struct PrefillGuard<'a> {
    state: &'a InstanceState,
    tokens: u64,
}

impl<'a> PrefillGuard<'a> {
    pub fn new(state: &'a InstanceState, tokens: u64) -> Self {
        state.prefilling.fetch_add(1, Ordering::Relaxed);
        state.prefill_tokens.fetch_add(tokens, Ordering::Relaxed);
        PrefillGuard { state, tokens }
    }
}

impl Drop for PrefillGuard<'_> {
    fn drop(&mut self) {
        self.state.prefilling.fetch_sub(1, Ordering::Relaxed);
        self.state
            .prefill_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// Instance states by URL, kept across reloads.
#[derive(Default)]
pub struct InstanceRegistry {
    states: Mutex<HashMap<String, Arc<InstanceState>>>,
}

impl InstanceRegistry {
    fn get(&self, url: &str) -> Arc<InstanceState> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states
            .entry(url.to_string())
            .or_insert_with(|| Arc::new(InstanceState::new()))
            .clone()
    }
}

pub struct PoolInstance {
    pub url: InstanceUrl,
    pub addr: SocketAddr,
    pub weight: u32,
    pub backend: Backend,
    pub state: Arc<InstanceState>,
    /// `host:port`, the Host header sent upstream.
    pub host_header: String,
    pub connect_timeout: Duration,
    /// Longest wait for any one read or write after the response header.
    pub read_timeout: Duration,
    /// Longest wait for the response header once the request is sent.
    pub first_byte_timeout: Duration,
    /// `cacheroute_upstream_inflight{pool,upstream}`, resolved once.
    inflight_gauge: IntGauge,
    /// Metric handles of this instance's successful requests, resolved once.
    pub metrics: Arc<InstanceMetrics>,
    /// Requests in flight allowed (0 = unbounded).
    pub max_inflight: u64,
    /// KDN injection target of this instance's store, when set on the instance.
    pub kv_target: Option<String>,
}

impl PoolInstance {
    /// A peer for one upstream exchange with this instance.
    pub fn peer(&self) -> HttpPeer {
        let mut peer = HttpPeer::new(self.addr, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer
    }
}

/// The proxy filter's settings for one pool.
pub struct PoolProxy {
    pub injection: InjectionStrategy,
    pub release: ReleasePolicy,
    pub kv_deadline: Duration,
    /// The TTFT cost model of the pool's GPUs.
    pub cost: Arc<CostModel>,
}

pub struct Pool {
    pub name: String,
    pub proxy: PoolProxy,
    /// `cacheroute_scheduling_decisions_total{pool}` by knowledge source (none,
    /// explicit, retrieved) and whether a KDN supplies it (no, yes), resolved once.
    pub scheduled: [[prometheus::IntCounter; 2]; 3],
    /// Retrieve for every request this pool may serve.
    pub rag_always: bool,
    /// KDN injection target of the instances' stores (default: the pool's name).
    pub kv_target: Option<String>,
    pub models: Vec<String>,
    /// Whether `models` comes from the instances' `/v1/models`.
    pub discovered: bool,
    pub settings: PoolSettings,
    pub instances: Vec<PoolInstance>,
    /// Chooses the instance of each attempt (the pool's `policy`).
    pub picker: Arc<dyn Picker>,
    backends: Backends,
    health_interval: Duration,
}

impl Pool {
    pub fn is_healthy(&self, inst: &PoolInstance) -> bool {
        self.backends.ready(&inst.backend) && !inst.state.failed_recently(self.health_interval)
    }
}

/// An immutable routing table: what the service plane reads per request.
pub struct Fleet {
    pub version: u64,
    /// The request filters, in order (`[gateway] filters`, or the role's preset).
    pub chain: Arc<Chain>,
    pub config: Config,
    /// Tokenizer of each served model (prefix checks), from `[proxy] tokenizer`.
    tokenizers: HashMap<String, Arc<Tokenizer>>,
    /// For a model no pool lists: the configured file, or the approximation.
    fallback_tokenizer: Arc<Tokenizer>,
    pub pools: Vec<Pool>,
    by_model: HashMap<String, Vec<usize>>,
    /// Union of the models of every pool, sorted.
    pub models: Vec<String>,
}

impl Fleet {
    /// The tokenizer of `model`: the one resolved for it at build time; for a model no
    /// pool lists (a proxy trusting an upstream scheduler), `auto` still gives Llama-3
    /// names the exact tokenizer (already loaded, or loaded once now).
    pub fn tokenizer_of(&self, model: &str) -> Arc<Tokenizer> {
        if let Some(t) = self.tokenizers.get(model) {
            return t.clone();
        }
        if self.config.proxy.tokenizer == TokenizerChoice::Auto && looks_like_llama3(model) {
            if let Ok(t) = Tokenizer::llama3() {
                return t;
            }
        }
        self.fallback_tokenizer.clone()
    }

    /// Pools serving `model`, in config order.
    pub fn pools_for(&self, model: &str) -> &[usize] {
        self.by_model.get(model).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn status(&self) -> FleetStatus {
        FleetStatus {
            filters: self.chain.names().iter().map(|n| n.to_string()).collect(),
            config_version: self.version,
            models: self.models.clone(),
            pools: self
                .pools
                .iter()
                .map(|p| PoolStatus {
                    name: p.name.clone(),
                    models: p.models.clone(),
                    models_discovered: p.discovered,
                    policy: p.picker.name(),
                    max_retries: p.settings.max_retries,
                    instances: p
                        .instances
                        .iter()
                        .map(|i| InstanceStatus {
                            url: i.url.base.clone(),
                            addr: i.addr.to_string(),
                            weight: i.weight,
                            healthy: p.is_healthy(i),
                            inflight: i.state.inflight(),
                            queued: i.state.queued(),
                            kv_waiting: i.state.kv_waiting.load(Ordering::Relaxed),
                            max_inflight: i.max_inflight,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct FleetStatus {
    pub config_version: u64,
    /// The request filters, in order.
    pub filters: Vec<String>,
    pub models: Vec<String>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Debug, Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub models: Vec<String>,
    pub models_discovered: bool,
    pub policy: &'static str,
    pub max_retries: usize,
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Serialize)]
pub struct InstanceStatus {
    pub url: String,
    pub addr: String,
    pub weight: u32,
    pub healthy: bool,
    pub inflight: u64,
    pub queued: u64,
    /// KV-mode requests waiting outside the queue for their KV (`text_bypass`, `wait`).
    pub kv_waiting: u64,
    pub max_inflight: u64,
}

/// A fixed backend set: membership changes come from config reloads, which
/// build a new `Backends` view.
struct FixedDiscovery(BTreeSet<Backend>);

#[async_trait]
impl ServiceDiscovery for FixedDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        Ok((self.0.clone(), HashMap::new()))
    }
}

/// The active health check: HTTP GET of the configured path, with settings
/// that hot reload can change (the registry accepts one check for its life).
pub struct ReloadableHealthCheck {
    inner: ArcSwap<HttpHealthCheck>,
}

impl ReloadableHealthCheck {
    pub fn new(defaults: &UpstreamDefaults) -> Self {
        ReloadableHealthCheck {
            inner: ArcSwap::from_pointee(Self::build(defaults)),
        }
    }

    pub fn update(&self, defaults: &UpstreamDefaults) {
        self.inner.store(Arc::new(Self::build(defaults)));
    }

    fn build(d: &UpstreamDefaults) -> HttpHealthCheck {
        let mut hc = HttpHealthCheck::new("localhost", false);
        if let Ok(mut req) = RequestHeader::build("GET", d.health_path.as_bytes(), None) {
            let _ = req.append_header("Host", "localhost");
            hc.req = req;
        }
        hc.consecutive_success = d.health_consecutive_success;
        hc.consecutive_failure = d.health_consecutive_failure;
        // A check must finish well within one interval.
        let timeout = Duration::from_millis(d.health_check_interval_ms.clamp(100, 1_000));
        hc.peer_template.options.connection_timeout = Some(timeout);
        hc.peer_template.options.read_timeout = Some(timeout);
        hc.reuse_connection = true;
        hc
    }
}

pub struct SharedCheck(pub Arc<ReloadableHealthCheck>);

#[async_trait]
impl HealthCheck for SharedCheck {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        let hc = self.0.inner.load_full();
        hc.check(target).await
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.0.inner.load().health_threshold(success)
    }
}

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
