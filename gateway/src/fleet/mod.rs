//! The fleet the gateway routes over: pools of instances, their live state
//! (requests in flight, recent connect failures) and their health.
//!
//! A `Fleet` is immutable and built from one validated `Config`; hot reload
//! builds a new one and swaps it in. Live per-instance state is keyed by the
//! instance URL and outlives reloads, so in-flight counts stay right while
//! requests started on the old fleet finish.
//!
//! `instance`: one instance's live state, metrics and the guards that count a request
//! on it; `health`: the health check that reloads re-point; `builder`: building a fleet
//! from a config ([`FleetBuilder`]).

mod builder;
mod health;
mod instance;

pub use builder::FleetBuilder;
pub use health::{ReloadableHealthCheck, SharedCheck};
pub use instance::{InflightGuard, InstanceMetrics, InstanceRegistry, InstanceState, PrefillGuard};

use crate::config::{Config, InstanceUrl, PoolSettings};
use crate::pickers::Picker;
use crate::pipeline::Chain;
use cacheroute_decisions::cost_model::CostModel;
use cacheroute_decisions::injection::{InjectionStrategy, ReleasePolicy};
use cacheroute_lmcache::tokenizer::{looks_like_llama3, Tokenizer, TokenizerChoice};
use pingora::lb::{Backend, Backends};
use pingora::prelude::HttpPeer;
use prometheus::IntGauge;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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
