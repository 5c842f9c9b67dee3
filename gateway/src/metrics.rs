//! Prometheus metrics of the gateway, served on the control plane.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets in seconds: LLM requests span milliseconds to minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

pub struct Metrics {
    registry: Registry,
    duration_chat: prometheus::Histogram,
    duration_completions: prometheus::Histogram,
    pub requests: IntCounterVec,
    /// Completion requests by tenant (configured tenants, else "unknown") and status.
    pub tenant_requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub inflight: IntGaugeVec,
    pub healthy: IntGaugeVec,
    pub config_version: IntGauge,
    pub reloads: IntCounterVec,
    pub retries: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub knowledge_blocks: IntGauge,
    pub kdn_up: IntGaugeVec,
    pub members: IntGaugeVec,
    pub scheduling: IntCounterVec,
    pub injection: IntCounterVec,
    pub knowledge_tokens: IntCounterVec,
    pub knowledge_cached_tokens: prometheus::IntCounter,
    pub ttft_prediction_ratio: HistogramVec,
    pub queue_length: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub admission_rejected: IntCounterVec,
    pub ready_release: IntCounterVec,
    pub prefix_mismatch: prometheus::IntCounter,
    pub kv_injections: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "cacheroute_requests_total",
                "Requests answered, by route, HTTP status and upstream instance",
            ),
            &["route", "status", "upstream"],
        )
        .expect("valid metric");
        let tenant_requests = IntCounterVec::new(
            Opts::new(
                "cacheroute_tenant_requests_total",
                "Completion requests by tenant (an API key's; otherwise unknown) and HTTP status",
            ),
            &["tenant", "status"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "cacheroute_request_duration_seconds",
                "Time from the request's arrival to the end of its response",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "cacheroute_ttft_seconds",
                "Time from the request's arrival to the first response body byte from the upstream",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "upstream"],
        )
        .expect("valid metric");
        let inflight = IntGaugeVec::new(
            Opts::new(
                "cacheroute_upstream_inflight",
                "Requests in flight per upstream instance",
            ),
            &["pool", "upstream"],
        )
        .expect("valid metric");
        let healthy = IntGaugeVec::new(
            Opts::new(
                "cacheroute_upstream_healthy",
                "1 if the instance passes health checks, else 0",
            ),
            &["pool", "upstream"],
        )
        .expect("valid metric");
        let config_version = IntGauge::new(
            "cacheroute_config_version",
            "Version of the configuration in force (1 at start, +1 per successful reload)",
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "cacheroute_config_reload_total",
                "Configuration reload attempts by result (ok, error)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "cacheroute_upstream_retries_total",
                "Requests retried on another instance because they could not be sent",
            ),
            &["pool", "upstream"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "cacheroute_upstream_errors_total",
                "Upstream failures by instance and kind",
            ),
            &["upstream", "kind"],
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let knowledge_blocks = IntGauge::new(
            "cacheroute_knowledge_blocks",
            "Knowledge blocks in the gateway's catalog (synced from the KDNs)",
        )
        .expect("valid metric");
        let kdn_up = gauge(
            "cacheroute_kdn_up",
            "1 if the KDN answered the last sync, else 0",
            &["kdn"],
        );
        let members = gauge(
            "cacheroute_members",
            "Live registered members by kind",
            &["kind"],
        );
        let scheduling = counter(
            "cacheroute_scheduling_decisions_total",
            "Scheduler decisions by chosen pool, knowledge source (none, explicit, retrieved) and whether a KDN supplies it",
            &["pool", "knowledge", "kdn"],
        );
        let injection = counter(
            "cacheroute_injection_decisions_total",
            "Injection decisions by mode (text, kv) and reason",
            &["mode", "reason"],
        );
        let knowledge_tokens = counter(
            "cacheroute_knowledge_tokens_total",
            "Knowledge prefix tokens sent to instances, by injection mode",
            &["mode"],
        );
        let knowledge_cached_tokens = prometheus::IntCounter::new(
            "cacheroute_knowledge_cached_tokens_total",
            "Knowledge prefix tokens whose KV was resident when the request went (the KV reuse ratio is this over cacheroute_knowledge_tokens_total)",
        )
        .expect("valid metric");
        let ttft_prediction_ratio = HistogramVec::new(
            HistogramOpts::new(
                "cacheroute_ttft_prediction_ratio",
                "Measured TTFT over the injection decision's predicted TTFT, by mode",
            )
            .buckets(vec![
                0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0,
            ]),
            &["mode"],
        )
        .expect("valid metric");
        let queue_length = gauge(
            "cacheroute_queue_length",
            "Requests waiting for an admission slot, per instance",
            &["pool", "upstream"],
        );
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "cacheroute_queue_wait_seconds",
                "Time requests waited for an admission slot",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["pool"],
        )
        .expect("valid metric");
        let admission_rejected = counter(
            "cacheroute_admission_rejected_total",
            "Requests refused with 429 by pool and reason (queue_full, timeout)",
            &["pool", "reason"],
        );
        let ready_release = counter(
            "cacheroute_ready_release_total",
            "KV-mode requests whose KV was not resident when admitted, by release policy and outcome (ready, deadline_text, bypassed_by_text, failed_text)",
            &["policy", "outcome"],
        );
        let prefix_mismatch = prometheus::IntCounter::new(
            "cacheroute_prefix_mismatch_total",
            "KV-mode requests sent as text because the rendered prefix did not match the registered one",
        )
        .expect("valid metric");
        let kv_injections = counter(
            "cacheroute_kv_injections_total",
            "Injection jobs the gateway asked KDNs for, by result (ok, failed, timeout)",
            &["result"],
        );
        for c in [
            Box::new(knowledge_blocks.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(kdn_up.clone()),
            Box::new(members.clone()),
            Box::new(scheduling.clone()),
            Box::new(injection.clone()),
            Box::new(knowledge_tokens.clone()),
            Box::new(knowledge_cached_tokens.clone()),
            Box::new(ttft_prediction_ratio.clone()),
            Box::new(queue_length.clone()),
            Box::new(queue_wait.clone()),
            Box::new(admission_rejected.clone()),
            Box::new(ready_release.clone()),
            Box::new(prefix_mismatch.clone()),
            Box::new(kv_injections.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        for mode in ["text", "kv"] {
            knowledge_tokens.with_label_values(&[mode]);
        }
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tenant_requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(ttft.clone()),
            Box::new(inflight.clone()),
            Box::new(healthy.clone()),
            Box::new(config_version.clone()),
            Box::new(reloads.clone()),
            Box::new(retries.clone()),
            Box::new(upstream_errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Show both reload series from the start, so a dashboard sees 0, not "absent".
        reloads.with_label_values(&["ok"]);
        reloads.with_label_values(&["error"]);
        Metrics {
            tenant_requests,
            duration_chat: request_duration.with_label_values(&["chat"]),
            duration_completions: request_duration.with_label_values(&["completions"]),
            registry,
            requests,
            request_duration,
            ttft,
            inflight,
            healthy,
            config_version,
            reloads,
            retries,
            upstream_errors,
            knowledge_blocks,
            kdn_up,
            members,
            scheduling,
            injection,
            knowledge_tokens,
            knowledge_cached_tokens,
            ttft_prediction_ratio,
            queue_length,
            queue_wait,
            admission_rejected,
            ready_release,
            prefix_mismatch,
            kv_injections,
        }
    }

    /// `cacheroute_request_duration_seconds{route}`; the completion routes'
    /// series are resolved once.
    pub fn duration(&self, route: &str) -> prometheus::Histogram {
        match route {
            "chat" => self.duration_chat.clone(),
            "completions" => self.duration_completions.clone(),
            other => self.request_duration.with_label_values(&[other]),
        }
    }

    /// Add a metric kept elsewhere (the dashboard's decision stats).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::warn!(error = %e, "metric not registered");
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
