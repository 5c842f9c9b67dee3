//! The OpenAI request bodies the gateway understands, and OpenAI-shaped errors.
//!
//! Bodies are parsed into typed structs so that bad input is refused with a
//! precise message, while every field the gateway does not know is kept in
//! `extra` (in its original order) and serialised back unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// The two completion routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Chat,
    Completions,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
        }
    }

    pub fn from_path(path: &str) -> Option<Route> {
        match path {
            "/v1/chat/completions" => Some(Route::Chat),
            "/v1/completions" => Some(Route::Completions),
            _ => None,
        }
    }

    /// Short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Route::Chat => "chat",
            Route::Completions => "completions",
        }
    }
}

/// `stream_options` of a streaming request.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Sampling and output fields shared by both routes; typed so that wrong
/// types are refused up front instead of deep inside the engine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommonParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
}

/// Content of a chat message: a string, or a list of content parts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    /// The message's text: the string content, or its text parts joined.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(MessageContent::Text(s)) => s.clone(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(flatten)]
    pub params: CommonParams,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `prompt` of `/v1/completions`: text, texts, token ids, or batches of ids.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub params: CommonParams,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A parsed completion request of either route.
#[derive(Debug, Clone, PartialEq)]
pub enum CompletionBody {
    Chat(ChatCompletionRequest),
    Completions(CompletionRequest),
}

impl CompletionBody {
    /// Parse and validate a request body for `route`.
    pub fn parse(route: Route, body: &[u8]) -> Result<CompletionBody, ApiError> {
        // The happy path is one typed pass; only a failure pays for a second
        // look that tells "not JSON", "missing field" and "wrong type" apart.
        let parsed = de::with_limits(body.len(), || match route {
            Route::Chat => serde_json::from_slice(body).map(CompletionBody::Chat),
            Route::Completions => serde_json::from_slice(body).map(CompletionBody::Completions),
        })
        .map_err(|e| explain_parse_error(route, body, e))?;
        if parsed.model().is_empty() {
            return Err(
                ApiError::bad_request("invalid_request", "`model` must not be empty")
                    .with_param("model"),
            );
        }
        if let CompletionBody::Chat(chat) = &parsed {
            if chat.messages.is_empty() {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "`messages` must contain at least one message",
                )
                .with_param("messages"));
            }
        }
        Ok(parsed)
    }

    pub fn route(&self) -> Route {
        match self {
            CompletionBody::Chat(_) => Route::Chat,
            CompletionBody::Completions(_) => Route::Completions,
        }
    }

    pub fn model(&self) -> &str {
        match self {
            CompletionBody::Chat(r) => &r.model,
            CompletionBody::Completions(r) => &r.model,
        }
    }

    pub fn params(&self) -> &CommonParams {
        match self {
            CompletionBody::Chat(r) => &r.params,
            CompletionBody::Completions(r) => &r.params,
        }
    }

    pub fn is_stream(&self) -> bool {
        self.params().stream.unwrap_or(false)
    }

    /// The body's unknown (non-OpenAI) top-level fields.
    pub fn extra_mut(&mut self) -> &mut Map<String, Value> {
        match self {
            CompletionBody::Chat(r) => &mut r.extra,
            CompletionBody::Completions(r) => &mut r.extra,
        }
    }

    /// Serialise back to JSON (unknown fields included).
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain serde_json data cannot fail.
        match self {
            CompletionBody::Chat(r) => serde_json::to_vec(r),
            CompletionBody::Completions(r) => serde_json::to_vec(r),
        }
        .unwrap_or_default()
    }
}

fn explain_parse_error(route: Route, body: &[u8], typed: serde_json::Error) -> ApiError {
    if typed.to_string().contains(de::LIMIT_MARK) {
        return ApiError::bad_request("too_many_items", format!("invalid request body: {typed}"));
    }
    // The second look keeps nothing of the body (no Value tree: a large body
    // would cost many times its size here).
    let required = match route {
        Route::Chat => ["model", "messages"],
        Route::Completions => ["model", "prompt"],
    };
    let shape = match serde_json::from_slice::<de::Shape>(body) {
        Ok(shape) => shape,
        Err(e) => {
            return ApiError::bad_request(
                "invalid_json",
                format!(
                    "the body is not valid JSON: {} (line {}, column {})",
                    crate::errmsg::field_message("", &e.to_string()),
                    e.line(),
                    e.column()
                ),
            )
        }
    };
    let Some(present) = shape.present else {
        return ApiError::bad_request("invalid_request", "the request body must be a JSON object");
    };
    for field in required {
        if !present.contains(&field) {
            return ApiError::bad_request(
                "missing_field",
                format!("missing required field `{field}`"),
            )
            .with_param(field);
        }
    }
    invalid_field(route, body, typed)
}

/// A field of the right name with the wrong type or value: a third look finds
/// which field (serde's own error names none), and its message is reworded.
fn invalid_field(route: Route, body: &[u8], typed: serde_json::Error) -> ApiError {
    let located = de::with_limits(body.len(), || {
        let mut d = serde_json::Deserializer::from_slice(body);
        match route {
            Route::Chat => serde_path_to_error::deserialize::<_, ChatCompletionRequest>(&mut d)
                .map(|_| ())
                .map_err(|e| (e.path().to_string(), e.into_inner())),
            Route::Completions => serde_path_to_error::deserialize::<_, CompletionRequest>(&mut d)
                .map(|_| ())
                .map_err(|e| (e.path().to_string(), e.into_inner())),
        }
    });
    let (path, inner) = match located {
        Err((path, e)) => (path, e.to_string()),
        Ok(()) => (String::new(), typed.to_string()),
    };
    let message = crate::errmsg::field_message(&path, &inner);
    let field = path.split(['.', '[']).next().unwrap_or("");
    let err = ApiError::bad_request("invalid_type", message);
    match KNOWN_PARAMS.iter().find(|p| **p == field) {
        Some(p) => err.with_param(p),
        None => err,
    }
}

/// Top-level fields whose errors name them in `param`.
const KNOWN_PARAMS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
];

/// An error answered to the client as OpenAI error JSON:
/// `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `rate_limit_error`, `server_error`.
    pub kind: &'static str,
    pub code: &'static str,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(
        status: u16,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            code,
            param: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", code, message)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist."),
        )
        .with_param("model")
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "not_found",
            format!("no route for `{path}`"),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            format!("method {method} is not allowed on `{path}`"),
        )
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            "body_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    pub fn no_healthy_upstream(model: &str) -> Self {
        Self::new(
            503,
            "server_error",
            "no_healthy_upstream",
            format!("no healthy upstream instance is available for model `{model}`"),
        )
    }

    pub fn upstream_timeout(detail: impl fmt::Display) -> Self {
        Self::new(
            504,
            "server_error",
            "upstream_timeout",
            format!("upstream timed out: {detail}"),
        )
    }

    pub fn upstream_failed(detail: impl fmt::Display) -> Self {
        Self::new(
            502,
            "server_error",
            "upstream_error",
            format!("upstream failed: {detail}"),
        )
    }

    /// 429: the instance's admission queue is full or the wait ran out.
    pub fn too_many_requests(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(429, "rate_limit_error", code, message)
    }

    /// 508: the request went round gateways more times than allowed.
    pub fn loop_detected(hops: u32, max: u32) -> Self {
        Self::new(
            508,
            "server_error",
            "loop_detected",
            format!("the request passed {hops} CacheRoute gateways (limit {max}): routing loop"),
        )
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }))
        .unwrap_or_default()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// Hand-written deserialisers: one pass over the body, typed fields checked,
/// unknown fields kept. (serde's `flatten` and `untagged` buffer every value
/// first, which is most of the parsing cost on the hot path.)
mod de {
    use super::*;
    use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    const PROMPT_SHAPES: &str = "`prompt` must be a string, an array of strings, an array of token ids, or an array of arrays of token ids";

    /// Marks the errors of the bounds below (their own error code).
    pub(super) const LIMIT_MARK: &str = "over the gateway's limit";
    /// JSON values the gateway keeps as `Value` trees in one body (unknown
    /// fields, content parts): one costs ~80 bytes against 2 in the body.
    pub const MAX_VALUE_NODES: usize = 262_144;
    /// Messages of one chat request (~160 bytes each, parsed).
    pub const MAX_MESSAGES: usize = 100_000;
    /// Texts or token-id batches of one completion prompt.
    pub const MAX_PROMPT_ITEMS: usize = 65_536;

    /// The bounds of the body being parsed on this thread.
    #[derive(Clone, Copy)]
    struct Limits {
        /// `Value` nodes still allowed.
        nodes_left: usize,
        /// Most token ids the body can hold (2 bytes each at least): a long
        /// token prompt reserves this at once instead of doubling its way up
        /// (each doubling keeps the old and the new buffer alive).
        max_tokens: usize,
    }

    const UNLIMITED: Limits = Limits {
        nodes_left: usize::MAX,
        max_tokens: 0,
    };

    thread_local! {
        static LIMITS: std::cell::Cell<Limits> = const { std::cell::Cell::new(UNLIMITED) };
    }

    /// Run `f` (a parse of a body of `len` bytes) under the body bounds.
    pub(super) fn with_limits<T>(len: usize, f: impl FnOnce() -> T) -> T {
        LIMITS.with(|l| {
            l.set(Limits {
                nodes_left: MAX_VALUE_NODES,
                max_tokens: len / 2 + 1,
            })
        });
        let out = f();
        LIMITS.with(|l| l.set(UNLIMITED));
        out
    }

    fn take_node<E: de::Error>() -> Result<(), E> {
        LIMITS.with(|l| {
            let mut cur = l.get();
            if cur.nodes_left == 0 {
                return Err(E::custom(format_args!(
                    "more than {MAX_VALUE_NODES} JSON values in pass-through fields: {LIMIT_MARK}"
                )));
            }
            cur.nodes_left -= 1;
            l.set(cur);
            Ok(())
        })
    }

    fn too_many<E: de::Error>(what: &str, max: usize) -> E {
        E::custom(format_args!("more than {max} {what}: {LIMIT_MARK}"))
    }

    /// A `Value` whose nodes count against the body's budget.
    pub(super) struct Bounded(pub Value);

    impl<'de> Deserialize<'de> for Bounded {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Bounded;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<Bounded, E> {
                    take_node()?;
                    Ok(Bounded(Value::Bool(v)))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Bounded, E> {
                    take_node()?;
                    Ok(Bounded(Value::from(v)))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Bounded, E> {
                    take_node()?;
                    Ok(Bounded(Value::from(v)))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Bounded, E> {
                    take_node()?;
                    Ok(Bounded(
                        serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
                    ))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Bounded, E> {
                    take_node()?;
                    Ok(Bounded(Value::String(v.to_string())))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Bounded, E> {
                    take_node()?;
                    Ok(Bounded(Value::String(v)))
                }
                fn visit_unit<E: de::Error>(self) -> Result<Bounded, E> {
                    take_node()?;
                    Ok(Bounded(Value::Null))
                }
                fn visit_none<E: de::Error>(self) -> Result<Bounded, E> {
                    self.visit_unit()
                }
                fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Bounded, D::Error> {
                    Bounded::deserialize(d)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bounded, A::Error> {
                    take_node()?;
                    let mut items = Vec::new();
                    while let Some(Bounded(v)) = seq.next_element()? {
                        items.push(v);
                    }
                    Ok(Bounded(Value::Array(items)))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Bounded, A::Error> {
                    take_node()?;
                    let mut out = Map::new();
                    while let Some(key) = map.next_key::<String>()? {
                        let Bounded(v) = map.next_value()?;
                        out.insert(key, v);
                    }
                    Ok(Bounded(Value::Object(out)))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// A chat request's messages, at most MAX_MESSAGES of them.
    pub(super) struct Messages(pub Vec<ChatMessage>);

    impl<'de> Deserialize<'de> for Messages {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Messages;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an array of messages")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                    let mut out = Vec::new();
                    while let Some(m) = seq.next_element::<ChatMessage>()? {
                        if out.len() == MAX_MESSAGES {
                            return Err(too_many("messages", MAX_MESSAGES));
                        }
                        out.push(m);
                    }
                    Ok(Messages(out))
                }
            }
            d.deserialize_seq(V)
        }
    }

    /// What the second look at a refused body needs: is it an object, and
    /// which of the required fields does it hold (not null). Nothing else of
    /// the body is kept.
    pub(super) struct Shape {
        pub present: Option<Vec<&'static str>>,
    }

    impl<'de> Deserialize<'de> for Shape {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Shape;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
                    let mut present = Vec::new();
                    while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                        let value = map.next_value::<Option<de::IgnoredAny>>()?;
                        let known = ["model", "messages", "prompt"]
                            .into_iter()
                            .find(|k| *k == key);
                        if let (Some(k), Some(_)) = (known, value) {
                            present.push(k);
                        }
                    }
                    Ok(Shape {
                        present: Some(present),
                    })
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
                    while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                    Ok(Shape { present: None })
                }
                fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape, E> {
                    Ok(Shape { present: None })
                }
                fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
                    Ok(Shape { present: None })
                }
                fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
                    Ok(Shape { present: None })
                }
                fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
                    Ok(Shape { present: None })
                }
                fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape, E> {
                    Ok(Shape { present: None })
                }
                fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
                    Ok(Shape { present: None })
                }
            }
            d.deserialize_any(V)
        }
    }

    impl CommonParams {
        /// Take `key`'s value if it is one of the common parameters.
        fn accept<'de, A: MapAccess<'de>>(
            &mut self,
            key: &str,
            map: &mut A,
        ) -> Result<bool, A::Error> {
            match key {
                "stream" => self.stream = map.next_value()?,
                "stream_options" => self.stream_options = map.next_value()?,
                "max_tokens" => self.max_tokens = map.next_value()?,
                "temperature" => self.temperature = map.next_value()?,
                "top_p" => self.top_p = map.next_value()?,
                "n" => self.n = map.next_value()?,
                _ => return Ok(false),
            }
            Ok(true)
        }
    }

    fn required<T, E: de::Error>(v: Option<T>, field: &'static str) -> Result<T, E> {
        v.ok_or_else(|| de::Error::missing_field(field))
    }

    impl<'de> Deserialize<'de> for ChatCompletionRequest {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = ChatCompletionRequest;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a chat completion request object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let (mut model, mut messages, mut max_completion_tokens) = (None, None, None);
                    let mut params = CommonParams::default();
                    let mut extra = Map::new();
                    while let Some(key) = map.next_key::<String>()? {
                        match key.as_str() {
                            "model" => model = map.next_value::<Option<String>>()?,
                            "messages" => {
                                messages = map.next_value::<Option<Messages>>()?.map(|m| m.0)
                            }
                            "max_completion_tokens" => max_completion_tokens = map.next_value()?,
                            k => {
                                if !params.accept(k, &mut map)? {
                                    extra.insert(key, map.next_value::<Bounded>()?.0);
                                }
                            }
                        }
                    }
                    Ok(ChatCompletionRequest {
                        model: required(model, "model")?,
                        messages: required(messages, "messages")?,
                        max_completion_tokens,
                        params,
                        extra,
                    })
                }
            }
            d.deserialize_map(V)
        }
    }

    impl<'de> Deserialize<'de> for CompletionRequest {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = CompletionRequest;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a completion request object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let (mut model, mut prompt) = (None, None);
                    let mut params = CommonParams::default();
                    let mut extra = Map::new();
                    while let Some(key) = map.next_key::<String>()? {
                        match key.as_str() {
                            "model" => model = map.next_value::<Option<String>>()?,
                            "prompt" => prompt = map.next_value::<Option<Prompt>>()?,
                            k => {
                                if !params.accept(k, &mut map)? {
                                    extra.insert(key, map.next_value::<Bounded>()?.0);
                                }
                            }
                        }
                    }
                    Ok(CompletionRequest {
                        model: required(model, "model")?,
                        prompt: required(prompt, "prompt")?,
                        params,
                        extra,
                    })
                }
            }
            d.deserialize_map(V)
        }
    }

    impl<'de> Deserialize<'de> for StreamOptions {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = StreamOptions;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a `stream_options` object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut out = StreamOptions::default();
                    while let Some(key) = map.next_key::<String>()? {
                        if key == "include_usage" {
                            out.include_usage = map.next_value()?;
                        } else {
                            out.extra.insert(key, map.next_value::<Bounded>()?.0);
                        }
                    }
                    Ok(out)
                }
            }
            d.deserialize_map(V)
        }
    }

    impl<'de> Deserialize<'de> for ChatMessage {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = ChatMessage;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a message object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let (mut role, mut content) = (None, None);
                    let mut extra = Map::new();
                    while let Some(key) = map.next_key::<String>()? {
                        match key.as_str() {
                            "role" => role = Some(map.next_value::<String>()?),
                            "content" => content = map.next_value::<Option<MessageContent>>()?,
                            _ => {
                                extra.insert(key, map.next_value::<Bounded>()?.0);
                            }
                        }
                    }
                    Ok(ChatMessage {
                        role: required(role, "role")?,
                        content,
                        extra,
                    })
                }
            }
            d.deserialize_map(V)
        }
    }

    impl<'de> Deserialize<'de> for MessageContent {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = MessageContent;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a message's `content` as a string or an array of content parts")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(MessageContent::Text(v.to_string()))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                    Ok(MessageContent::Text(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                    let mut parts = Vec::new();
                    while let Some(Bounded(p)) = seq.next_element::<Bounded>()? {
                        parts.push(p);
                    }
                    Ok(MessageContent::Parts(parts))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// Token prompts longer than this reserve the body's most at once.
    const TOKENS_RESERVE_FROM: usize = 1 << 16;

    /// One element of a `prompt` array, typed as it is read: a string, a token
    /// id or a batch of ids. (Going through `Value` cost ~32 bytes per token id,
    /// about 16× the body's size for a long token prompt.)
    enum PromptItem {
        Text(String),
        Token(u32),
        Batch(Vec<u32>),
    }

    impl<'de> Deserialize<'de> for PromptItem {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = PromptItem;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str(PROMPT_SHAPES)
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(PromptItem::Text(v.to_string()))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                    Ok(PromptItem::Text(v))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                    u32::try_from(v)
                        .map(PromptItem::Token)
                        .map_err(|_| E::custom(PROMPT_SHAPES))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                    let mut ids = Vec::new();
                    while let Some(id) = seq.next_element::<u32>()? {
                        ids.push(id);
                    }
                    Ok(PromptItem::Batch(ids))
                }
            }
            d.deserialize_any(V)
        }
    }

    impl<'de> Deserialize<'de> for Prompt {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Prompt;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str(PROMPT_SHAPES)
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(Prompt::Text(v.to_string()))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                    Ok(Prompt::Text(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                    // The first element fixes the shape; every other must match it.
                    let invalid = || de::Error::custom(PROMPT_SHAPES);
                    let mut prompt = match seq.next_element::<PromptItem>()? {
                        // An empty array reads as an empty list of texts, as before.
                        None => return Ok(Prompt::Texts(Vec::new())),
                        Some(PromptItem::Text(s)) => Prompt::Texts(vec![s]),
                        Some(PromptItem::Token(t)) => Prompt::Tokens(vec![t]),
                        Some(PromptItem::Batch(b)) => Prompt::TokenBatches(vec![b]),
                    };
                    while let Some(item) = seq.next_element::<PromptItem>()? {
                        match (&mut prompt, item) {
                            (Prompt::Texts(v), PromptItem::Text(s)) => {
                                if v.len() == MAX_PROMPT_ITEMS {
                                    return Err(too_many("prompt texts", MAX_PROMPT_ITEMS));
                                }
                                v.push(s)
                            }
                            (Prompt::Tokens(v), PromptItem::Token(t)) => {
                                if v.len() == v.capacity() && v.len() >= TOKENS_RESERVE_FROM {
                                    let most = LIMITS.with(|l| l.get().max_tokens);
                                    v.reserve_exact(most.saturating_sub(v.len()).max(v.len()));
                                }
                                v.push(t)
                            }
                            (Prompt::TokenBatches(v), PromptItem::Batch(b)) => {
                                if v.len() == MAX_PROMPT_ITEMS {
                                    return Err(too_many("prompt batches", MAX_PROMPT_ITEMS));
                                }
                                v.push(b)
                            }
                            _ => return Err(invalid()),
                        }
                    }
                    Ok(prompt)
                }
            }
            d.deserialize_any(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(route: Route, body: &str) -> Result<CompletionBody, ApiError> {
        CompletionBody::parse(route, body.as_bytes())
    }

    #[test]
    fn chat_keeps_unknown_fields_and_order() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi","name":"x"}],"zeta":1,"stream":true,"alpha":{"k":[1,2]},"logit_bias":{"5":1}}"#;
        let parsed = parse(Route::Chat, body).unwrap();
        assert!(parsed.is_stream());
        let back: Value = serde_json::from_slice(&parsed.to_json()).unwrap();
        let orig: Value = serde_json::from_str(body).unwrap();
        assert_eq!(back, orig);
        let CompletionBody::Chat(chat) = parsed else {
            panic!()
        };
        assert_eq!(chat.messages[0].extra["name"], "x");
        let keys: Vec<_> = chat.extra.keys().cloned().collect();
        assert_eq!(keys, ["zeta", "alpha", "logit_bias"]);
    }

    #[test]
    fn completions_prompt_shapes() {
        for p in [r#""a""#, r#"["a","b"]"#, "[1,2,3]", "[[1],[2,3]]"] {
            let body = format!(r#"{{"model":"m","prompt":{p}}}"#);
            assert!(parse(Route::Completions, &body).is_ok(), "{p}");
        }
        let err = parse(Route::Completions, r#"{"model":"m","prompt":5}"#).unwrap_err();
        assert_eq!((err.status, err.code), (400, "invalid_type"));
        assert!(err.message.contains("prompt"));
    }

    #[test]
    fn prompt_arrays_of_mixed_shapes_are_refused() {
        for p in [
            r#"[1,"a"]"#,
            r#"["a",1]"#,
            "[[1],2]",
            "[1.5]",
            "[-1]",
            "[4294967296]",
            "[[1,\"a\"]]",
        ] {
            let body = format!(r#"{{"model":"m","prompt":{p}}}"#);
            let err = parse(Route::Completions, &body).unwrap_err();
            assert_eq!(err.status, 400, "{p}");
        }
        let body = r#"{"model":"m","prompt":[]}"#;
        assert!(matches!(
            parse(Route::Completions, body),
            Ok(CompletionBody::Completions(CompletionRequest { prompt: Prompt::Texts(t), .. })) if t.is_empty()
        ));
    }

    #[test]
    fn lists_past_their_bound_are_refused_with_a_clear_code() {
        let msgs = vec![r#"{"role":"user","content":"x"}"#; de::MAX_MESSAGES + 1].join(",");
        let body = format!(r#"{{"model":"m","messages":[{msgs}]}}"#);
        let err = parse(Route::Chat, &body).unwrap_err();
        assert_eq!((err.status, err.code), (400, "too_many_items"));
        let ones = vec!["1"; de::MAX_VALUE_NODES + 1].join(",");
        let body = format!(r#"{{"model":"m","prompt":"x","extra":[{ones}]}}"#);
        let err = parse(Route::Completions, &body).unwrap_err();
        assert_eq!((err.status, err.code), (400, "too_many_items"));
        // The budget is per body: the next one parses.
        assert!(parse(
            Route::Completions,
            r#"{"model":"m","prompt":"x","extra":[1,2]}"#
        )
        .is_ok());
        // A long token prompt is not bounded by the item count.
        let ids = vec!["7"; de::MAX_VALUE_NODES + 1].join(",");
        let body = format!(r#"{{"model":"m","prompt":[{ids}]}}"#);
        assert!(parse(Route::Completions, &body).is_ok());
    }

    #[test]
    fn bad_inputs_are_400_with_precise_codes() {
        let cases = [
            (Route::Chat, "{not json", "invalid_json"),
            (Route::Chat, "[1,2]", "invalid_request"),
            (Route::Chat, r#"{"messages":[]}"#, "missing_field"),
            (Route::Chat, r#"{"model":"m"}"#, "missing_field"),
            (
                Route::Chat,
                r#"{"model":null,"messages":[{"role":"user","content":"x"}]}"#,
                "missing_field",
            ),
            (
                Route::Chat,
                r#"{"model":3,"messages":[{"role":"user","content":"x"}]}"#,
                "invalid_type",
            ),
            (Route::Chat, r#"{"model":"m","messages":5}"#, "invalid_type"),
            (
                Route::Chat,
                r#"{"model":"m","messages":[]}"#,
                "invalid_request",
            ),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                "invalid_type",
            ),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                "invalid_type",
            ),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":7}]}"#,
                "invalid_type",
            ),
            (
                Route::Chat,
                r#"{"model":"","messages":[{"role":"user","content":"x"}]}"#,
                "invalid_request",
            ),
            (Route::Completions, r#"{"model":"m"}"#, "missing_field"),
        ];
        for (route, body, code) in cases {
            let err = parse(route, body).unwrap_err();
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.code, code, "{body}: {}", err.message);
        }
    }

    #[test]
    fn error_json_shape() {
        let e = ApiError::model_not_found("nope");
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    }

    #[test]
    fn message_text_joins_parts() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url"},{"type":"text","text":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(m.text(), "a\nb");
    }
}
