//! The sim's small routes: 404, `/health`, `/version`, `/v1/models`, `/metrics` (with
//! the LMCache key settings as an info series), `/debug/last_request`, `/debug/engine`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

pub(super) async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response()
}

pub(super) async fn health() -> StatusCode {
    StatusCode::OK
}

pub(super) async fn version() -> Json<Value> {
    Json(json!({"version": concat!("cacheroute-sim-", env!("CARGO_PKG_VERSION"))}))
}

pub(super) async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.model,
            "object": "model",
            "created": st.started,
            "owned_by": "vllm",
            "root": st.root,
            "parent": null,
            "max_model_len": st.max_model_len,
            "permission": [{
                "id": format!("modelperm-{:016x}", st.seed ^ st.started),
                "object": "model_permission",
                "created": st.started,
                "allow_create_engine": false,
                "allow_sampling": true,
                "allow_logprobs": true,
                "allow_search_indices": false,
                "allow_view": true,
                "allow_fine_tuning": false,
                "organization": "*",
                "group": null,
                "is_blocking": false,
            }],
        }],
    }))
}

pub(super) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        lmcache_info(&st, st.metrics.render()),
    )
        .into_response()
}

/// The LMCache settings the sim's keys follow, as an info series after the
/// rest (`cacheroute doctor` compares them with a KDN's): a real engine
/// exposes no such series, so the doctor takes them from flags there.
fn lmcache_info(st: &AppState, text: String) -> String {
    let Some(lm) = &st.lmcache else {
        return text;
    };
    let p = &lm.config().params;
    let esc = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let seed = p
        .hash_seed
        .as_deref()
        .map(cacheroute_lmcache::keys::hash_seed_digest);
    format!(
        "{text}# HELP cacheroute_sim_lmcache_info The simulated LMCache's key settings.\n\
         # TYPE cacheroute_sim_lmcache_info gauge\n\
         cacheroute_sim_lmcache_info{{model=\"{}\",scheme=\"{}\",chunk_size=\"{}\",dtype=\"{}\",\
         world_size=\"{}\",hash_seed_digest=\"{}\",save_unfull_chunk=\"{}\"}} 1\n",
        esc(&p.model),
        p.scheme.name(),
        p.chunk_size,
        esc(&p.dtype),
        p.world_size,
        seed.unwrap_or_default(),
        p.save_unfull_chunk,
    )
}

pub(super) async fn last_request(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(st.last_request.lock().expect("last_request lock").1.clone())
}

pub(super) async fn engine_debug(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "zero_latency": st.zero_latency,
        "time_scale": st.time_scale,
        "scheduler": {
            "max_num_seqs": st.sched_cfg.max_num_seqs,
            "max_num_batched_tokens": st.sched_cfg.max_num_batched_tokens,
            "block_size": st.sched_cfg.block_size,
            "num_gpu_blocks": st.sched_cfg.num_gpu_blocks,
            "kv_capacity_tokens": st.sched_cfg.kv_capacity_tokens(),
            "enable_prefix_caching": st.sched_cfg.enable_prefix_caching,
            "kv_store_gbps": st.sched_cfg.kv_store_gbps,
            "async_loading": st.sched_cfg.async_loading,
        },
        "cost_model": st.cost,
        "stats": st.engine.as_ref().map(|e| e.stats()),
        "lmcache": st.lmcache.as_ref().map(|l| l.describe()),
    }))
}
