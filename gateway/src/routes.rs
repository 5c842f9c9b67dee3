//! The rest of vLLM's OpenAI server: routes the gateway passes through to an
//! instance unchanged, so that a client sees what vLLM would answer.
//!
//! A request on one of these routes is read whole (bounded like a completion),
//! routed by the body's `model` to a pool serving it (a model-less request goes
//! to any healthy instance), and forwarded by the same exchange as completions:
//! same retries on connect failure, health, admission and metrics. No knowledge
//! is injected. Routes vLLM serves per instance only (admin, profiling, LoRA
//! loading, `/metrics`) and stateful look-ups (`GET /v1/responses/{id}`, which
//! only the instance that made the response holds) are not routed: they 404.

use crate::fleet::Fleet;
use crate::headers;
use crate::pipeline::RequestCtx;
use crate::service::{ReqCtx, ServicePlane};
use cacheroute_decisions::openai::{ApiError, Route};
use cacheroute_decisions::scheduler::{KnowledgeRequirement, SchedulingDecision};
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as Session;
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// One pass-through route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassRoute {
    pub path: &'static str,
    /// `POST` routes carry a JSON body naming the model; `GET` ones do not.
    pub method: &'static str,
    /// Metrics label.
    pub label: &'static str,
}

const fn post(path: &'static str, label: &'static str) -> PassRoute {
    PassRoute {
        path,
        method: "POST",
        label,
    }
}

const fn get(path: &'static str, label: &'static str) -> PassRoute {
    PassRoute {
        path,
        method: "GET",
        label,
    }
}

/// vLLM's OpenAI server routes (vllm/entrypoints/openai/api_server.py and the
/// pooling routers), beyond the completions the gateway plans itself.
pub const ROUTES: &[PassRoute] = &[
    post("/v1/embeddings", "embeddings"),
    post("/tokenize", "tokenize"),
    post("/detokenize", "detokenize"),
    post("/pooling", "pooling"),
    post("/classify", "classify"),
    post("/score", "score"),
    post("/v1/score", "score"),
    post("/rerank", "rerank"),
    post("/v1/rerank", "rerank"),
    post("/v2/rerank", "rerank"),
    post("/v1/responses", "responses"),
    // Multipart bodies (audio): routed model-less, to any healthy instance.
    post("/v1/audio/transcriptions", "audio"),
    post("/v1/audio/translations", "audio"),
    post("/invocations", "invocations"),
    get("/version", "version"),
    get("/ping", "ping"),
];

/// The pass-through route of `path`, if it is one.
pub fn lookup(path: &str) -> Option<&'static PassRoute> {
    ROUTES.iter().find(|r| r.path == path)
}

/// The `model` a JSON body names: `Ok(None)` for a body that is not a JSON
/// object or names none (routed to any instance; the engine judges the body).
pub fn model_of(body: &[u8]) -> Result<Option<String>, ApiError> {
    #[derive(Deserialize)]
    struct Named {
        #[serde(default)]
        model: Option<serde_json::Value>,
    }
    let Ok(named) = serde_json::from_slice::<Named>(body) else {
        return Ok(None);
    };
    match named.model {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::bad_request(
            "invalid_type",
            format!(
                "model: expected a string, got {}",
                cacheroute_decisions::errmsg::describe(&other)
            ),
        )
        .with_param("model")),
    }
}

/// The pools a pass-through request may go to, in config order.
fn pools_of(fleet: &Fleet, model: Option<&str>) -> Result<Vec<usize>, ApiError> {
    match model {
        Some(m) => {
            let pools = fleet.pools_for(m);
            if pools.is_empty() {
                return Err(ApiError::model_not_found(m));
            }
            Ok(pools.to_vec())
        }
        None => Ok((0..fleet.pools.len()).collect()),
    }
}

impl ServicePlane {
    /// Serve one pass-through route: read, route by model, forward.
    pub(crate) async fn pass_through(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        route: &'static PassRoute,
    ) -> Result<()> {
        ctx.route = route.label;
        if session.req_header().method.as_str() != route.method {
            let err =
                ApiError::method_not_allowed(session.req_header().method.as_str(), route.path);
            return self
                .reject_with(session, ctx, err, &[("allow", route.method)])
                .await;
        }
        let fleet = self.state.fleet.load_full();
        let gw = &fleet.config.gateway;
        let deadline = Duration::from_millis(gw.body_timeout_ms);
        let raw = match crate::conn::read_body(session, gw.max_body_bytes, deadline).await? {
            Ok(b) => b,
            Err(err) => {
                ctx.body_refused = matches!(err.status, 400 | 408);
                return self.reject(session, ctx, err).await;
            }
        };
        let hops = session
            .req_header()
            .headers
            .get(headers::HOPS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if hops >= gw.max_hops {
            let err = ApiError::loop_detected(hops, gw.max_hops);
            return self.reject(session, ctx, err).await;
        }
        let model = if route.method == "POST" {
            match model_of(&raw) {
                Ok(m) => m,
                Err(err) => return self.reject(session, ctx, err).await,
            }
        } else {
            None
        };
        let pools = match pools_of(&fleet, model.as_deref()) {
            Ok(p) => p,
            Err(err) => return self.reject(session, ctx, err).await,
        };
        // Nothing to decide but where the body goes: no knowledge, no injection.
        let pool = pools.first().map(|&p| fleet.pools[p].name.clone());
        let model = model.unwrap_or_default();
        let mut pipe = Box::new(RequestCtx::new(
            fleet,
            Route::Completions,
            model.clone(),
            ctx.start,
        ));
        pipe.route_label = route.label;
        pipe.hops = hops;
        pipe.pool_order = pools;
        pipe.decision = Some(Arc::new(SchedulingDecision {
            model,
            knowledge: KnowledgeRequirement::None,
            pool,
            kdn: None,
            reason: "pass-through route: no knowledge".into(),
            window_overridden: false,
            kdn_candidates: Vec::new(),
            pool_candidates: Vec::new(),
        }));
        pipe.request_headers = vec![(headers::HOPS, (hops + 1).to_string())];
        pipe.prompt_tokens = (raw.len() / 4) as u64;
        pipe.id = self.state.next_request_id.fetch_add(1, Ordering::Relaxed);
        let result = self.forward(session, ctx, &mut pipe, raw).await;
        ctx.pipe = Some(pipe);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_routes_are_known_and_others_are_not() {
        for p in [
            "/v1/embeddings",
            "/tokenize",
            "/detokenize",
            "/v1/rerank",
            "/version",
        ] {
            assert!(lookup(p).is_some(), "{p}");
        }
        for p in [
            "/v1/embeddings/",
            "/metrics",
            "/sleep",
            "/reset_prefix_cache",
            "/v1/foo",
        ] {
            assert!(lookup(p).is_none(), "{p}");
        }
        assert_eq!(lookup("/version").map(|r| r.method), Some("GET"));
    }

    #[test]
    fn the_model_comes_from_a_json_body_when_it_names_one() {
        assert_eq!(
            model_of(br#"{"input":"x","model":"m"}"#).unwrap(),
            Some("m".to_string())
        );
        assert_eq!(model_of(br#"{"input":"x"}"#).unwrap(), None);
        assert_eq!(model_of(b"--boundary\r\n").unwrap(), None);
        assert_eq!(model_of(br#"{"model":""}"#).unwrap(), None);
        let err = model_of(br#"{"model":7}"#).unwrap_err();
        assert_eq!(err.message, "model: expected a string, got 7");
        assert_eq!(err.param, Some("model"));
    }
}
