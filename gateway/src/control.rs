//! The control plane: metrics, status, reload, decisions (`/debug/strategy`),
//! and membership (`/v1/members`). Its own listener, so none of it is
//! reachable on the client port.

use crate::members::{parse_registration, MemberKind};
use crate::reload::Reloader;
use crate::state::GatewayState;
use async_trait::async_trait;
use cacheroute_decisions::openai::ApiError;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;

pub struct ControlPlane {
    pub state: Arc<GatewayState>,
    pub reloader: Arc<Reloader>,
}

#[async_trait]
impl ServeHttp for ControlPlane {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        // Read the body (registrations are small) so the connection can be reused.
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_CONTROL_BODY => {
                    body.extend_from_slice(&chunk)
                }
                Ok(Some(_)) => {
                    let err = ApiError::body_too_large(MAX_CONTROL_BODY);
                    return json(StatusCode::PAYLOAD_TOO_LARGE, err.to_json());
                }
                Ok(None) | Err(_) => break,
            }
        }
        if path == "/healthz" {
            return json(StatusCode::OK, br#"{"ok":true}"#.to_vec());
        }
        let token = self.state.fleet.load().config.gateway.control_token.clone();
        if !token.is_empty() && !authorized(session, &token) {
            let err = ApiError::new(
                401,
                "invalid_request_error",
                "unauthorized",
                "a valid bearer token is required",
            );
            let mut resp = json(StatusCode::UNAUTHORIZED, err.to_json());
            resp.headers_mut()
                .insert("www-authenticate", http::HeaderValue::from_static("Bearer"));
            return resp;
        }
        match (method, path.as_str()) {
            (Method::GET, "/metrics") => Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                .body(self.state.metrics.render())
                .unwrap_or_default(),
            (Method::GET, "/debug/status") => {
                let status = self.state.fleet.load().status();
                let body = serde_json::json!({
                    "config_version": status.config_version,
                    "filters": status.filters,
                    "models": status.models,
                    "pools": status.pools,
                    "last_reload_error": self.reloader.last_error().await,
                });
                json(
                    StatusCode::OK,
                    serde_json::to_vec_pretty(&body).unwrap_or_default(),
                )
            }
            (Method::POST, "/admin/reload") => match self.reloader.reload("admin").await {
                Ok(outcome) => json(
                    StatusCode::OK,
                    serde_json::to_vec(&outcome).unwrap_or_default(),
                ),
                Err(e) => json(
                    StatusCode::BAD_REQUEST,
                    serde_json::to_vec(&serde_json::json!({"ok": false, "error": e.to_string()}))
                        .unwrap_or_default(),
                ),
            },
            (Method::GET, "/debug/strategy") => {
                let n = query_param(&query, "n")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(20);
                let records = self.state.decisions.last(n);
                let data: Vec<&crate::decisions::DecisionRecord> =
                    records.iter().map(|r| &**r).collect();
                let body = serde_json::json!({"object": "list", "data": data});
                json(
                    StatusCode::OK,
                    serde_json::to_vec_pretty(&body).unwrap_or_default(),
                )
            }
            (Method::GET, "/debug/knowledge") => {
                let catalog = self.state.knowledge.catalog.load();
                let body = serde_json::json!({
                    "blocks": catalog.blocks.len(),
                    "embedded": catalog.embeddings.len(),
                    "versions": catalog.versions,
                    "kdns": **self.state.knowledge.kdns.load(),
                    "agents": **self.state.knowledge.agents.load(),
                });
                json(
                    StatusCode::OK,
                    serde_json::to_vec_pretty(&body).unwrap_or_default(),
                )
            }
            (Method::GET, "/v1/members") => json(
                StatusCode::OK,
                serde_json::to_vec(&self.state.members.to_json()).unwrap_or_default(),
            ),
            (Method::POST, "/v1/members") => match parse_registration(&body) {
                Ok(r) => {
                    let k = &self.state.fleet.load().config.knowledge;
                    let (kind, id) = (r.kind, r.id.clone());
                    match self
                        .state
                        .members
                        .register(r, k.member_ttl_s, k.max_members)
                    {
                        Ok(true) => {
                            tracing::info!(?kind, %id, "member registered");
                            self.state.sync_now.notify_one();
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(?kind, %id, "member refused: {}", e.message);
                            return json(StatusCode::TOO_MANY_REQUESTS, e.to_json());
                        }
                    }
                    json(
                        StatusCode::OK,
                        serde_json::to_vec(&serde_json::json!({
                            "object": "member", "kind": kind, "id": id, "registered": true,
                        }))
                        .unwrap_or_default(),
                    )
                }
                Err(e) => json(StatusCode::BAD_REQUEST, e.to_json()),
            },
            (Method::DELETE, p) if p.starts_with("/v1/members/") => {
                let rest = &p["/v1/members/".len()..];
                match rest
                    .split_once('/')
                    .and_then(|(k, id)| Some((MemberKind::parse(k)?, id)))
                {
                    Some((kind, id)) => {
                        let removed = self.state.members.remove(kind, id);
                        if removed {
                            tracing::info!(?kind, %id, "member left");
                            self.state.sync_now.notify_one();
                        }
                        json(
                            StatusCode::OK,
                            serde_json::to_vec(&serde_json::json!({"deleted": removed}))
                                .unwrap_or_default(),
                        )
                    }
                    None => json(StatusCode::NOT_FOUND, ApiError::not_found(p).to_json()),
                }
            }
            (
                _,
                "/metrics" | "/debug/status" | "/admin/reload" | "/debug/strategy"
                | "/debug/knowledge" | "/v1/members",
            ) => {
                let err = ApiError::method_not_allowed(session.req_header().method.as_str(), &path);
                json(StatusCode::METHOD_NOT_ALLOWED, err.to_json())
            }
            _ => json(StatusCode::NOT_FOUND, ApiError::not_found(&path).to_json()),
        }
    }
}

/// Largest control-plane request body.
const MAX_CONTROL_BODY: usize = 64 * 1024;

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn authorized(session: &ServerSession, token: &str) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), token.as_bytes()))
}

/// Compare without leaking where the first difference is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(body)
        .unwrap_or_default()
}
