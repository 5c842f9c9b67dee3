//! What the service plane, the control plane and the background tasks share.

use crate::decisions::DecisionLog;
use crate::fleet::{Fleet, FleetBuilder};
use crate::knowledge::KnowledgeState;
use crate::kv_inject::KvInjections;
use crate::kv_plan::PrefixChecks;
use crate::members::Members;
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use cacheroute_decisions::injection::Corrections;
use pingora::connectors::TransportConnector;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::Notify;

pub struct GatewayState {
    /// The routing table in force; swapped whole on reload.
    pub fleet: ArcSwap<Fleet>,
    pub builder: FleetBuilder,
    pub metrics: Arc<Metrics>,
    /// Pooled keep-alive connections to the instances.
    pub transport: TransportConnector,
    /// The knowledge catalog, KDN and agent loads (kept by the sync task).
    pub knowledge: KnowledgeState,
    /// KDNs and agents registered on the control plane.
    pub members: Members,
    /// Wakes the sync task early (a new member registered).
    pub sync_now: Notify,
    /// Recent decisions and the decision log.
    pub decisions: DecisionLog,
    /// Request ids for decision records.
    pub next_request_id: AtomicU64,
    /// Talks to KDNs and embedding endpoints on the request path.
    pub http: reqwest::Client,
    /// KV injections in progress and recently done.
    pub injections: Arc<KvInjections>,
    /// Online corrections of the adaptive TTFT predictions.
    pub corrections: std::sync::Mutex<Corrections>,
    /// Prefix token checks, cached per block.
    pub prefix_checks: PrefixChecks,
    /// Knowledge requests whose injection was decided (the `hybrid` turn).
    pub knowledge_turn: AtomicU64,
    /// Service-plane requests being handled now (read, queued, streaming): a
    /// SIGTERM drain ends when this reaches zero.
    pub active_requests: AtomicU64,
    /// `/v1/models`' merged cards, briefly (see [`crate::models`]).
    pub model_cards: crate::models::ModelCards,
}

impl GatewayState {
    pub fn new(fleet: Fleet, builder: FleetBuilder, metrics: Arc<Metrics>) -> Arc<GatewayState> {
        metrics.config_version.set(fleet.version as i64);
        let decisions = DecisionLog::new();
        metrics.register(decisions.stats.collector());
        if let Err(e) = decisions.set_sink(&fleet.config.gateway.log_decisions) {
            tracing::warn!(error = %e, "decision log disabled");
        }
        Arc::new(GatewayState {
            fleet: ArcSwap::from_pointee(fleet),
            builder,
            metrics,
            transport: TransportConnector::new(None),
            knowledge: KnowledgeState::default(),
            members: Members::default(),
            sync_now: Notify::new(),
            decisions,
            next_request_id: AtomicU64::new(1),
            http: reqwest::Client::builder()
                .pool_idle_timeout(std::time::Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            injections: Arc::new(KvInjections::default()),
            corrections: std::sync::Mutex::new(Corrections::new()),
            prefix_checks: PrefixChecks::default(),
            knowledge_turn: AtomicU64::new(0),
            active_requests: AtomicU64::new(0),
            model_cards: crate::models::ModelCards::default(),
        })
    }

    /// Publish the instances' health as gauges (after each health pass and
    /// after each swap).
    pub fn publish_health(&self) {
        let fleet = self.fleet.load();
        self.metrics.healthy.reset();
        for pool in &fleet.pools {
            for inst in &pool.instances {
                self.metrics
                    .healthy
                    .with_label_values(&[&pool.name, &inst.url.base])
                    .set(i64::from(pool.is_healthy(inst)));
            }
        }
    }
}
