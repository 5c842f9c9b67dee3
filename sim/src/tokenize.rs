//! vLLM's `/tokenize` and `/detokenize`, with its request and response shapes:
//! `{"prompt"}` or `{"messages"}` in, `{"count", "max_model_len", "tokens",
//! "token_strs"}` out; `{"tokens"}` in, `{"prompt"}` out.

use crate::api::{self, ApiError, Endpoint, Prompt};
use crate::server::AppState;
use crate::tokenizer::{render_llama3_chat, Tokenizer};
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// What the Llama-3 template appends for the assistant's turn.
const GENERATION_PROMPT: &str = "<|start_header_id|>assistant<|end_header_id|>\n\n";

/// Most token ids one `/detokenize` takes (a bound on what a client can grow).
const MAX_DETOKENIZE_IDS: usize = 1 << 20;

/// Token ids back to text (special tokens kept, as vLLM's detokenize does).
pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String, ApiError> {
    match tok {
        Tokenizer::Hf(t) => t
            .decode(ids, false)
            .map_err(|e| ApiError::bad_request(format!("tokens: cannot decode: {e}"))),
        Tokenizer::Approx { .. } => Err(ApiError::bad_request(
            "this sim runs the approximate tokenizer, which cannot turn ids back into text; \
             start it with the exact one (--tokenizer auto for Llama-3 models, or a \
             tokenizer.json)",
        )),
    }
}

fn body_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))
}

fn check_model(st: &AppState, body: &Value) -> Result<(), ApiError> {
    match api::optional_model(body)? {
        Some(m) if m != st.model => Err(ApiError::not_found(format!(
            "The model `{m}` does not exist."
        ))),
        _ => Ok(()),
    }
}

fn flag(body: &Value, field: &str, default: bool) -> Result<bool, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad_request(format!(
            "{field}: Input should be a valid boolean"
        ))),
    }
}

fn tokenize_ids(st: &AppState, body: &Value) -> Result<Vec<u32>, ApiError> {
    if body.get("messages").is_some() {
        let req = api::parse_request(Endpoint::Chat, body)?;
        let Prompt::Chat(msgs) = req.prompt else {
            return Err(ApiError::internal("chat request without messages"));
        };
        let mut text = render_llama3_chat(&msgs);
        if !flag(body, "add_generation_prompt", true)? {
            if let Some(stripped) = text.strip_suffix(GENERATION_PROMPT) {
                text.truncate(stripped.len());
            }
        }
        Ok(st.tokenizer.encode_with(&text, req.add_special_tokens))
    } else {
        match body.get("prompt") {
            Some(Value::String(p)) => {
                let add = flag(body, "add_special_tokens", true)?;
                Ok(st.tokenizer.encode_with(p, add))
            }
            Some(_) => Err(ApiError::bad_request(
                "prompt: Input should be a valid string",
            )),
            None => Err(ApiError::bad_request(
                "give `prompt` (a string) or `messages` (a chat)",
            )),
        }
    }
}

/// `POST /tokenize`.
pub async fn tokenize(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let run = || -> Result<Value, ApiError> {
        let body = body_json(&body)?;
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        check_model(&st, &body)?;
        let ids = tokenize_ids(&st, &body)?;
        let strs = if flag(&body, "return_token_strs", false)? {
            let strs: Vec<String> = match &*st.tokenizer {
                Tokenizer::Hf(t) => ids
                    .iter()
                    .map(|&id| t.id_to_token(id).unwrap_or_default())
                    .collect(),
                Tokenizer::Approx { .. } => ids.iter().map(|id| format!("<{id}>")).collect(),
            };
            json!(strs)
        } else {
            Value::Null
        };
        Ok(json!({
            "count": ids.len(),
            "max_model_len": st.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }))
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /detokenize`.
pub async fn detokenize(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let run = || -> Result<Value, ApiError> {
        let body = body_json(&body)?;
        check_model(&st, &body)?;
        let ids: Vec<u32> = match body.get("tokens") {
            Some(Value::Array(a)) if a.len() > MAX_DETOKENIZE_IDS => {
                return Err(ApiError::bad_request(format!(
                    "tokens: at most {MAX_DETOKENIZE_IDS} ids"
                )))
            }
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    ApiError::bad_request("tokens: each token must be a non-negative integer id")
                })?,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "tokens: Input should be a valid list",
                ))
            }
            None => return Err(ApiError::bad_request("tokens: Field required")),
        };
        Ok(json!({ "prompt": decode(&st.tokenizer, &ids)? }))
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
