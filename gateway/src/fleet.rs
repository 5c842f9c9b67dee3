//! The fleet the gateway routes over: pools of instances, their live state
//! (requests in flight, recent connect failures) and their health.
//!
//! A `Fleet` is immutable and built from one validated `Config`; hot reload
//! builds a new one and swaps it in. Live per-instance state is keyed by the
//! instance URL and outlives reloads, so in-flight counts stay right while
//! requests started on the old fleet finish.

use crate::config::{Config, InstanceUrl, PoolSettings, UpstreamDefaults};
use crate::idle_pool::IdlePool;
use crate::metrics::Metrics;
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use cacheroute_filters::balance::{self, Candidate};
use cacheroute_filters::openai::Route;
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
}

impl InstanceState {
    fn new() -> Self {
        InstanceState {
            inflight: AtomicU64::new(0),
            idle: IdlePool::new(IDLE_CAPACITY, IDLE_TIMEOUT),
            last_connect_failure_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
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
    /// Longest wait for any one read (first byte included) or write.
    pub read_timeout: Duration,
    /// `cacheroute_upstream_inflight{pool,upstream}`, resolved once.
    inflight_gauge: IntGauge,
    /// Metric handles of this instance's successful requests, resolved once.
    pub metrics: Arc<InstanceMetrics>,
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

pub struct Pool {
    pub name: String,
    pub models: Vec<String>,
    /// Whether `models` comes from the instances' `/v1/models`.
    pub discovered: bool,
    pub settings: PoolSettings,
    pub instances: Vec<PoolInstance>,
    backends: Backends,
    ticket: AtomicU64,
    health_interval: Duration,
}

impl Pool {
    pub fn is_healthy(&self, inst: &PoolInstance) -> bool {
        self.backends.ready(&inst.backend) && !inst.state.failed_recently(self.health_interval)
    }

    /// Choose an instance for one attempt, skipping those `tried` says were.
    pub fn choose(&self, tried: impl Fn(usize) -> bool) -> Option<usize> {
        // Pools are small: decide on the stack, not the heap.
        const ON_STACK: usize = 16;
        let candidate = |(i, inst): (usize, &PoolInstance)| Candidate {
            weight: inst.weight,
            inflight: inst.state.inflight(),
            available: !tried(i) && self.is_healthy(inst),
        };
        let ticket = self.ticket.fetch_add(1, Ordering::Relaxed);
        let n = self.instances.len();
        if n <= ON_STACK {
            let mut buf = [Candidate {
                weight: 0,
                inflight: 0,
                available: false,
            }; ON_STACK];
            for (slot, c) in buf
                .iter_mut()
                .zip(self.instances.iter().enumerate().map(candidate))
            {
                *slot = c;
            }
            balance::choose(self.settings.policy, &buf[..n], ticket)
        } else {
            let all: Vec<Candidate> = self.instances.iter().enumerate().map(candidate).collect();
            balance::choose(self.settings.policy, &all, ticket)
        }
    }
}

/// An immutable routing table: what the service plane reads per request.
pub struct Fleet {
    pub version: u64,
    pub config: Config,
    pub pools: Vec<Pool>,
    by_model: HashMap<String, Vec<usize>>,
    /// Union of the models of every pool, sorted.
    pub models: Vec<String>,
}

impl Fleet {
    /// Pools serving `model`, in config order.
    pub fn pools_for(&self, model: &str) -> &[usize] {
        self.by_model.get(model).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn status(&self) -> FleetStatus {
        FleetStatus {
            config_version: self.version,
            models: self.models.clone(),
            pools: self
                .pools
                .iter()
                .map(|p| PoolStatus {
                    name: p.name.clone(),
                    models: p.models.clone(),
                    models_discovered: p.discovered,
                    policy: p.settings.policy.as_str(),
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
        let health_interval = Duration::from_millis(config.upstream.health_check_interval_ms);
        let mut pools = Vec::with_capacity(config.pools.len());
        for pc in &config.pools {
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
                    state,
                    inflight_gauge,
                    metrics: Arc::new(InstanceMetrics::new(metrics, &url.base)),
                    url,
                    addr,
                    weight: ic.weight as u32,
                    backend,
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
            pools.push(Pool {
                name: pc.name.clone(),
                models,
                discovered: was_discovered,
                settings: pc.settings(&config.upstream),
                instances,
                backends,
                ticket: AtomicU64::new(0),
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
        Ok(Fleet {
            version,
            config,
            pools,
            by_model,
            models,
        })
    }
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
