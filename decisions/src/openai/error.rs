//! [`ApiError`]: an error answered to the client as OpenAI error JSON, with a
//! constructor per case the gateway answers.

use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    #[test]
    fn error_json_shape() {
        let e = ApiError::model_not_found("nope");
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    }
}
