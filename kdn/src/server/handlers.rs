//! The KDN API's endpoint handlers: query and body parsing, registration, listing,
//! snapshots with ETags, contents, search, delete, warm, inject and jobs, load, models,
//! health and metrics, and [`KdnError`]'s HTTP answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::registry::Detail;
use crate::service::{InjectRequest, Kdn, KdnError, RegisterRequest};

impl IntoResponse for KdnError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

type Q = Query<HashMap<String, String>>;

fn flag(q: &HashMap<String, String>, name: &str, default: bool) -> bool {
    match q.get(name).map(|s| s.to_ascii_lowercase()) {
        Some(v) if v.is_empty() || v == "1" || v == "true" || v == "yes" => true,
        Some(v) if v == "0" || v == "false" || v == "no" => false,
        _ => default,
    }
}

fn number(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, KdnError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            KdnError::bad_request(
                "invalid_parameter",
                format!("{name}={v:?}: expected a non-negative integer"),
            )
        }),
    }
}

fn body_error(e: BytesRejection) -> KdnError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        KdnError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("request body too large: {}", e.body_text()),
        )
    } else {
        KdnError::bad_request("invalid_body", e.body_text())
    }
}

fn parse_json(body: &[u8]) -> Result<Value, KdnError> {
    serde_json::from_slice(body)
        .map_err(|e| KdnError::bad_request("invalid_json", format!("invalid JSON: {e}")))
}

pub(super) async fn register(
    State(kdn): State<Arc<Kdn>>,
    q: Q,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, KdnError> {
    let body = body.map_err(body_error)?;
    let v = parse_json(&body)?;
    if !v.is_object() {
        return Err(KdnError::bad_request(
            "invalid_registration",
            "the body must be a JSON object with at least \"text\" (use /v1/knowledge/bulk \
             for many blocks)",
        ));
    }
    let req: RegisterRequest = serde_json::from_value(v)
        .map_err(|e| KdnError::bad_request("invalid_registration", e.to_string()))?;
    let wait = req.wait || flag(&q, "wait", false);
    kdn.admit_registrations(1)?;
    let (records, created) = kdn.register(vec![req], wait).await?;
    let detail = Detail {
        content: true,
        ..Detail::default()
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(records[0].to_json(detail))).into_response())
}

pub(super) async fn register_bulk(
    State(kdn): State<Arc<Kdn>>,
    q: Q,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, KdnError> {
    let body = body.map_err(body_error)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| KdnError::bad_request("invalid_body", "the body is not UTF-8"))?;
    kdn.admit_registrations(text.lines().filter(|l| !l.trim().is_empty()).count())?;
    let records = kdn.register_jsonl(text, flag(&q, "wait", false)).await?;
    let detail = Detail {
        omit_text: true,
        ..Detail::default()
    };
    let data: Vec<Value> = records.iter().map(|r| r.to_json(detail)).collect();
    Ok((
        StatusCode::OK,
        Json(json!({"object": "list", "data": data})),
    )
        .into_response())
}

pub(super) async fn list(State(kdn): State<Arc<Kdn>>, q: Q) -> Json<Value> {
    let detail = Detail {
        content: flag(&q, "content", false),
        keys: flag(&q, "keys", false),
        omit_text: !flag(&q, "text", true),
    };
    let model = q.get("model");
    let data: Vec<Value> = kdn
        .registry
        .list()
        .iter()
        .filter(|r| model.is_none_or(|m| r.models.contains_key(m)))
        .map(|r| r.to_json(detail))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Whether an `If-None-Match` value names `etag` (a list, weak tags and `*` included).
fn etag_matches(if_none_match: &HeaderValue, etag: &str) -> bool {
    let Ok(v) = if_none_match.to_str() else {
        return false;
    };
    v.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// `GET /v1/knowledge/snapshot`: what a gateway syncs from. The version is checked
/// before anything is copied, so polling an unchanged registry costs next to nothing.
/// With `?text=false` (what gateways ask for) each block comes without its text and
/// contents but with its content `digest`: a gateway fetches the text of the blocks
/// whose digest it has not seen from `/v1/knowledge/contents`, so an unchanged block's
/// text is never sent twice.
pub(super) async fn snapshot(State(kdn): State<Arc<Kdn>>, headers: HeaderMap, q: Q) -> Response {
    let etag = format!("\"{}\"", kdn.registry.version());
    if let Some(inm) = headers.get(header::IF_NONE_MATCH) {
        if etag_matches(inm, &etag) {
            return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
        }
    }
    // records and version read together: the tag always describes this body
    let (version, records) = kdn.registry.snapshot();
    let with_text = flag(&q, "text", true);
    let detail = Detail {
        content: with_text,
        keys: false,
        omit_text: !with_text,
    };
    let blocks: Vec<Value> = records
        .iter()
        .map(|r| with_digest(&kdn, r, detail))
        .collect();
    (
        StatusCode::OK,
        [(header::ETAG, format!("\"{version}\""))],
        Json(json!({
            "object": "knowledge.snapshot",
            "kdn_id": kdn.id,
            "version": version,
            "text": with_text,
            "blocks": blocks,
        })),
    )
        .into_response()
}

/// A record's view with its content digest.
fn with_digest(kdn: &Kdn, r: &crate::registry::KnowledgeRecord, detail: Detail) -> Value {
    let mut v = r.to_json(detail);
    v["digest"] = json!(kdn
        .registry
        .digest(&r.id)
        .unwrap_or_else(|| r.content_digest()));
    v
}

/// Most ids one `GET /v1/knowledge/contents` names.
pub const MAX_CONTENT_IDS: usize = 256;

/// `GET /v1/knowledge/contents?ids=a,b,…`: the named blocks whole (text, each model's
/// content, digest), for gateways filling in a text-less snapshot. Unknown ids are left
/// out (deleted since the snapshot).
pub(super) async fn contents(State(kdn): State<Arc<Kdn>>, q: Q) -> Result<Json<Value>, KdnError> {
    let ids: Vec<&str> = q
        .get("ids")
        .map(|s| s.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    if ids.is_empty() {
        return Err(KdnError::bad_request(
            "missing_ids",
            "give the block ids as ?ids=a,b,…",
        ));
    }
    if ids.len() > MAX_CONTENT_IDS {
        return Err(KdnError::bad_request(
            "too_many_ids",
            format!("{} ids; at most {MAX_CONTENT_IDS} per request", ids.len()),
        ));
    }
    let detail = Detail {
        content: true,
        keys: false,
        omit_text: false,
    };
    let data: Vec<Value> = ids
        .iter()
        .filter_map(|id| kdn.registry.get(id))
        .map(|r| with_digest(&kdn, &r, detail))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

pub(super) async fn search(State(kdn): State<Arc<Kdn>>, q: Q) -> Result<Json<Value>, KdnError> {
    let query = q
        .get("q")
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| KdnError::bad_request("missing_query", "give the search text as ?q=…"))?;
    let k = number(&q, "k")?.unwrap_or(5).clamp(1, 100) as usize;
    let detail = Detail {
        content: flag(&q, "content", false),
        keys: false,
        omit_text: !flag(&q, "text", false),
    };
    let data: Vec<Value> = kdn
        .registry
        .search(query, k)
        .into_iter()
        .map(|(r, score)| {
            let mut v = r.to_json(detail);
            v["score"] = json!(score);
            v["snippet"] = json!(r.text.chars().take(200).collect::<String>());
            v
        })
        .collect();
    Ok(Json(
        json!({"object": "list", "query": query, "data": data}),
    ))
}

pub(super) async fn show(
    State(kdn): State<Arc<Kdn>>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Json<Value>, KdnError> {
    let r = kdn.registry.get(&id).ok_or_else(|| {
        KdnError::not_found("knowledge_not_found", format!("knowledge {id:?} not found"))
    })?;
    Ok(Json(r.to_json(Detail {
        content: flag(&q, "content", true),
        keys: flag(&q, "keys", false),
        omit_text: !flag(&q, "text", true),
    })))
}

pub(super) async fn delete(
    State(kdn): State<Arc<Kdn>>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Json<Value>, KdnError> {
    Ok(Json(kdn.delete(&id, flag(&q, "keep_kv", false)).await?))
}

pub(super) async fn warm(
    State(kdn): State<Arc<Kdn>>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Json<Value>, KdnError> {
    let r = kdn.rewarm(&id, flag(&q, "wait", false)).await?;
    Ok(Json(r.to_json(Detail {
        omit_text: true,
        ..Detail::default()
    })))
}

pub(super) async fn inject(
    State(kdn): State<Arc<Kdn>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, KdnError> {
    let body = body.map_err(body_error)?;
    let req: InjectRequest = serde_json::from_value(parse_json(&body)?)
        .map_err(|e| KdnError::bad_request("invalid_inject_request", e.to_string()))?;
    let job = kdn.inject(&req)?;
    if req.wait {
        let limit = Duration::from_millis(req.timeout_ms.unwrap_or(600_000));
        job.wait(limit).await;
    }
    let status = if job.status().is_finished() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(job.view())).into_response())
}

pub(super) async fn job(
    State(kdn): State<Arc<Kdn>>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Json<Value>, KdnError> {
    let job = kdn.injector.job(&id).ok_or_else(|| {
        KdnError::not_found(
            "job_not_found",
            format!("injection job {id:?} not found (unknown, or dropped from the history)"),
        )
    })?;
    if let Some(ms) = number(&q, "wait_ms")? {
        job.wait(Duration::from_millis(ms.min(600_000))).await;
    }
    Ok(Json(job.view()))
}

pub(super) async fn load(State(kdn): State<Arc<Kdn>>) -> Json<Value> {
    Json(kdn.load())
}

pub(super) async fn models(State(kdn): State<Arc<Kdn>>) -> Json<Value> {
    Json(kdn.models_json())
}

pub(super) async fn health(State(kdn): State<Arc<Kdn>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "knowledge_blocks": kdn.registry.len(),
        "registry": kdn.registry.describe(),
    }))
}

pub(super) async fn metrics(State(kdn): State<Arc<Kdn>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        kdn.render_metrics(),
    )
        .into_response()
}

pub(super) async fn not_found() -> KdnError {
    KdnError::not_found(
        "no_route",
        "no such KDN endpoint; see GET /v1/knowledge, /v1/load",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_forms() {
        let tag = "\"abcd1234-7\"";
        for (v, m) in [
            ("\"abcd1234-7\"", true),
            ("W/\"abcd1234-7\"", true),
            ("\"x-1\", \"abcd1234-7\"", true),
            ("*", true),
            ("\"abcd1234-6\"", false),
            ("abcd1234-7", false),
        ] {
            assert_eq!(etag_matches(&HeaderValue::from_static(v), tag), m, "{v}");
        }
    }
}
