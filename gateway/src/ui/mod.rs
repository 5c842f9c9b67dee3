//! The dashboard and playground at `/ui` on the control plane.
//!
//! [`ControlApp`] is the control plane's Pingora app: `/ui` paths are served here
//! (assets embedded in the binary, JSON feeds polled by the page about once a
//! second, and the playground's relay, which streams), everything else goes to
//! [`ControlPlane`] unchanged. A plain `ServeHttp` cannot stream a body, hence an
//! app of our own.
//!
//! Auth: with a control token set, a `/ui` request needs `Authorization: Bearer`
//! (scripts, tests) or the `cacheroute_ui` cookie. A browser cannot set a header on
//! a page it navigates to, so `GET /ui?token=T` checks the token once, sets the
//! cookie (HttpOnly: scripts never see it; SameSite=Strict: other sites cannot
//! ride on it; Path=/ui: the rest of the control plane still wants the header)
//! and redirects to `/ui`, so the token leaves the address bar and history.

pub mod feed;
pub mod jobs;
pub mod playground;
pub mod stats;

use crate::control::{constant_time_eq, ControlPlane};
use async_trait::async_trait;
use cacheroute_decisions::openai::ApiError;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The cookie that carries the control token from a browser.
const COOKIE: &str = "cacheroute_ui";
/// Largest body of a `/ui` request other than the playground's.
const MAX_UI_BODY: usize = 64 * 1024;
/// Largest playground request (its OpenAI body and headers).
pub const MAX_SEND_BODY: usize = 1024 * 1024;
/// Most decisions one poll returns.
const MAX_DECISIONS: usize = 500;

/// The control plane's app: `/ui` here, the rest to [`ControlPlane`].
pub struct ControlApp {
    plane: ControlPlane,
}

impl ControlApp {
    pub fn new(plane: ControlPlane) -> Self {
        ControlApp { plane }
    }
}

/// What a `/ui` handler did.
enum Reply {
    /// A whole response to write.
    Full(Response<Vec<u8>>),
    /// The handler streamed its response itself; `reusable`: it ended cleanly.
    Streamed { reusable: bool },
}

#[async_trait]
impl HttpServerApp for ControlApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut http: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // As Pingora's own `ServeHttp` app does.
        match http.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "control plane: reading a request");
                return None;
            }
        }
        http.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let path = http.req_header().uri.path().to_string();
        let resp = if path == "/ui" || path.starts_with("/ui/") {
            match self.ui(&mut http, &path).await {
                Reply::Full(r) => r,
                Reply::Streamed { reusable } => {
                    return finish(http, reusable).await;
                }
            }
        } else {
            self.plane.response(&mut http).await
        };
        let (parts, body) = resp.into_parts();
        let header: ResponseHeader = parts.into();
        if let Err(e) = http.write_response_header(Box::new(header)).await {
            tracing::debug!(error = %e, "control plane: writing a response");
            return None;
        }
        if !body.is_empty() {
            if let Err(e) = http.write_response_body(body.into(), true).await {
                tracing::debug!(error = %e, "control plane: writing a response");
                return None;
            }
        }
        finish(http, true).await
    }
}

async fn finish(http: ServerSession, reusable: bool) -> Option<ReusedHttpStream> {
    if !reusable {
        return None;
    }
    let settings = HttpPersistentSettings::for_session(&http);
    match http.finish().await {
        Ok(c) => c.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
        Err(_) => None,
    }
}

impl ControlApp {
    async fn ui(&self, http: &mut ServerSession, path: &str) -> Reply {
        let method = http.req_header().method.clone();
        let state = &self.plane.state;
        let token = state.fleet.load().config.gateway.control_token.clone();
        // Only an authorized caller may send the relay's larger body: an anonymous one
        // is read (to answer on a clean connection) up to the small limit only.
        let limit = if path == "/ui/api/send" && (token.is_empty() || authorized(http, &token)) {
            MAX_SEND_BODY
        } else {
            MAX_UI_BODY
        };
        let body = match read_body(http, limit).await {
            Ok(b) => b,
            Err(resp) => return Reply::Full(resp),
        };
        let query = query_pairs(http.req_header().uri.query().unwrap_or(""));
        if !token.is_empty() && !authorized(http, &token) {
            // A browser's first visit: the token in the query sets the cookie.
            let given = query.iter().find(|(k, _)| k == "token").map(|(_, v)| v);
            if method == Method::GET
                && (path == "/ui" || path == "/ui/")
                && given.is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
            {
                return Reply::Full(
                    Response::builder()
                        .status(StatusCode::SEE_OTHER)
                        .header("location", "/ui")
                        .header(
                            "set-cookie",
                            format!("{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict"),
                        )
                        .header("content-length", "0")
                        .body(Vec::new())
                        .unwrap_or_default(),
                );
            }
            return Reply::Full(unauthorized(path));
        }
        let get = method == Method::GET;
        let full = |r| Reply::Full(r);
        match path {
            "/ui" | "/ui/" if get => full(asset("text/html; charset=utf-8", INDEX_HTML)),
            "/ui/app.js" if get => full(asset("text/javascript; charset=utf-8", APP_JS)),
            "/ui/app.css" if get => full(asset("text/css; charset=utf-8", APP_CSS)),
            "/ui/api/state" if get => {
                let reload_error = self.plane.reloader.last_error().await;
                full(json(StatusCode::OK, &feed::state(state, reload_error)))
            }
            "/ui/api/decisions" if get => {
                let num = |k: &str| {
                    query
                        .iter()
                        .find(|(q, _)| q == k)
                        .and_then(|(_, v)| v.parse::<u64>().ok())
                };
                let after = num("after").unwrap_or(0);
                let n = num("n").map_or(200, |n| n as usize).min(MAX_DECISIONS);
                full(json(StatusCode::OK, &feed::decisions(state, after, n)))
            }
            "/ui/api/decision" if get => {
                let id = query
                    .iter()
                    .find(|(q, _)| q == "id")
                    .and_then(|(_, v)| v.parse::<u64>().ok());
                match id.and_then(|id| feed::decision(state, id)) {
                    Some(v) => full(json(StatusCode::OK, &v)),
                    None => full(error_json(ApiError::new(
                        404,
                        "invalid_request_error",
                        "decision_not_found",
                        "no such decision among the recent ones (give ?id=N)",
                    ))),
                }
            }
            "/ui/api/send" if method == Method::POST => {
                match playground::send(state, http, &body).await {
                    Ok(reusable) => Reply::Streamed { reusable },
                    Err(e) => full(error_json(e)),
                }
            }
            "/ui" | "/ui/" | "/ui/app.js" | "/ui/app.css" | "/ui/api/state"
            | "/ui/api/decisions" | "/ui/api/decision" | "/ui/api/send" => full(error_json(
                ApiError::method_not_allowed(method.as_str(), path),
            )),
            _ => full(error_json(ApiError::not_found(path))),
        }
    }
}

/// Read the request body, up to `limit` bytes (so a kept-alive connection stays usable).
async fn read_body(http: &mut ServerSession, limit: usize) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match http.read_request_body().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= limit => body.extend_from_slice(&chunk),
            Ok(Some(_)) => {
                http.set_keepalive(None);
                return Err(error_json(ApiError::body_too_large(limit)));
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                http.set_keepalive(None);
                return Err(error_json(ApiError::new(
                    400,
                    "invalid_request_error",
                    "bad_body",
                    format!("reading the request body: {e}"),
                )));
            }
        }
    }
}

/// The bearer header or the dashboard's cookie carries the token.
fn authorized(http: &ServerSession, token: &str) -> bool {
    let h = &http.req_header().headers;
    let ok = |t: &str| constant_time_eq(t.trim().as_bytes(), token.as_bytes());
    let bearer = h
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(ok);
    bearer
        || h.get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .any(|(k, v)| k == COOKIE && ok(v))
}

fn unauthorized(path: &str) -> Response<Vec<u8>> {
    let (ctype, body) = if path.starts_with("/ui/api/") {
        (
            "application/json",
            ApiError::new(
                401,
                "invalid_request_error",
                "unauthorized",
                "a valid bearer token (or the dashboard's cookie) is required",
            )
            .to_json(),
        )
    } else {
        (
            "text/html; charset=utf-8",
            b"<!doctype html><title>CacheRoute: unauthorized</title>\
              <p>This gateway's control plane has a token. Open <code>/ui?token=YOUR_TOKEN</code> \
              once; the page keeps it in a cookie for this browser.</p>"
                .to_vec(),
        )
    };
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header("www-authenticate", "Bearer")
        .header("content-type", ctype)
        .header("content-length", body.len())
        .body(body)
        .unwrap_or_default()
}

fn asset(ctype: &str, text: &'static str) -> Response<Vec<u8>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", ctype)
        .header("content-length", text.len())
        .header("cache-control", "no-cache")
        .header("x-content-type-options", "nosniff")
        .header("x-frame-options", "DENY")
        // Nothing but this origin: no inline script, no CDN.
        .header(
            "content-security-policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        )
        .body(text.as_bytes().to_vec())
        .unwrap_or_default()
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .unwrap_or_default()
}

fn error_json(e: ApiError) -> Response<Vec<u8>> {
    let body = e.to_json();
    Response::builder()
        .status(StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST))
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(body)
        .unwrap_or_default()
}

/// The query's pairs, percent-decoded.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://q/?{query}"))
        .map(|u| u.query_pairs().into_owned().take(32).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_decode_and_stay_bounded() {
        let q = query_pairs("token=a%2Bb&n=3");
        assert_eq!(q[0], ("token".into(), "a+b".into()));
        assert_eq!(q[1], ("n".into(), "3".into()));
        let many = (0..100)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(query_pairs(&many).len(), 32);
    }

    #[test]
    fn assets_fetch_nothing_from_elsewhere() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("app.css", APP_CSS),
        ] {
            assert!(!text.contains("https://"), "{name} names a remote URL");
            assert!(!text.contains("@import"), "{name} imports a stylesheet");
        }
        assert!(!INDEX_HTML.contains("http://"));
        assert!(INDEX_HTML.contains("/ui/app.js") && INDEX_HTML.contains("/ui/app.css"));
    }
}
