//! What the dashboard and Grafana need from every decision record beyond the
//! ring of recent ones: how often each knowledge block was used, and the
//! measured TTFT by injection mode (`cacheroute_ttft_by_mode_seconds{mode}`).

use crate::decisions::DecisionRecord;
use prometheus::{HistogramOpts, HistogramVec};
use std::collections::HashMap;
use std::sync::Mutex;

/// Distinct knowledge ids counted; past it new ids are not counted (the catalog is
/// far smaller, and a client's unknown ids are refused before a record exists).
const MAX_IDS: usize = 100_000;

/// TTFT buckets in seconds: a cached prefix answers in milliseconds, a queued
/// long prefill in tens of seconds.
const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub struct DecisionStats {
    uses: Mutex<HashMap<String, u64>>,
    ttft_by_mode: HistogramVec,
}

impl DecisionStats {
    pub fn new() -> Self {
        let ttft_by_mode = HistogramVec::new(
            HistogramOpts::new(
                "cacheroute_ttft_by_mode_seconds",
                "Measured time to first byte of answered requests, by injection mode (text, kv; none: no knowledge)",
            )
            .buckets(TTFT_BUCKETS.to_vec()),
            &["mode"],
        )
        .expect("valid metric");
        // Every mode's series from the start, so a dashboard sees 0, not "absent".
        for mode in ["text", "kv", "none"] {
            ttft_by_mode.with_label_values(&[mode]);
        }
        DecisionStats {
            uses: Mutex::new(HashMap::new()),
            ttft_by_mode,
        }
    }

    /// The metric, for the gateway's registry.
    pub fn collector(&self) -> Box<dyn prometheus::core::Collector> {
        Box::new(self.ttft_by_mode.clone())
    }

    /// Count one record.
    pub fn observe(&self, r: &DecisionRecord) {
        let mode = r
            .injection
            .as_ref()
            .map(|d| d.mode.as_str())
            .unwrap_or("none");
        if let Some(ms) = r.outcome.ttft_ms {
            if r.outcome.status < 400 {
                self.ttft_by_mode
                    .with_label_values(&[mode])
                    .observe(ms / 1e3);
            }
        }
        let ids = r.scheduling.knowledge.ids();
        if ids.is_empty() {
            return;
        }
        let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if let Some(n) = uses.get_mut(id) {
                *n += 1;
            } else if uses.len() < MAX_IDS {
                uses.insert(id.to_string(), 1);
            }
        }
    }

    /// How many answered requests needed block `id`.
    pub fn uses(&self, id: &str) -> u64 {
        let uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        uses.get(id).copied().unwrap_or(0)
    }
}

impl Default for DecisionStats {
    fn default() -> Self {
        Self::new()
    }
}
