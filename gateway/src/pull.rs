//! [`PullError`]: why an HTTP call of a background task (registry sync, loads,
//! embeddings) failed, naming the URL it was made to. The tasks keep running on an
//! error; it is logged and shown in the status (`last_error`).

/// A failed pull from `url`.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// No response: connect, timeout, TLS.
    #[error("{url}: {source}")]
    Send {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// A response that is not a success.
    #[error("{url}: HTTP {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    /// The body could not be read to its end.
    #[error("{url}: {source}")]
    Body {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The body is not the JSON expected.
    #[error("{url}: {source}")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

impl PullError {
    pub fn send(url: &str, source: reqwest::Error) -> Self {
        PullError::Send {
            url: url.to_string(),
            source,
        }
    }

    pub fn status(url: &str, status: reqwest::StatusCode) -> Self {
        PullError::Status {
            url: url.to_string(),
            status,
        }
    }

    pub fn body(url: &str, source: reqwest::Error) -> Self {
        PullError::Body {
            url: url.to_string(),
            source,
        }
    }

    pub fn json(url: &str, source: serde_json::Error) -> Self {
        PullError::Json {
            url: url.to_string(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_url() {
        let e = PullError::status("http://kdn/v1/load", reqwest::StatusCode::BAD_GATEWAY);
        assert_eq!(e.to_string(), "http://kdn/v1/load: HTTP 502 Bad Gateway");
        let json = serde_json::from_slice::<u32>(b"x").unwrap_err();
        let e = PullError::json("http://kdn/v1/load", json);
        assert!(
            e.to_string().starts_with("http://kdn/v1/load: expected"),
            "{e}"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
