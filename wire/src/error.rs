//! The error body every component answers with, in OpenAI's shape, so that OpenAI
//! clients show the message: `{"error": {"message", "type", "code"}}`.

use serde::{Deserialize, Serialize};

/// `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// What went wrong and, where it helps, what to do about it.
    pub message: String,
    /// The class of error (`invalid_request_error`, `not_found`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// A machine-readable code (`queue_full`, `unknown_model`, ...); OpenAI sends
    /// `null` when it has none, so it may be absent or null.
    #[serde(default)]
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(
        message: impl Into<String>,
        kind: impl Into<String>,
        code: Option<impl Into<String>>,
    ) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.into(),
                code: code.map(Into::into),
            },
        }
    }
}
