//! [`KdnError`]: every failure the KDN answers over HTTP, with its status, OpenAI-style
//! type, stable code and message, so handlers and the library share one shape.

use axum::http::StatusCode;

use cacheroute_wire::error::ErrorBody;

/// An error answered as `{"error":{"message","type","code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct KdnError {
    pub status: StatusCode,
    /// `invalid_request_error`, `not_found_error`, `conflict_error`, `server_error`, …
    pub kind: &'static str,
    /// A stable machine-readable code, e.g. `text_empty`, `unknown_model`.
    pub code: &'static str,
    pub message: String,
    /// Seconds to answer in `Retry-After` (429, 503).
    pub retry_after_s: Option<u64>,
}

impl KdnError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        KdnError {
            status,
            kind,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", code, message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "unauthorized",
            message,
        )
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict_error", code, message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            code,
            message,
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.message.clone(), self.kind, Some(self.code))
    }
}

impl std::fmt::Display for KdnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for KdnError {}
