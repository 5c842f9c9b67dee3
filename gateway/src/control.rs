//! The control plane: metrics, status, reload. Its own listener, so none of
//! it is reachable on the client port.

use crate::reload::Reloader;
use crate::state::GatewayState;
use async_trait::async_trait;
use cacheroute_filters::openai::ApiError;
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
        // Read any body so the connection can be reused.
        let _ = session.drain_request_body().await;
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
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
                Err(msg) => json(
                    StatusCode::BAD_REQUEST,
                    serde_json::to_vec(&serde_json::json!({"ok": false, "error": msg}))
                        .unwrap_or_default(),
                ),
            },
            (_, "/metrics" | "/debug/status" | "/admin/reload") => {
                let err = ApiError::method_not_allowed(session.req_header().method.as_str(), &path);
                json(StatusCode::METHOD_NOT_ALLOWED, err.to_json())
            }
            _ => json(StatusCode::NOT_FOUND, ApiError::not_found(&path).to_json()),
        }
    }
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
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
