//! vLLM-named Prometheus metrics, one registry per sim server.

use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// vLLM's TTFT buckets (seconds).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's request latency buckets (seconds).
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// The metrics a sim exports on `/metrics`. Times are simulated engine seconds.
pub struct SimMetrics {
    pub registry: Registry,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub gpu_cache_usage: Gauge,
    pub kv_cache_usage: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub ttft: Histogram,
    pub e2e: Histogram,
    /// `vllm:prefix_cache_queries_total` / `_hits_total`: prompt tokens asked of / found in
    /// the GPU prefix cache (APC), per admission.
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub request_success: IntCounterVec,
    /// `vllm:external_prefix_cache_queries_total`: prompt tokens of requests admitted with
    /// LMCache.
    pub external_prefix_cache_queries: IntCounter,
    /// `vllm:external_prefix_cache_hits_total`: of those, tokens LMCache supplied beyond
    /// the GPU prefix cache's hit.
    pub external_prefix_cache_hits: IntCounter,
    /// `sim_lmcache_chunks_loaded_total`: chunk keys loaded (chunks that supplied tokens).
    pub lmcache_chunks_loaded: IntCounter,
    /// `sim_lmcache_chunks_stored_total`: chunks (keys, one per rank) written.
    pub lmcache_chunks_stored: IntCounter,
    /// `sim_lmcache_stored_bytes_total`: bytes written (scaled blobs + headers).
    pub lmcache_stored_bytes: IntCounter,
    /// `sim_kv_store_errors_total`: failed or timed-out store operations.
    pub kv_store_errors: IntCounter,
    /// `sim_kv_handle_requests_total`: requests carrying `x-cacheroute-kv-handle`.
    pub kv_handle_requests: IntCounter,
    /// `sim_kv_transfer_params_requests_total`: requests with a `kv_transfer_params` object.
    pub kv_transfer_params_requests: IntCounter,
    /// `sim:kv_handle_checks_total{result}`: KV handles checked, by outcome
    /// ([`crate::api::KvHandleCheck`]).
    pub kv_handle_checks: IntCounterVec,
    /// `sim_cached_tokens_total{tier="gpu|cpu|remote"}`: cached prompt tokens supplied at
    /// admission by the GPU prefix cache, LMCache's CPU tier and the remote store.
    pub cached_tokens: IntCounterVec,
    /// `sim_gpu_prefill_seconds_total`: simulated forward seconds spent on prefill.
    pub gpu_prefill_seconds: Counter,
}

impl SimMetrics {
    pub fn new(model: &str) -> anyhow::Result<SimMetrics> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model);
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(name, help)
                .const_label("model_name", model)
                .buckets(buckets.to_vec())
        };
        let m = SimMetrics {
            running: IntGauge::with_opts(opts(
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
            ))?,
            waiting: IntGauge::with_opts(opts(
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
            ))?,
            gpu_cache_usage: Gauge::with_opts(opts(
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage.",
            ))?,
            kv_cache_usage: Gauge::with_opts(opts(
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
            ))?,
            prompt_tokens: IntCounter::with_opts(opts(
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
            ))?,
            generation_tokens: IntCounter::with_opts(opts(
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
            ))?,
            ttft: Histogram::with_opts(hist(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS,
            ))?,
            e2e: Histogram::with_opts(hist(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                E2E_BUCKETS,
            ))?,
            prefix_cache_queries: IntCounter::with_opts(opts(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            ))?,
            prefix_cache_hits: IntCounter::with_opts(opts(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            ))?,
            request_success: IntCounterVec::new(
                opts(
                    "vllm:request_success_total",
                    "Count of successfully processed requests.",
                ),
                &["finished_reason"],
            )?,
            external_prefix_cache_queries: IntCounter::with_opts(opts(
                "vllm:external_prefix_cache_queries_total",
                "External prefix cache queries from KV connector cross-instance cache sharing, \
                 in terms of number of queried tokens.",
            ))?,
            external_prefix_cache_hits: IntCounter::with_opts(opts(
                "vllm:external_prefix_cache_hits_total",
                "External prefix cache hits from KV connector cross-instance cache sharing, \
                 in terms of number of cached tokens.",
            ))?,
            lmcache_chunks_loaded: IntCounter::with_opts(opts(
                "sim_lmcache_chunks_loaded_total",
                "LMCache chunk keys loaded at admission (supplying tokens beyond the GPU hit).",
            ))?,
            lmcache_chunks_stored: IntCounter::with_opts(opts(
                "sim_lmcache_chunks_stored_total",
                "LMCache chunks (keys, one per rank) written to the KV store.",
            ))?,
            lmcache_stored_bytes: IntCounter::with_opts(opts(
                "sim_lmcache_stored_bytes_total",
                "Bytes written to the KV store (scaled-down kv_bytes blobs plus headers).",
            ))?,
            kv_store_errors: IntCounter::with_opts(opts(
                "sim_kv_store_errors_total",
                "KV store operations that failed or timed out (treated as misses).",
            ))?,
            kv_handle_requests: IntCounter::with_opts(opts(
                "sim_kv_handle_requests_total",
                "Completion requests carrying an x-cacheroute-kv-handle header.",
            ))?,
            kv_transfer_params_requests: IntCounter::with_opts(opts(
                "sim_kv_transfer_params_requests_total",
                "Completion requests carrying a kv_transfer_params object.",
            ))?,
            kv_handle_checks: IntCounterVec::new(
                opts(
                    "sim:kv_handle_checks_total",
                    "KV handles (x-cacheroute-kv-handle or kv_transfer_params) checked against \
                     the LMCache store, by result.",
                ),
                &["result"],
            )?,
            cached_tokens: IntCounterVec::new(
                opts(
                    "sim_cached_tokens_total",
                    "Cached prompt tokens supplied at admission, by tier: gpu (vLLM prefix \
                     cache), cpu (LMCache local CPU tier), remote (LMCache remote store).",
                ),
                &["tier"],
            )?,
            gpu_prefill_seconds: Counter::with_opts(opts(
                "sim_gpu_prefill_seconds_total",
                "Simulated GPU seconds of forward passes spent on prefill (each step's \
                 compute time prorated by its share of prefill tokens; loads excluded).",
            ))?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.running.clone()))?;
        r.register(Box::new(m.waiting.clone()))?;
        r.register(Box::new(m.gpu_cache_usage.clone()))?;
        r.register(Box::new(m.kv_cache_usage.clone()))?;
        r.register(Box::new(m.prompt_tokens.clone()))?;
        r.register(Box::new(m.generation_tokens.clone()))?;
        r.register(Box::new(m.ttft.clone()))?;
        r.register(Box::new(m.e2e.clone()))?;
        r.register(Box::new(m.prefix_cache_queries.clone()))?;
        r.register(Box::new(m.prefix_cache_hits.clone()))?;
        r.register(Box::new(m.request_success.clone()))?;
        r.register(Box::new(m.kv_handle_checks.clone()))?;
        r.register(Box::new(m.cached_tokens.clone()))?;
        r.register(Box::new(m.gpu_prefill_seconds.clone()))?;
        for c in [
            &m.external_prefix_cache_queries,
            &m.external_prefix_cache_hits,
            &m.lmcache_chunks_loaded,
            &m.lmcache_chunks_stored,
            &m.lmcache_stored_bytes,
            &m.kv_store_errors,
            &m.kv_handle_requests,
            &m.kv_transfer_params_requests,
        ] {
            r.register(Box::new(c.clone()))?;
        }
        // show both outcomes from the start, as vLLM does
        m.request_success.with_label_values(&["stop"]);
        m.request_success.with_label_values(&["length"]);
        for tier in ["gpu", "cpu", "remote"] {
            m.cached_tokens.with_label_values(&[tier]);
        }
        for c in crate::api::KvHandleCheck::ALL {
            m.kv_handle_checks.with_label_values(&[c.as_str()]);
        }
        Ok(m)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("utf-8")
    }
}
