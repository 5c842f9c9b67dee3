//! [`CompletionBody`]: a parsed request of either route, its accessors, and why a body
//! was refused (not JSON, a missing field, a field of the wrong type), as an OpenAI error.

use super::de;
use super::{ApiError, ChatCompletionRequest, CommonParams, CompletionRequest, Route};
use serde_json::{Map, Value};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Prompt;
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
    fn escaped_keys_are_the_same_fields() {
        // Keys are borrowed from the body when they can be; an escaped key is
        // decoded and must match the same field.
        let body = r#"{"mod\u0065l":"m","m\u0065ssages":[{"r\u006fle":"user","content":"hi"}],"\u007a":1}"#;
        let CompletionBody::Chat(chat) = parse(Route::Chat, body).unwrap() else {
            panic!("not a chat body")
        };
        assert_eq!(
            (chat.model.as_str(), chat.messages[0].role.as_str()),
            ("m", "user")
        );
        assert_eq!(chat.extra["z"], 1);
        let CompletionBody::Completions(c) =
            parse(Route::Completions, r#"{"model":"m","pr\u006fmpt":"a"}"#).unwrap()
        else {
            panic!("not a completions body")
        };
        assert_eq!(c.model, "m");
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
}
