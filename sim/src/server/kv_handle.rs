//! The KV handle a gateway attaches (header or `kv_transfer_params`): reading it,
//! checking it against the request's store lookup, and the response headers that report
//! the check and the cached tokens per tier.

use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use serde_json::{json, Value};

use super::{
    CACHED_CPU_HEADER, CACHED_GPU_HEADER, CACHED_REMOTE_HEADER, KV_HANDLE_HEADER,
    KV_HANDLE_RESULT_HEADER,
};
use crate::api::{CompletionRequest, KvHandle, KvHandleCheck, KvHandleError};
use crate::engine::CachedSplit;
use crate::lmcache::Lookup;

/// A KV handle as received: where it came from, its raw form, and its parse.
pub(super) struct KvHandleIn {
    source: &'static str,
    raw: Value,
    parsed: Result<KvHandle, KvHandleError>,
}

/// The request's KV handle: the header, else `kv_transfer_params.cacheroute_kv_handle`.
pub(super) fn kv_handle_in(headers: &HeaderMap, req: &CompletionRequest) -> Option<KvHandleIn> {
    if let Some(v) = headers.get(KV_HANDLE_HEADER) {
        return Some(match v.to_str() {
            Ok(s) => KvHandleIn {
                source: "header",
                raw: Value::String(s.to_string()),
                parsed: KvHandle::parse_header(s),
            },
            Err(_) => KvHandleIn {
                source: "header",
                raw: Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                parsed: Err(KvHandleError::NotAscii),
            },
        });
    }
    let parsed = req.body_kv_handle()?;
    let raw = req
        .kv_transfer_params
        .as_ref()
        .and_then(|p| p.get("cacheroute_kv_handle"))
        .cloned()
        .unwrap_or(Value::Null);
    Some(KvHandleIn {
        source: "kv_transfer_params",
        raw,
        parsed,
    })
}

/// Check a handle against this request's store lookup (`store`: the lookup and the chunk
/// size; None without `--kv-store`). Returns the result and a report for
/// `/debug/last_request`.
pub(super) fn check_kv_handle(
    h: &KvHandleIn,
    store: Option<(&Lookup, usize)>,
) -> (KvHandleCheck, Value) {
    let mut report = json!({"source": h.source, "value": h.raw});
    let result = match &h.parsed {
        Err(e) => {
            report["error"] = json!(e.to_string());
            KvHandleCheck::Malformed
        }
        Ok(k) => {
            report["job"] = json!(k.job);
            report["chunks"] = json!(k.chunks);
            report["tokens"] = json!(k.tokens);
            match store {
                None => KvHandleCheck::NoStore,
                Some((lookup, chunk_size)) => {
                    report["chunk_size"] = json!(chunk_size);
                    report["prompt_chunks"] = json!(lookup.chunks.len());
                    report["present_chunks"] = json!(lookup.hit_chunks);
                    report["store_failed"] = json!(lookup.failed);
                    if k.chunks.checked_mul(chunk_size as u64) != Some(k.tokens) {
                        KvHandleCheck::Mismatch
                    } else if (lookup.hit_chunks as u64) < k.chunks {
                        // also when the prompt has fewer than `chunks` chunks at all
                        KvHandleCheck::Missing
                    } else {
                        KvHandleCheck::Ok
                    }
                }
            }
        }
    };
    report["result"] = json!(result.as_str());
    (result, report)
}

/// Tag a response with its cached tokens per tier.
pub(super) fn with_cached(mut r: Response, c: CachedSplit) -> Response {
    let h = r.headers_mut();
    for (name, v) in [
        (CACHED_GPU_HEADER, c.gpu),
        (CACHED_CPU_HEADER, c.cpu),
        (CACHED_REMOTE_HEADER, c.remote),
    ] {
        h.insert(name, HeaderValue::from(v));
    }
    r
}

/// Tag a response with its KV-handle result.
pub(super) fn with_kv_result(mut r: Response, check: Option<KvHandleCheck>) -> Response {
    if let Some(c) = check {
        r.headers_mut().insert(
            KV_HANDLE_RESULT_HEADER,
            HeaderValue::from_static(c.as_str()),
        );
    }
    r
}
