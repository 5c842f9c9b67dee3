//! Error messages a person understands, from serde's: "max_tokens: expected a
//! non-negative integer, got -1" rather than "invalid value: integer `-1`,
//! expected u64 at line 1 column 79".
//!
//! serde names neither the field nor the expectation in plain words; the field
//! comes from `serde_path_to_error` (a second, failing-path-only parse), the
//! rest from rewording serde's `invalid type/value: X, expected Y` messages.

use serde_json::Value;

/// A JSON value as a message shows it: short, in JSON's words.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => quote(s),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A string value, quoted and cut to a readable length.
fn quote(s: &str) -> String {
    const MAX: usize = 40;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// serde's name of an expected type, in plain words.
fn expected_words(expected: &str) -> String {
    match expected {
        "u64" | "u32" | "u16" | "u8" | "usize" => "a non-negative integer".into(),
        "i64" | "i32" | "i16" | "i8" | "isize" => "an integer".into(),
        "f64" | "f32" => "a number".into(),
        "a boolean" | "bool" => "a boolean (true or false)".into(),
        "a string" | "string" => "a string".into(),
        "a sequence" => "an array".into(),
        "a map" => "an object".into(),
        "struct StreamOptions" => "an object".into(),
        other => other.into(),
    }
}

/// serde's words for what it got (`integer \`-1\``, `string "x"`, `map`), as JSON.
fn got_words(got: &str) -> String {
    let inner = |prefix: &str| {
        got.strip_prefix(prefix)
            .map(|r| r.trim_matches('`').to_string())
    };
    if let Some(n) = inner("integer ").or_else(|| inner("floating point ")) {
        return n;
    }
    if let Some(b) = inner("boolean ") {
        return b;
    }
    if let Some(s) = got.strip_prefix("string ") {
        return s.to_string();
    }
    match got {
        "map" => "an object".into(),
        "sequence" => "an array".into(),
        "null" | "unit value" => "null".into(),
        other => other.into(),
    }
}

/// Drop serde_json's position suffix (" at line 1 column 79").
fn without_position(msg: &str) -> &str {
    match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(" column ") => &msg[..i],
        _ => msg,
    }
}

/// One field's error: `path: expected …, got …` for a wrong type or value, or
/// `path: <the message>` for the rest (custom messages are already worded).
pub fn field_message(path: &str, serde_msg: &str) -> String {
    let msg = without_position(serde_msg);
    let body = msg
        .strip_prefix("invalid type: ")
        .or_else(|| msg.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "))
        .map(|(got, expected)| {
            format!(
                "expected {}, got {}",
                expected_words(expected),
                got_words(got)
            )
        })
        .or_else(|| {
            msg.strip_prefix("missing field ")
                .map(|f| format!("missing required field {}", f.replace('`', "")))
        })
        .unwrap_or_else(|| msg.to_string());
    if path.is_empty() || path == "." {
        body
    } else {
        format!("{path}: {body}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_become_plain_words() {
        assert_eq!(
            field_message(
                "max_tokens",
                "invalid value: integer `-1`, expected u64 at line 1 column 79"
            ),
            "max_tokens: expected a non-negative integer, got -1"
        );
        assert_eq!(
            field_message("temperature", "invalid type: string \"hot\", expected f64"),
            "temperature: expected a number, got \"hot\""
        );
        assert_eq!(
            field_message("stream", "invalid type: integer `1`, expected a boolean"),
            "stream: expected a boolean (true or false), got 1"
        );
        assert_eq!(
            field_message("messages[0].role", "invalid type: map, expected a string"),
            "messages[0].role: expected a string, got an object"
        );
        assert_eq!(
            field_message("prompt", "`prompt` must be a string"),
            "prompt: `prompt` must be a string"
        );
    }

    #[test]
    fn parse_errors_name_the_field_and_the_expectation() {
        use crate::openai::{CompletionBody, Route};
        let cases: [(Route, &str, &str, Option<&str>); 4] = [
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":-1}"#,
                "max_tokens: expected a non-negative integer, got -1",
                Some("max_tokens"),
            ),
            (
                Route::Completions,
                r#"{"model":"m","prompt":"x","temperature":"hot"}"#,
                "temperature: expected a number, got \"hot\"",
                Some("temperature"),
            ),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":"yes"}}"#,
                "stream_options.include_usage: expected a boolean (true or false), got \"yes\"",
                Some("stream_options"),
            ),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":5}]}"#,
                "messages[0].role: expected a string, got 5",
                Some("messages"),
            ),
        ];
        for (route, body, want, param) in cases {
            let err = CompletionBody::parse(route, body.as_bytes()).unwrap_err();
            assert_eq!(err.message, want, "{body}");
            assert_eq!(err.param, param, "{body}");
            assert_eq!(err.status, 400);
        }
        let err = CompletionBody::parse(Route::Chat, b"{\"model\": ").unwrap_err();
        assert!(
            err.message
                .starts_with("the body is not valid JSON: EOF while parsing"),
            "{}",
            err.message
        );
    }

    #[test]
    fn values_are_described_briefly() {
        assert_eq!(describe(&Value::from(7)), "7");
        assert_eq!(describe(&serde_json::json!({"a": 1})), "an object");
        let long = "x".repeat(100);
        assert!(describe(&Value::from(long)).ends_with('…'));
    }
}
