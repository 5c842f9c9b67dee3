//! The agent's own Prometheus metrics (`cacheroute_agent_*`), one registry per agent
//! so that several agents in one process (tests, demos) do not collide.

use crate::engine::EngineState;
use prometheus::{Encoder, Gauge, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct AgentMetrics {
    registry: Registry,
    /// `result`: ok, timeout, unreachable, bad_status.
    pub scrapes: IntCounterVec,
    pub engine_up: IntGauge,
    pub engine_running: IntGauge,
    pub engine_waiting: IntGauge,
    pub engine_kv_usage: Gauge,
    pub prompt_tokens_per_s: Gauge,
    pub generation_tokens_per_s: Gauge,
    /// `result`: ok, error.
    pub registrations: IntCounterVec,
    /// `result`: ok, kdn_error, store_error.
    pub residency_checks: IntCounterVec,
    pub resident_blocks: IntGauge,
}

impl AgentMetrics {
    pub fn new() -> anyhow::Result<AgentMetrics> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(format!("cacheroute_agent_{name}"), help);
        let m = AgentMetrics {
            scrapes: IntCounterVec::new(
                opts("scrapes_total", "Engine /metrics scrapes by result."),
                &["result"],
            )?,
            engine_up: IntGauge::with_opts(opts(
                "engine_up",
                "1 when the last engine scrape succeeded.",
            ))?,
            engine_running: IntGauge::with_opts(opts(
                "engine_running",
                "Requests running on the engine (last scrape).",
            ))?,
            engine_waiting: IntGauge::with_opts(opts(
                "engine_waiting",
                "Requests waiting on the engine (last scrape).",
            ))?,
            engine_kv_usage: Gauge::with_opts(opts(
                "engine_kv_usage",
                "Engine KV cache usage, 0..1 (last scrape).",
            ))?,
            prompt_tokens_per_s: Gauge::with_opts(opts(
                "engine_prompt_tokens_per_second",
                "Engine prompt tokens per second over the recent window.",
            ))?,
            generation_tokens_per_s: Gauge::with_opts(opts(
                "engine_generation_tokens_per_second",
                "Engine generation tokens per second over the recent window.",
            ))?,
            registrations: IntCounterVec::new(
                opts(
                    "registrations_total",
                    "Registrations (heartbeats) sent to gateways, by result.",
                ),
                &["result"],
            )?,
            residency_checks: IntCounterVec::new(
                opts(
                    "residency_checks_total",
                    "Residency rounds (KDN list + store lookups), by result.",
                ),
                &["result"],
            )?,
            resident_blocks: IntGauge::with_opts(opts(
                "resident_blocks",
                "Knowledge blocks fully resident in this instance's KV store.",
            ))?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.scrapes.clone()))?;
        r.register(Box::new(m.engine_up.clone()))?;
        r.register(Box::new(m.engine_running.clone()))?;
        r.register(Box::new(m.engine_waiting.clone()))?;
        r.register(Box::new(m.engine_kv_usage.clone()))?;
        r.register(Box::new(m.prompt_tokens_per_s.clone()))?;
        r.register(Box::new(m.generation_tokens_per_s.clone()))?;
        r.register(Box::new(m.registrations.clone()))?;
        r.register(Box::new(m.residency_checks.clone()))?;
        r.register(Box::new(m.resident_blocks.clone()))?;
        // show every outcome from the start, so rates and alerts need no absent()
        for l in ["ok", "timeout", "unreachable", "bad_status"] {
            m.scrapes.with_label_values(&[l]);
        }
        for l in ["ok", "error"] {
            m.registrations.with_label_values(&[l]);
        }
        Ok(m)
    }

    /// Mirror the engine state into the gauges.
    pub fn observe_engine(&self, st: &EngineState) {
        self.engine_up.set(i64::from(st.engine_up));
        self.engine_running.set(st.running as i64);
        self.engine_waiting.set(st.waiting as i64);
        self.engine_kv_usage.set(st.kv_usage);
        self.prompt_tokens_per_s.set(st.prompt_tokens_per_s);
        self.generation_tokens_per_s.set(st.generation_tokens_per_s);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // encoding gathered families into a Vec cannot fail
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
