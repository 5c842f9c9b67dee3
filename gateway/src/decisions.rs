//! Explain: every routed request's decisions, with their inputs, candidates, scores
//! and outcome, kept in a ring for `GET /debug/strategy` and optionally written as
//! one JSON line each to a decision log.

use serde::Serialize;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

use cacheroute_decisions::injection::InjectionDecision;
use cacheroute_decisions::scheduler::SchedulingDecision;

/// What happened to the request.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Outcome {
    pub status: u16,
    /// The instance (or downstream gateway) that answered.
    pub instance: Option<String>,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    /// KV-mode: how the KV got there (`resident`, `injected`, or a fallback reason).
    pub kv: Option<String>,
    /// Anything notable (fallbacks, bypasses).
    pub notes: Vec<String>,
}

/// One request's record.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    pub id: u64,
    /// Unix seconds.
    pub at: f64,
    pub route: &'static str,
    pub role: &'static str,
    /// Gateway hops before this one.
    pub hops: u32,
    /// The tenant an API key named (with the `api_keys` filter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub scheduling: std::sync::Arc<SchedulingDecision>,
    pub injection: Option<InjectionDecision>,
    pub outcome: Outcome,
}

/// Where the decision log goes.
enum Sink {
    Stdout,
    File(std::fs::File),
}

pub struct DecisionLog {
    ring: Mutex<VecDeque<std::sync::Arc<DecisionRecord>>>,
    sink: Mutex<Option<(String, Sink)>>,
    /// Whether `sink` is set (checked without its lock on every request).
    logging: std::sync::atomic::AtomicBool,
    /// Knowledge use counts and TTFT by mode, over every record (the dashboard's).
    pub stats: crate::ui::stats::DecisionStats,
}

impl DecisionLog {
    pub fn new() -> Self {
        DecisionLog {
            ring: Mutex::new(VecDeque::new()),
            sink: Mutex::new(None),
            logging: std::sync::atomic::AtomicBool::new(false),
            stats: crate::ui::stats::DecisionStats::new(),
        }
    }

    /// Point the log at `path` ("-": stdout, "": off); a no-op when unchanged.
    pub fn set_sink(&self, path: &str) -> anyhow::Result<()> {
        let mut g = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().map(|(p, _)| p.as_str()).unwrap_or("") == path {
            return Ok(());
        }
        *g = match path {
            "" => None,
            "-" => Some((path.to_string(), Sink::Stdout)),
            _ => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| anyhow::anyhow!("decision log {path}: {e}"))?;
                Some((path.to_string(), Sink::File(f)))
            }
        };
        self.logging
            .store(g.is_some(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub fn push(&self, record: DecisionRecord, keep: usize) {
        self.stats.observe(&record);
        let record = std::sync::Arc::new(record);
        if self.logging.load(std::sync::atomic::Ordering::Relaxed) {
            let mut g = self.sink.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, sink)) = g.as_mut() {
                if let Ok(mut line) = serde_json::to_vec(&*record) {
                    line.push(b'\n');
                    let r = match sink {
                        Sink::Stdout => std::io::stdout().lock().write_all(&line),
                        Sink::File(f) => f.write_all(&line),
                    };
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "writing the decision log");
                    }
                }
            }
        }
        if keep == 0 {
            return;
        }
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        while ring.len() >= keep {
            ring.pop_front();
        }
        ring.push_back(record);
    }

    /// The last `n` records, newest first.
    pub fn last(&self, n: usize) -> Vec<std::sync::Arc<DecisionRecord>> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().take(n).cloned().collect()
    }
}

impl Default for DecisionLog {
    fn default() -> Self {
        Self::new()
    }
}
