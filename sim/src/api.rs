//! The OpenAI request fields the sim reads, and vLLM-shaped responses and errors.

use crate::tokenizer::ChatMessage;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// Which completion endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Chat(Vec<ChatMessage>),
    Text(String),
    Ids(Vec<u32>),
}

/// What the sim needs from a completion request; unknown fields are ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats` (with `include_usage`): usage on
    /// every chunk, as vLLM sends it.
    pub continuous_usage: bool,
    /// Top log probabilities asked per token (chat: `logprobs: true` with
    /// `top_logprobs`; completions: `logprobs: N`); None: no log probabilities.
    pub logprobs: Option<u64>,
    /// Completions' `echo`: the prompt leads the returned text.
    pub echo: bool,
    /// vLLM's `prompt_logprobs`: top log probabilities asked per prompt token (the
    /// prompt token's own always listed); None: not asked, or asked as 0 in a stream
    /// (vLLM accepts that and returns nothing).
    pub prompt_logprobs: Option<u64>,
    pub max_tokens: Option<u64>,
    pub prompt: Prompt,
    /// vLLM's `add_special_tokens`: whether the tokenizer adds BOS to the (rendered)
    /// prompt; vLLM's default is yes for completions, no for chat (the template has it).
    pub add_special_tokens: bool,
    /// vLLM's `kv_transfer_params` (an object; its content is not interpreted, except
    /// LMCache's `"lmcache.skip_save": true`).
    pub kv_transfer_params: Option<serde_json::Map<String, Value>>,
}

impl CompletionRequest {
    /// How many top log probabilities per prompt token this request gets back:
    /// `prompt_logprobs` when given; else, for completions' `echo` with `logprobs`,
    /// `logprobs` (vLLM computes the prompt's to echo them); None: none.
    pub fn prompt_logprob_count(&self) -> Option<u64> {
        match (
            self.prompt_logprobs,
            self.endpoint,
            self.echo,
            self.logprobs,
        ) {
            (Some(n), _, _, _) => Some(n),
            (None, Endpoint::Completions, true, Some(n)) => Some(n),
            _ => None,
        }
    }

    /// LMCache's per-request `lmcache.skip_save` (via `kv_transfer_params`): do not store
    /// this request's KV.
    /// The KV handle in `kv_transfer_params.cacheroute_kv_handle`, parsed (None: absent).
    pub fn body_kv_handle(&self) -> Option<Result<KvHandle, KvHandleError>> {
        self.kv_transfer_params
            .as_ref()
            .and_then(|p| p.get(KV_TRANSFER_PARAMS_KEY))
            .filter(|v| !v.is_null())
            .map(kv_handle_from_json)
    }

    pub fn lmcache_skip_save(&self) -> bool {
        self.kv_transfer_params
            .as_ref()
            .and_then(|p| p.get("lmcache.skip_save"))
            .is_some_and(|v| v.as_bool() == Some(true))
    }
}

pub use cacheroute_wire::kv_handle::{KvHandle, KvHandleError, KV_TRANSFER_PARAMS_KEY};

/// Parse the `kv_transfer_params.cacheroute_kv_handle` form of a KV handle (its header
/// form is [`KvHandle::parse_header`]).
pub fn kv_handle_from_json(v: &Value) -> Result<KvHandle, KvHandleError> {
    serde_json::from_value::<KvHandle>(v.clone())
        .map_err(|e| KvHandleError::Json(e.to_string()))?
        .checked()
}

/// The outcome of checking a KV handle against the sim's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvHandleCheck {
    /// The first `chunks` chunks of the prompt are in the store, `tokens` agrees.
    Ok,
    /// Fewer than `chunks` leading chunks of the prompt are in the store.
    Missing,
    /// `tokens` is not `chunks` × chunk size.
    Mismatch,
    /// The handle could not be parsed.
    Malformed,
    /// The sim has no LMCache store (`--kv-store`) to check against.
    NoStore,
}

impl KvHandleCheck {
    pub const ALL: [KvHandleCheck; 5] = [
        KvHandleCheck::Ok,
        KvHandleCheck::Missing,
        KvHandleCheck::Mismatch,
        KvHandleCheck::Malformed,
        KvHandleCheck::NoStore,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KvHandleCheck::Ok => "ok",
            KvHandleCheck::Missing => "missing",
            KvHandleCheck::Mismatch => "mismatch",
            KvHandleCheck::Malformed => "malformed",
            KvHandleCheck::NoStore => "no_store",
        }
    }
}

/// An error answered the way vLLM does: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "BadRequestError",
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "NotFoundError",
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "InternalServerError",
            message: message.into(),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

fn opt_u64(body: &Value, field: &str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 1 => Ok(Some(n as u64)),
            Some(n) => Err(ApiError::bad_request(format!(
                "{field} must be at least 1, got {n}."
            ))),
            None => Err(ApiError::bad_request(format!(
                "{field}: Input should be a valid integer"
            ))),
        },
    }
}

/// A count of top log probabilities: 0 up to MAX_TOP_LOGPROBS (null: none).
fn opt_count(body: &Value, field: &str) -> Result<Option<u64>, ApiError> {
    let max = crate::logprobs::MAX_TOP_LOGPROBS;
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if (0..=max as i64).contains(&n) => Ok(Some(n as u64)),
            Some(n) => Err(ApiError::bad_request(format!(
                "{field}: must be between 0 and {max}, got {n}."
            ))),
            None => Err(ApiError::bad_request(format!(
                "{field}: Input should be a valid integer"
            ))),
        },
    }
}

/// `prompt_logprobs` as vLLM checks it: -1 (the whole vocabulary, more than this
/// server allows) or 0..=MAX_TOP_LOGPROBS; not with `stream` unless 0.
fn prompt_logprobs(body: &Value, stream: bool) -> Result<Option<u64>, ApiError> {
    let max = crate::logprobs::MAX_TOP_LOGPROBS;
    let n = match body.get("prompt_logprobs") {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v.as_i64().ok_or_else(|| {
            ApiError::bad_request("prompt_logprobs: Input should be a valid integer")
        })?,
    };
    if n < -1 {
        return Err(ApiError::bad_request(
            "`prompt_logprobs` must be a positive value or -1.",
        ));
    }
    if stream && n != 0 {
        return Err(ApiError::bad_request(
            "`prompt_logprobs` are not available when `stream=True`.",
        ));
    }
    if n == -1 || n > max as i64 {
        let asked = if n == -1 {
            "-1 (the whole vocabulary)".to_string()
        } else {
            n.to_string()
        };
        return Err(ApiError::bad_request(format!(
            "prompt_logprobs: must be between 0 and {max}, got {asked}."
        )));
    }
    Ok((!stream).then_some(n as u64))
}

fn opt_bool(body: &Value, field: &str) -> Result<bool, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad_request(format!(
            "{field}: Input should be a valid boolean"
        ))),
    }
}

fn content_text(v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str).unwrap_or("text") == "text")
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            Ok(texts.join("\n"))
        }
        Some(_) => Err(ApiError::bad_request(
            "messages: content must be a string or a list of content parts",
        )),
    }
}

/// `"model"`, if given: a string (or null).
pub fn optional_model(body: &Value) -> Result<Option<String>, ApiError> {
    match body.get("model") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request(
            "model: Input should be a valid string",
        )),
    }
}

/// Read a completion request body.
pub fn parse_request(endpoint: Endpoint, body: &Value) -> Result<CompletionRequest, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let model = optional_model(body)?;
    if let Some(n) = opt_u64(body, "n")? {
        if n != 1 {
            return Err(ApiError::bad_request(format!(
                "n={n} is not supported by the cacheroute sim; only n=1"
            )));
        }
    }
    let stream = opt_bool(body, "stream")?;
    let include_usage = stream
        && body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let continuous_usage = include_usage
        && body
            .get("stream_options")
            .and_then(|o| o.get("continuous_usage_stats"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let (logprobs, echo) = match endpoint {
        Endpoint::Chat => {
            let top = opt_count(body, "top_logprobs")?;
            match (opt_bool(body, "logprobs")?, top) {
                (true, top) => (Some(top.unwrap_or(0)), false),
                (false, Some(_)) => {
                    return Err(ApiError::bad_request(
                        "when using `top_logprobs`, `logprobs` must be set to true.",
                    ))
                }
                (false, None) => (None, false),
            }
        }
        Endpoint::Completions => (opt_count(body, "logprobs")?, opt_bool(body, "echo")?),
    };
    let prompt_logprobs = prompt_logprobs(body, stream)?;
    let prompt = match endpoint {
        Endpoint::Chat => {
            let msgs = match body.get("messages") {
                Some(Value::Array(a)) if !a.is_empty() => a,
                Some(Value::Array(_)) => {
                    return Err(ApiError::bad_request(
                        "messages: List should have at least 1 item",
                    ))
                }
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "messages: Input should be a valid list",
                    ))
                }
                None => return Err(ApiError::bad_request("messages: Field required")),
            };
            let mut out = Vec::with_capacity(msgs.len());
            for m in msgs {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::bad_request("messages: each message needs a role"))?;
                out.push(ChatMessage {
                    role: role.to_string(),
                    content: content_text(m.get("content"))?,
                });
            }
            Prompt::Chat(out)
        }
        Endpoint::Completions => parse_prompt(body.get("prompt"))?,
    };
    let add_special_tokens = match body.get("add_special_tokens") {
        None | Some(Value::Null) => endpoint == Endpoint::Completions,
        Some(_) => opt_bool(body, "add_special_tokens")?,
    };
    let max_tokens = match endpoint {
        Endpoint::Chat => match opt_u64(body, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => opt_u64(body, "max_tokens")?,
        },
        Endpoint::Completions => opt_u64(body, "max_tokens")?,
    };
    let kv_transfer_params = match body.get("kv_transfer_params") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => {
            return Err(ApiError::bad_request(
                "kv_transfer_params: Input should be a valid dictionary",
            ))
        }
    };
    Ok(CompletionRequest {
        endpoint,
        model,
        stream,
        include_usage,
        continuous_usage,
        logprobs,
        echo,
        prompt_logprobs,
        max_tokens,
        prompt,
        add_special_tokens,
        kv_transfer_params,
    })
}

fn parse_prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    match v {
        None | Some(Value::Null) => Err(ApiError::bad_request("prompt: Field required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.is_empty() => {
            Err(ApiError::bad_request("prompt: Prompt cannot be empty"))
        }
        Some(Value::Array(a)) => {
            if a.iter().all(Value::is_number) {
                return ids(a)
                    .map(Prompt::Ids)
                    .ok_or_else(|| ApiError::bad_request("prompt: token ids must be integers"));
            }
            if a.len() > 1 {
                return Err(ApiError::bad_request(
                    "prompt: batched prompts are not supported by the cacheroute sim",
                ));
            }
            match &a[0] {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                Value::Array(inner) if !inner.is_empty() => ids(inner)
                    .map(Prompt::Ids)
                    .ok_or_else(|| ApiError::bad_request("prompt: token ids must be integers")),
                _ => Err(ApiError::bad_request(
                    "prompt: Input should be a string or token ids",
                )),
            }
        }
        Some(_) => Err(ApiError::bad_request(
            "prompt: Input should be a string or token ids",
        )),
    }
}

/// `usage` object.
pub fn usage(prompt_tokens: u64, completion_tokens: u64, cached_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

/// Identity of one response: id, created, model.
#[derive(Debug, Clone)]
pub struct RespMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// A whole (non-streamed) response.
pub fn full_response(
    endpoint: Endpoint,
    meta: &RespMeta,
    text: &str,
    finish_reason: &str,
    usage: Value,
    logprobs: Value,
    prompt_logprobs: Value,
) -> Value {
    match endpoint {
        Endpoint::Chat => json!({
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": null,
            }],
            "usage": usage,
            "prompt_logprobs": prompt_logprobs,
        }),
        Endpoint::Completions => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": null,
                "prompt_logprobs": prompt_logprobs,
            }],
            "usage": usage,
        }),
    }
}

fn sse(v: &Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("data: {v}\n\n"))
}

/// SSE frame of one generated token; the first chat token also carries the role.
/// `extra`: the token's log probabilities (or null) and, with continuous usage
/// stats, the usage so far.
pub fn token_chunk(
    endpoint: Endpoint,
    meta: &RespMeta,
    text: &str,
    first: bool,
    extra: ChunkExtra,
) -> bytes::Bytes {
    let ChunkExtra { logprobs, usage } = extra;
    let mut v = match endpoint {
        Endpoint::Chat => {
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else {
                json!({"content": text})
            };
            json!({
                "id": meta.id,
                "object": "chat.completion.chunk",
                "created": meta.created,
                "model": meta.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": null}],
            })
        }
        Endpoint::Completions => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": null, "stop_reason": null}],
        }),
    };
    if let Some(u) = usage {
        v["usage"] = u;
    }
    sse(&v)
}

/// What a token chunk carries beyond its text.
#[derive(Debug, Clone, Default)]
pub struct ChunkExtra {
    pub logprobs: Value,
    pub usage: Option<Value>,
}

/// SSE frame closing the choice with its finish reason.
pub fn finish_chunk(
    endpoint: Endpoint,
    meta: &RespMeta,
    finish_reason: &str,
    usage: Option<Value>,
) -> bytes::Bytes {
    let mut v = match endpoint {
        Endpoint::Chat => json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason, "stop_reason": null}],
        }),
        Endpoint::Completions => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason, "stop_reason": null}],
        }),
    };
    if let Some(u) = usage {
        v["usage"] = u;
    }
    sse(&v)
}

/// SSE frame with the usage (`stream_options.include_usage`).
pub fn usage_chunk(endpoint: Endpoint, meta: &RespMeta, usage: Value) -> bytes::Bytes {
    let object = match endpoint {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    sse(&json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage,
    }))
}

/// The final SSE frame.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chat_and_completions() {
        let b = json!({"model":"m","messages":[{"role":"user","content":"hi"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url"},{"type":"text","text":"b"}]}],
            "max_completion_tokens": 5, "max_tokens": 9, "stream": true,
            "stream_options": {"include_usage": true}, "whatever": {"x": 1}});
        let r = parse_request(Endpoint::Chat, &b).unwrap();
        assert_eq!(r.max_tokens, Some(5));
        assert!(r.stream && r.include_usage);
        assert!(!r.add_special_tokens, "chat: the template writes BOS");
        let Prompt::Chat(m) = r.prompt else { panic!() };
        assert_eq!(m[1].content, "a\nb");
        let r = parse_request(Endpoint::Completions, &json!({"prompt": ["x"]})).unwrap();
        assert_eq!(r.prompt, Prompt::Text("x".into()));
        assert!(r.add_special_tokens, "completions: BOS by default");
        let no = json!({"prompt": "x", "add_special_tokens": false});
        assert!(
            !parse_request(Endpoint::Completions, &no)
                .unwrap()
                .add_special_tokens
        );
        let bad = json!({"prompt": "x", "add_special_tokens": "no"});
        assert!(parse_request(Endpoint::Completions, &bad).is_err());
        assert_eq!(r.max_tokens, None);
        let r = parse_request(Endpoint::Completions, &json!({"prompt": [1, 2, 3]})).unwrap();
        assert_eq!(r.prompt, Prompt::Ids(vec![1, 2, 3]));
        let r = parse_request(Endpoint::Completions, &json!({"prompt": [[7]]})).unwrap();
        assert_eq!(r.prompt, Prompt::Ids(vec![7]));
        assert_eq!(r.kv_transfer_params, None);
        assert!(!r.lmcache_skip_save());
        let r = parse_request(
            Endpoint::Completions,
            &json!({"prompt": "x", "kv_transfer_params": {"whatever": [1], "lmcache.skip_save": true}}),
        )
        .unwrap();
        assert_eq!(
            r.kv_transfer_params.as_ref().unwrap()["whatever"],
            json!([1])
        );
        assert!(r.lmcache_skip_save());
        let r = parse_request(
            Endpoint::Completions,
            &json!({"prompt": "x", "kv_transfer_params": null}),
        )
        .unwrap();
        assert_eq!(r.kv_transfer_params, None);
    }

    #[test]
    fn prompt_logprobs_as_vllm_checks_them() {
        let parse = |b: Value| parse_request(Endpoint::Completions, &b);
        let r = parse(json!({"prompt": "x", "prompt_logprobs": 2})).unwrap();
        assert_eq!(r.prompt_logprob_count(), Some(2));
        let r = parse(json!({"prompt": "x", "echo": true, "logprobs": 3})).unwrap();
        assert_eq!(r.prompt_logprobs, None);
        assert_eq!(r.prompt_logprob_count(), Some(3), "echo with logprobs");
        let r = parse(json!({"prompt": "x", "echo": true, "logprobs": 3, "prompt_logprobs": 1}))
            .unwrap();
        assert_eq!(r.prompt_logprob_count(), Some(1), "an explicit one wins");
        assert_eq!(
            parse(json!({"prompt": "x", "echo": true}))
                .unwrap()
                .prompt_logprob_count(),
            None
        );
        let r = parse(json!({"prompt": "x", "prompt_logprobs": 0, "stream": true})).unwrap();
        assert_eq!(
            r.prompt_logprob_count(),
            None,
            "0 in a stream: accepted, nothing back"
        );
        let chat = parse_request(
            Endpoint::Chat,
            &json!({"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 0}),
        )
        .unwrap();
        assert_eq!(chat.prompt_logprob_count(), Some(0));
        for (b, message) in [
            (
                json!({"prompt": "x", "prompt_logprobs": 1, "stream": true}),
                "`prompt_logprobs` are not available when `stream=True`.",
            ),
            (
                json!({"prompt": "x", "prompt_logprobs": -1, "stream": true}),
                "`prompt_logprobs` are not available when `stream=True`.",
            ),
            (
                json!({"prompt": "x", "prompt_logprobs": -2}),
                "`prompt_logprobs` must be a positive value or -1.",
            ),
            (
                json!({"prompt": "x", "prompt_logprobs": -1}),
                "prompt_logprobs: must be between 0 and 20, got -1 (the whole vocabulary).",
            ),
            (
                json!({"prompt": "x", "prompt_logprobs": 21}),
                "prompt_logprobs: must be between 0 and 20, got 21.",
            ),
            (
                json!({"prompt": "x", "prompt_logprobs": "2"}),
                "prompt_logprobs: Input should be a valid integer",
            ),
        ] {
            assert_eq!(parse(b.clone()).unwrap_err().message, message, "{b}");
        }
    }

    #[test]
    fn kv_handles_parse() {
        let h = KvHandle {
            job: "j-1".into(),
            chunks: 3,
            tokens: 768,
        };
        let j = kv_handle_from_json(&json!({"job": "j-1", "chunks": 3, "tokens": 768})).unwrap();
        assert_eq!(j, h);
        for bad in [
            json!("job=j-1;chunks=3;tokens=768"),
            json!({"job": "j", "chunks": 3}),
            json!({"job": 5, "chunks": 3, "tokens": 768}),
            json!({"job": "j", "chunks": -3, "tokens": 768}),
            json!({"job": "j", "chunks": 3.0, "tokens": 768}),
        ] {
            assert!(kv_handle_from_json(&bad).is_err(), "{bad}");
        }
        let r = parse_request(
            Endpoint::Completions,
            &json!({"prompt": "x", "kv_transfer_params": {"cacheroute_kv_handle":
                {"job": "resident", "chunks": 0, "tokens": 0}}}),
        )
        .unwrap();
        assert_eq!(r.body_kv_handle().unwrap().unwrap().job, "resident");
        let r = parse_request(
            Endpoint::Completions,
            &json!({"prompt": "x", "kv_transfer_params": {"other": 1}}),
        )
        .unwrap();
        assert!(r.body_kv_handle().is_none());
        assert_eq!(
            KvHandleCheck::ALL.map(KvHandleCheck::as_str),
            ["ok", "missing", "mismatch", "malformed", "no_store"]
        );
    }

    #[test]
    fn refuses_bad_requests() {
        for (ep, b) in [
            (Endpoint::Chat, json!({"model": "m"})),
            (Endpoint::Chat, json!({"messages": []})),
            (Endpoint::Chat, json!({"messages": [{"content": "x"}]})),
            (Endpoint::Completions, json!({"model": "m"})),
            (Endpoint::Completions, json!({"prompt": ["a", "b"]})),
            (Endpoint::Completions, json!({"prompt": "a", "n": 2})),
            (
                Endpoint::Completions,
                json!({"prompt": "a", "max_tokens": 0}),
            ),
            (
                Endpoint::Completions,
                json!({"prompt": "a", "max_tokens": "x"}),
            ),
            (Endpoint::Completions, json!([1])),
            (
                Endpoint::Completions,
                json!({"prompt": "a", "kv_transfer_params": "handle"}),
            ),
        ] {
            let e = parse_request(ep, &b).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{b}");
            assert_eq!(e.body()["error"]["code"], 400);
        }
    }
}
