//! The instance agent's reports: `GET /v1/load` (engine load and the knowledge blocks
//! fully resident in the instance's LMCache store), read by gateways every sync.

use serde::{Deserialize, Serialize};

/// `GET /v1/load` of an agent (`"object": "agent.load"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentLoad {
    /// Whether the engine's last `/metrics` scrape succeeded.
    pub engine_up: bool,
    /// Requests the engine is running.
    pub running: u64,
    /// Requests waiting in the engine's queue.
    pub waiting: u64,
    /// GPU KV cache usage, 0..1.
    pub kv_usage: f64,
    /// Prompt tokens per second over the last scrapes.
    pub prompt_tokens_per_s: f64,
    /// Knowledge block ids whose every chunk is in the instance's store.
    pub resident: Vec<String>,
    /// The agent's id (`agent@...`); absent from hand-made reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The engine's base URL; absent from hand-made reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Generation tokens per second; absent from hand-made reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_tokens_per_s: Option<f64>,
    /// Milliseconds since the last successful scrape; absent (null) before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
}
