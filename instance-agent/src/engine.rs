//! Scraping the engine's `/metrics` and turning vLLM's metric names into a load.

use crate::metrics::AgentMetrics;
use crate::prom::{self, Sample};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub const RUNNING: &str = "vllm:num_requests_running";
pub const WAITING: &str = "vllm:num_requests_waiting";
/// vLLM V1's name for KV cache usage (0..1).
pub const KV_USAGE: &str = "vllm:kv_cache_usage_perc";
/// The older (V0) name, still emitted by some versions.
pub const GPU_CACHE_USAGE: &str = "vllm:gpu_cache_usage_perc";
pub const PROMPT_TOKENS: &str = "vllm:prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "vllm:generation_tokens_total";

/// Token rates are measured over about this much recent time.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);

/// What one successful scrape says.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    pub running: u64,
    pub waiting: u64,
    pub kv_usage: f64,
    pub prompt_tokens_total: Option<f64>,
    pub generation_tokens_total: Option<f64>,
}

/// Read vLLM's metrics from parsed samples. Counts are summed over label sets
/// (several `model_name`s, or several data-parallel engines); KV usage is a
/// fraction per engine, so it is averaged instead, preferring the newer name.
pub fn read_vllm(samples: &[Sample]) -> Reading {
    let count = |name| prom::sum(samples, name).map_or(0, |v| v.max(0.0).round() as u64);
    let kv = prom::mean(samples, KV_USAGE)
        .or_else(|| prom::mean(samples, GPU_CACHE_USAGE))
        .unwrap_or(0.0);
    Reading {
        running: count(RUNNING),
        waiting: count(WAITING),
        kv_usage: kv.clamp(0.0, 1.0),
        prompt_tokens_total: prom::sum(samples, PROMPT_TOKENS),
        generation_tokens_total: prom::sum(samples, GENERATION_TOKENS),
    }
}

/// Rate of a monotonic counter over a sliding window of observations.
#[derive(Debug, Clone)]
pub struct RateWindow {
    window: Duration,
    points: VecDeque<(Instant, f64)>,
}

impl RateWindow {
    pub fn new(window: Duration) -> Self {
        RateWindow {
            window,
            points: VecDeque::new(),
        }
    }

    /// Record the counter's value at `t`.
    pub fn push(&mut self, t: Instant, v: f64) {
        if !v.is_finite() {
            return;
        }
        if self.points.back().is_some_and(|&(_, last)| v < last) {
            // the counter went back: the engine restarted; old points mean nothing now
            self.points.clear();
        }
        self.points.push_back((t, v));
        // keep the newest point at least `window` old as the base, so the rate
        // always spans the whole window once there is enough history
        while self.points.len() > 2 && t.duration_since(self.points[1].0) >= self.window {
            self.points.pop_front();
        }
    }

    /// Units per second between the oldest and newest kept points (0 without two).
    pub fn rate(&self) -> f64 {
        match (self.points.front(), self.points.back()) {
            (Some(&(t0, v0)), Some(&(t1, v1))) if t1 > t0 => {
                (v1 - v0) / t1.duration_since(t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    pub fn clear(&mut self) {
        self.points.clear();
    }
}

/// The engine's load as last seen.
///
/// When a scrape fails, `engine_up` turns false and the rates drop to 0 (nothing
/// is being measured), while `running`, `waiting` and `kv_usage` keep their last
/// scraped values (0 if never scraped); `last_ok` tells how stale they are.
#[derive(Debug, Clone)]
pub struct EngineState {
    pub engine_up: bool,
    pub running: u64,
    pub waiting: u64,
    pub kv_usage: f64,
    pub prompt_tokens_per_s: f64,
    pub generation_tokens_per_s: f64,
    pub last_ok: Option<Instant>,
    pub last_error: Option<String>,
    prompt: RateWindow,
    generation: RateWindow,
}

impl Default for EngineState {
    fn default() -> Self {
        EngineState {
            engine_up: false,
            running: 0,
            waiting: 0,
            kv_usage: 0.0,
            prompt_tokens_per_s: 0.0,
            generation_tokens_per_s: 0.0,
            last_ok: None,
            last_error: None,
            prompt: RateWindow::new(RATE_WINDOW),
            generation: RateWindow::new(RATE_WINDOW),
        }
    }
}

impl EngineState {
    pub fn on_success(&mut self, t: Instant, r: &Reading) {
        self.engine_up = true;
        self.running = r.running;
        self.waiting = r.waiting;
        self.kv_usage = r.kv_usage;
        self.prompt_tokens_per_s = observe(&mut self.prompt, t, r.prompt_tokens_total);
        self.generation_tokens_per_s = observe(&mut self.generation, t, r.generation_tokens_total);
        self.last_ok = Some(t);
        self.last_error = None;
    }

    pub fn on_failure(&mut self, error: String) {
        self.engine_up = false;
        self.prompt_tokens_per_s = 0.0;
        self.generation_tokens_per_s = 0.0;
        // a gap in the series would blur the next rates; start over
        self.prompt.clear();
        self.generation.clear();
        self.last_error = Some(error);
    }
}

fn observe(w: &mut RateWindow, t: Instant, v: Option<f64>) -> f64 {
    match v {
        Some(v) => {
            w.push(t, v);
            w.rate().max(0.0)
        }
        None => {
            w.clear();
            0.0
        }
    }
}

/// Why a scrape failed (also the `result` label of the scrape counter).
#[derive(Debug)]
pub enum ScrapeError {
    Timeout,
    Unreachable(String),
    Status(u16),
}

impl ScrapeError {
    pub fn label(&self) -> &'static str {
        match self {
            ScrapeError::Timeout => "timeout",
            ScrapeError::Unreachable(_) => "unreachable",
            ScrapeError::Status(_) => "bad_status",
        }
    }
}

impl std::fmt::Display for ScrapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScrapeError::Timeout => write!(f, "timed out"),
            ScrapeError::Unreachable(e) => write!(f, "{e}"),
            ScrapeError::Status(s) => write!(f, "HTTP {s}"),
        }
    }
}

/// One `GET {engine}/metrics`.
pub async fn scrape(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<Reading, ScrapeError> {
    let fetch = async {
        let resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| ScrapeError::Unreachable(error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(ScrapeError::Status(resp.status().as_u16()));
        }
        resp.text()
            .await
            .map_err(|e| ScrapeError::Unreachable(error_chain(&e)))
    };
    // one deadline for connect, headers and body alike
    let text = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Timeout)??;
    Ok(read_vllm(&prom::parse(&text)))
}

/// The error and its sources, so "error sending request" says why.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Scrape every `interval` until `stop` turns true. Never fails: errors only
/// mark the engine down.
pub async fn scrape_loop(
    client: reqwest::Client,
    engine: String,
    interval: Duration,
    state: Arc<Mutex<EngineState>>,
    metrics: Arc<AgentMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let url = format!("{engine}/metrics");
    // short, but not below what a busy engine needs to render its metrics
    let timeout = interval.clamp(Duration::from_millis(500), Duration::from_secs(2));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up: Option<bool> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let result = tokio::select! {
            r = scrape(&client, &url, timeout) => r,
            _ = stop.changed() => return,
        };
        let now = Instant::now();
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(reading) => {
                st.on_success(now, &reading);
                metrics.scrapes.with_label_values(&["ok"]).inc();
                if was_up != Some(true) {
                    tracing::info!(engine = %engine, "engine metrics reachable");
                }
                was_up = Some(true);
            }
            Err(e) => {
                metrics.scrapes.with_label_values(&[e.label()]).inc();
                if was_up != Some(false) {
                    tracing::warn!(engine = %engine, error = %e, "engine metrics scrape failed; engine marked down");
                } else {
                    tracing::debug!(engine = %engine, error = %e, "engine metrics scrape failed");
                }
                st.on_failure(e.to_string());
                was_up = Some(false);
            }
        }
        metrics.observe_engine(&st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_names_summing_label_sets() {
        let text = "\
vllm:num_requests_running{model_name=\"a\"} 2.0
vllm:num_requests_running{model_name=\"b\"} 1.0
vllm:num_requests_waiting{model_name=\"a\"} 5
vllm:gpu_cache_usage_perc{model_name=\"a\"} 0.9
vllm:kv_cache_usage_perc{model_name=\"a\"} 0.25
vllm:kv_cache_usage_perc{model_name=\"b\"} 0.75
vllm:prompt_tokens_total{model_name=\"a\"} 1e3
vllm:prompt_tokens_total{model_name=\"b\"} 24
vllm:generation_tokens_total{model_name=\"a\"} 7
";
        let r = read_vllm(&prom::parse(text));
        assert_eq!(r.running, 3);
        assert_eq!(r.waiting, 5);
        // the newer name wins; fractions average rather than add up past 1
        assert_eq!(r.kv_usage, 0.5);
        assert_eq!(r.prompt_tokens_total, Some(1024.0));
        assert_eq!(r.generation_tokens_total, Some(7.0));
    }

    #[test]
    fn older_kv_name_and_missing_metrics() {
        let r = read_vllm(&prom::parse("vllm:gpu_cache_usage_perc 0.4\n"));
        assert_eq!(r.kv_usage, 0.4);
        assert_eq!(r.running, 0);
        assert_eq!(r.prompt_tokens_total, None);
        let r = read_vllm(&prom::parse("vllm:num_requests_running -1\n"));
        assert_eq!(r.running, 0);
    }

    #[test]
    fn rate_window_spans_the_window_and_survives_resets() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut w = RateWindow::new(Duration::from_secs(1));
        assert_eq!(w.rate(), 0.0);
        w.push(s(0), 0.0);
        assert_eq!(w.rate(), 0.0);
        w.push(s(500), 50.0);
        assert!((w.rate() - 100.0).abs() < 1e-9);
        w.push(s(1000), 100.0);
        w.push(s(1500), 300.0);
        w.push(s(2000), 500.0);
        // base is the newest point at least 1 s old (t=1000): 400 over 1 s
        assert!((w.rate() - 400.0).abs() < 1e-9, "{}", w.rate());
        // counter reset: history dropped
        w.push(s(2500), 10.0);
        assert_eq!(w.rate(), 0.0);
        w.push(s(3000), 60.0);
        assert!((w.rate() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn failure_keeps_counts_and_zeroes_rates() {
        let t0 = Instant::now();
        let mut st = EngineState::default();
        let mut r = Reading {
            running: 4,
            waiting: 2,
            kv_usage: 0.3,
            prompt_tokens_total: Some(0.0),
            generation_tokens_total: Some(0.0),
        };
        st.on_success(t0, &r);
        r.prompt_tokens_total = Some(100.0);
        st.on_success(t0 + Duration::from_secs(1), &r);
        assert!(st.engine_up);
        assert!((st.prompt_tokens_per_s - 100.0).abs() < 1e-9);
        st.on_failure("down".into());
        assert!(!st.engine_up);
        assert_eq!((st.running, st.waiting, st.kv_usage), (4, 2, 0.3));
        assert_eq!(st.prompt_tokens_per_s, 0.0);
        assert!(st.last_ok.is_some());
    }
}
