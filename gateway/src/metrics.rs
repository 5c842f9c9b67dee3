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
    pub request_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub inflight: IntGaugeVec,
    pub healthy: IntGaugeVec,
    pub config_version: IntGauge,
    pub reloads: IntCounterVec,
    pub retries: IntCounterVec,
    pub upstream_errors: IntCounterVec,
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
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
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
