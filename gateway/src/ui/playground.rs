//! The playground's relay: `POST /ui/api/send` takes `{"path", "headers", "body"}`
//! from the page and sends it through this gateway's own service plane, streaming
//! the answer back chunk by chunk. The page lives on the control plane's origin,
//! so it cannot call the service plane itself without CORS there; relaying keeps
//! the service plane unchanged and the request a real client request.

use crate::state::GatewayState;
use bytes::Bytes;
use cacheroute_decisions::openai::ApiError;
use futures::StreamExt;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// The service-plane paths the playground may call.
const PATHS: &[&str] = &["/v1/chat/completions", "/v1/completions"];
/// Headers a playground request may carry.
const MAX_HEADERS: usize = 32;
/// Headers the relay sets itself or that describe one hop only.
const DROPPED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "cookie",
    "accept-encoding",
];
/// Longest a relayed request may take.
const TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    #[serde(default = "default_path")]
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: serde_json::Value,
}

fn default_path() -> String {
    PATHS[0].to_string()
}

fn bad(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::new(400, "invalid_request_error", code, msg)
}

/// A checked playground request, ready to send.
#[derive(Debug)]
struct Checked {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Check and build the upstream request.
fn parse(body: &[u8]) -> Result<Checked, ApiError> {
    let req: SendRequest = serde_json::from_slice(body).map_err(|e| {
        bad(
            "invalid_playground_request",
            format!("expected {{\"path\", \"headers\", \"body\"}}: {e}"),
        )
    })?;
    if !PATHS.contains(&req.path.as_str()) {
        return Err(bad(
            "invalid_path",
            format!(
                "the playground sends to {} only, not {:?}",
                PATHS.join(" or "),
                req.path
            ),
        ));
    }
    if req.headers.len() > MAX_HEADERS {
        return Err(bad(
            "too_many_headers",
            format!("at most {MAX_HEADERS} headers"),
        ));
    }
    let mut headers = Vec::new();
    for (k, v) in req.headers {
        let name = k.trim().to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || http::HeaderValue::from_str(&v).is_err()
        {
            return Err(bad("invalid_header", format!("not a valid header: {k:?}")));
        }
        if !DROPPED.contains(&name.as_str()) && name != "content-type" {
            headers.push((name, v));
        }
    }
    if !req.body.is_object() {
        return Err(bad("invalid_body", "the body must be a JSON object"));
    }
    let bytes = serde_json::to_vec(&req.body).unwrap_or_default();
    Ok(Checked {
        path: req.path,
        headers,
        body: bytes,
    })
}

/// Relay one request; `Ok(reusable)` once the answer (whatever its status) was
/// streamed, `Err` for a request that was never sent.
pub async fn send(
    state: &GatewayState,
    http: &mut ServerSession,
    body: &[u8],
) -> Result<bool, ApiError> {
    let Checked {
        path,
        headers,
        body: bytes,
    } = parse(body)?;
    let url = format!("{}{path}", super::feed::service_url(state));
    let mut req = state
        .http
        .post(&url)
        .timeout(TIMEOUT)
        .header("content-type", "application/json")
        .body(bytes);
    for (k, v) in &headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.map_err(|e| {
        ApiError::new(
            502,
            "server_error",
            "service_plane_unreachable",
            format!("{url}: {e}"),
        )
    })?;
    let mut head = ResponseHeader::build(resp.status().as_u16(), None)
        .map_err(|e| ApiError::new(500, "server_error", "internal", e.to_string()))?;
    for (k, v) in resp.headers() {
        let n = k.as_str();
        if n == "content-type" || n == "retry-after" || n.starts_with("x-cacheroute-") {
            let _ = head.append_header(n.to_string(), v.clone());
        }
    }
    let _ = head.insert_header("transfer-encoding", "chunked");
    let _ = head.insert_header("cache-control", "no-store");
    if http.write_response_header(Box::new(head)).await.is_err() {
        return Ok(false);
    }
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) if c.is_empty() => {}
            Ok(c) => {
                // The browser went away: dropping the stream closes the upstream
                // connection, and the gateway aborts the request.
                if http.write_response_body(c, false).await.is_err() {
                    return Ok(false);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "playground: the service plane's answer broke off");
                return Ok(false);
            }
        }
    }
    Ok(http.write_response_body(Bytes::new(), true).await.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_checked_before_it_is_sent() {
        let Checked {
            path: p,
            headers: h,
            body: b,
        } = parse(
            br#"{"path":"/v1/completions","headers":{"X-Cacheroute-Foo":"1","Host":"evil","Content-Type":"text/plain"},"body":{"model":"m","prompt":"hi"}}"#,
        )
        .unwrap();
        assert_eq!(p, "/v1/completions");
        assert_eq!(h, vec![("x-cacheroute-foo".to_string(), "1".to_string())]);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&b).unwrap()["prompt"],
            "hi"
        );

        let err = |b: &[u8]| parse(b).unwrap_err().code;
        assert_eq!(
            err(br#"{"path":"/admin/reload","body":{}}"#),
            "invalid_path"
        );
        assert_eq!(err(br#"{"body":[1]}"#), "invalid_body");
        assert_eq!(err(b"not json"), "invalid_playground_request");
        assert_eq!(
            err(br#"{"headers":{"bad name":"x"},"body":{}}"#),
            "invalid_header"
        );
        let many: BTreeMap<String, String> = (0..40)
            .map(|i| (format!("x-h{i}"), "v".to_string()))
            .collect();
        let big = serde_json::json!({"headers": many, "body": {}}).to_string();
        assert_eq!(err(big.as_bytes()), "too_many_headers");
    }
}
