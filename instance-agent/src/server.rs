//! The agent's HTTP API.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /v1/load` | `{"object":"agent.load","id","instance","engine_up","running","waiting","kv_usage","prompt_tokens_per_s","generation_tokens_per_s","age_ms","resident":[ids]}` |
//! | `GET /v1/resident` | `{"object":"list","data":[{"id","model","chunks","resident_chunks"}]}` |
//! | `GET /metrics` | the agent's own Prometheus metrics (`cacheroute_agent_*`) |
//! | `GET /health` | `{"status":"ok","engine_up"}`: the agent is alive (always 200) |

use crate::engine::EngineState;
use crate::metrics::AgentMetrics;
use crate::residency::{resident_ids, ResidentEntry};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cacheroute_wire::agent::AgentLoad;
use cacheroute_wire::error::ErrorBody;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

/// What the handlers read.
pub struct Shared {
    pub id: String,
    pub instance: String,
    pub engine: Arc<Mutex<EngineState>>,
    pub resident: Arc<Mutex<Vec<ResidentEntry>>>,
    pub metrics: Arc<AgentMetrics>,
}

impl Shared {
    /// The `/v1/load` document.
    pub fn load_json(&self) -> Value {
        let resident = resident_ids(&self.resident.lock().unwrap_or_else(|p| p.into_inner()));
        // read under the lock rather than clone the rate history
        let st = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        let load = AgentLoad {
            id: Some(self.id.clone()),
            instance: Some(self.instance.clone()),
            engine_up: st.engine_up,
            running: st.running,
            waiting: st.waiting,
            kv_usage: st.kv_usage,
            prompt_tokens_per_s: st.prompt_tokens_per_s,
            generation_tokens_per_s: Some(st.generation_tokens_per_s),
            age_ms: st.last_ok.map(|t| t.elapsed().as_millis() as u64),
            resident,
        };
        let mut v = serde_json::to_value(load).expect("serialisable");
        v["object"] = json!("agent.load");
        // `age_ms` is null (not absent) before the first scrape, as it always was
        if v.get("age_ms").is_none() {
            v["age_ms"] = Value::Null;
        }
        v
    }

    /// The `/v1/resident` document.
    pub fn resident_json(&self) -> Value {
        let entries = self
            .resident
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        json!({"object": "list", "data": entries})
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/load", get(load))
        .route("/v1/resident", get(resident))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(shared)
}

async fn load(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(s.load_json())
}

async fn resident(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(s.resident_json())
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn health(State(s): State<Arc<Shared>>) -> Json<Value> {
    let up = s.engine.lock().unwrap_or_else(|p| p.into_inner()).engine_up;
    Json(json!({"status": "ok", "engine_up": up}))
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody::new(
            "no such agent endpoint; see /v1/load, /v1/resident, /metrics, /health",
            "not_found",
            Some("not_found"),
        )),
    )
        .into_response()
}
