//! `/v1/embeddings`: validated like vLLM, token-counted, answered at once with
//! deterministic vectors (no engine time).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::{unix_now, AppState};
use crate::api::ApiError;
use crate::embeddings::{self, EmbeddingResponse};
use crate::filler;

/// `/v1/embeddings`: answered at once (no engine time), see [`embeddings`].
pub(super) async fn embeddings_route(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    embed(st, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn embed(st: Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))?;
    let req = embeddings::parse_request(&value)?;
    if let Some(m) = &req.model {
        if *m != st.model {
            return Err(ApiError::not_found(format!(
                "The model `{m}` does not exist."
            )));
        }
    }
    let tok = st.tokenizer.clone();
    let inputs = req.inputs.clone();
    let count = move || -> Vec<u64> { inputs.iter().map(|t| tok.encode(t).len() as u64).collect() };
    // small inputs inline (cheap); large ones off the async threads
    let counts = if req.inputs.iter().map(String::len).sum::<usize>() < 16 << 10 {
        count()
    } else {
        tokio::task::spawn_blocking(count)
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
    };
    if let Some(n) = counts.iter().find(|n| **n > st.max_model_len) {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {} tokens. However, you requested {n} \
             tokens in the input for embedding generation. Please reduce the length of the \
             input.",
            st.max_model_len
        )));
    }
    let n = st.counter.fetch_add(1, Ordering::Relaxed);
    let id = format!(
        "embd-{:016x}",
        filler::splitmix64(st.seed ^ n.rotate_left(32))
    );
    let resp =
        EmbeddingResponse::build(&req, id, unix_now(), st.model.clone(), counts.iter().sum());
    let bytes = serde_json::to_vec(&resp)
        .map_err(|e| ApiError::internal(format!("encoding the response: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response())
}
