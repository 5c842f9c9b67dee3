//! Prometheus metrics of the KDN (`GET /metrics`).

use prometheus::{
    Encoder, Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry as PromRegistry,
    TextEncoder,
};

/// Every KDN metric.
pub struct KdnMetrics {
    registry: PromRegistry,
    /// `cacheroute_kdn_knowledge_blocks{model,status}` (set at scrape time).
    pub blocks: IntGaugeVec,
    /// `cacheroute_kdn_warmups_total{model,result}`.
    pub warmups: IntCounterVec,
    /// `cacheroute_kdn_injection_jobs_total{result}`.
    pub jobs: IntCounterVec,
    /// `cacheroute_kdn_injection_transfers_total{result}`.
    pub transfers: IntCounterVec,
    /// `cacheroute_kdn_injected_bytes_total{target}` (logical KV bytes).
    pub injected_bytes: IntCounterVec,
    /// `cacheroute_kdn_injected_stored_bytes_total{target}` (bytes written to stores).
    pub stored_bytes: IntCounterVec,
    /// `cacheroute_kdn_injection_bandwidth_bytes_per_second` (recent, logical).
    pub bandwidth: Gauge,
    /// `cacheroute_kdn_injection_queue_length`.
    pub queue_len: IntGauge,
    /// `cacheroute_kdn_injection_active`.
    pub active: IntGauge,
    /// `cacheroute_kdn_injection_queue_wait_ms` (moving average).
    pub queue_wait_ms: Gauge,
    /// `cacheroute_kdn_member_heartbeats_total{result}`: registrations sent to gateways
    /// (`ok`, `error`), so an operator sees a KDN that no gateway accepts.
    pub heartbeats: IntCounterVec,
}

impl KdnMetrics {
    pub fn new() -> KdnMetrics {
        let registry = PromRegistry::new();
        let blocks = IntGaugeVec::new(
            Opts::new(
                "cacheroute_kdn_knowledge_blocks",
                "Knowledge blocks per model and status (registered, warming, kv_ready, failed)",
            ),
            &["model", "status"],
        )
        .expect("valid metric");
        let warmups = IntCounterVec::new(
            Opts::new(
                "cacheroute_kdn_warmups_total",
                "Warm-ups finished, by model and result (kv_ready, failed)",
            ),
            &["model", "result"],
        )
        .expect("valid metric");
        let jobs = IntCounterVec::new(
            Opts::new(
                "cacheroute_kdn_injection_jobs_total",
                "Injection jobs finished, by result (done, failed)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let transfers = IntCounterVec::new(
            Opts::new(
                "cacheroute_kdn_injection_transfers_total",
                "Block transfers by result: done (copied), resident (already in the target), \
                 failed, deduplicated (joined a transfer already queued or running)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let injected_bytes = IntCounterVec::new(
            Opts::new(
                "cacheroute_kdn_injected_bytes_total",
                "Logical KV bytes injected (chunks × chunk_size × kv_bytes_per_token), per target",
            ),
            &["target"],
        )
        .expect("valid metric");
        let stored_bytes = IntCounterVec::new(
            Opts::new(
                "cacheroute_kdn_injected_stored_bytes_total",
                "Bytes written to target stores by injections (kv_bytes + metadata values)",
            ),
            &["target"],
        )
        .expect("valid metric");
        let bandwidth = Gauge::new(
            "cacheroute_kdn_injection_bandwidth_bytes_per_second",
            "Logical KV bytes injected per second over the last 10 seconds",
        )
        .expect("valid metric");
        let queue_len = IntGauge::new(
            "cacheroute_kdn_injection_queue_length",
            "Block transfers waiting for an injection worker",
        )
        .expect("valid metric");
        let active = IntGauge::new(
            "cacheroute_kdn_injection_active",
            "Block transfers being copied",
        )
        .expect("valid metric");
        let queue_wait_ms = Gauge::new(
            "cacheroute_kdn_injection_queue_wait_ms",
            "Moving average (0.8/0.2) of the time transfers waited for a worker, in ms",
        )
        .expect("valid metric");
        let heartbeats = IntCounterVec::new(
            Opts::new(
                "cacheroute_kdn_member_heartbeats_total",
                "Registrations (heartbeats) sent to gateways, by result (ok, error)",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(blocks.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(warmups.clone()),
            Box::new(jobs.clone()),
            Box::new(transfers.clone()),
            Box::new(injected_bytes.clone()),
            Box::new(stored_bytes.clone()),
            Box::new(bandwidth.clone()),
            Box::new(queue_len.clone()),
            Box::new(active.clone()),
            Box::new(queue_wait_ms.clone()),
            Box::new(heartbeats.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        KdnMetrics {
            registry,
            blocks,
            warmups,
            jobs,
            transfers,
            injected_bytes,
            stored_bytes,
            bandwidth,
            queue_len,
            active,
            queue_wait_ms,
            heartbeats,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for KdnMetrics {
    fn default() -> Self {
        Self::new()
    }
}
