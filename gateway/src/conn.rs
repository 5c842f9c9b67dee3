//! The service plane's connection handling, below the request filters: the
//! bounds on a request's header and body (408, 413, 414, 431, broken framing),
//! reading the body whole, keep-alive between requests, and closing after an
//! error without losing the answer.

use bytes::{Bytes, BytesMut};
use cacheroute_decisions::openai::ApiError;
use pingora::apps::{HttpPersistentSettings, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as Session;
use std::time::Duration;

/// Slow clients get this long between body chunks before the read fails.
const CLIENT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Close a connection after an error answer without losing that answer: stop
/// sending, then read and drop what the client still sends (bounded), so that
/// closing with unread bytes does not reset the connection before the client
/// has read the answer (RFC 9112 §9.6).
pub async fn lingering_close(session: Session) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LINGER: Duration = Duration::from_secs(2);
    const LINGER_BYTES: usize = 4 << 20;
    let Session::H1(h1) = session else {
        return;
    };
    let mut stream = h1.into_inner();
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        // On the heap: an array here would sit in every request's future
        // (copied whole when Pingora boxes it), not only in the rare lingering one.
        let mut buf = vec![0u8; 16 * 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    };
    let _ = fast_timeout::fast_timeout(LINGER, drain).await;
}

/// Bodies larger than this make the worker give memory back after the request.
pub const COLLECT_AFTER_BYTES: usize = 4 << 20;

/// Seconds a kept-alive connection may stay idle between requests.
pub const KEEPALIVE_SECS: u64 = 60;

/// Wait on a kept-alive connection for the first bytes of its next request and
/// hand them to the next session as its prefix, so that the next header's
/// deadline counts from its first byte, not from the end of the idle wait. It
/// is the read Pingora would have made itself: no extra syscall.
pub async fn wait_next_request(
    reusable: pingora::protocols::http::ReusableHttpStream,
    mut settings: HttpPersistentSettings,
) -> Option<ReusedHttpStream> {
    use tokio::io::AsyncReadExt;
    let (mut stream, prefix) = reusable.into_parts();
    let prefix = match prefix {
        // Pipelined bytes are already here.
        Some(p) => p,
        None => {
            let mut buf = BytesMut::with_capacity(HEADER_BUF_SIZE);
            let idle = Duration::from_secs(KEEPALIVE_SECS);
            match fast_timeout::fast_timeout(idle, stream.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => buf,
                // Closed, failed or idle too long: the connection ends.
                _ => return None,
            }
        }
    };
    settings.set_pipelined_prefix(prefix);
    Some(ReusedHttpStream::new(stream, Some(settings)))
}

/// The first read of a request header (Pingora's own initial size).
const HEADER_BUF_SIZE: usize = 4096;

/// The service plane's bounds on a request header, from `[gateway]`.
#[derive(Clone, Copy)]
pub struct HeadLimits {
    pub header_timeout: Duration,
    max_header_bytes: usize,
    max_uri_bytes: usize,
}

impl HeadLimits {
    pub fn of(gw: &crate::config::GatewaySection) -> HeadLimits {
        HeadLimits {
            header_timeout: Duration::from_millis(gw.header_timeout_ms),
            max_header_bytes: gw.max_header_bytes,
            max_uri_bytes: gw.max_uri_bytes,
        }
    }
}

/// A request header the gateway answers with an error, then closes.
pub struct HeadRefusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl HeadRefusal {
    pub fn timeout(t: Duration) -> HeadRefusal {
        HeadRefusal {
            status: 408,
            code: "request_timeout",
            message: format!(
                "the request header was not received within {} ms",
                t.as_millis()
            ),
        }
    }

    fn too_large(what: &str) -> HeadRefusal {
        HeadRefusal {
            status: 431,
            code: "header_too_large",
            message: format!("request header fields too large: {what}"),
        }
    }
}

/// Bounds Pingora does not apply itself: the header's size (it allows 1 MiB)
/// and the request target's length.
pub fn check_head(session: &Session, limits: &HeadLimits) -> Option<HeadRefusal> {
    let req = session.req_header();
    let target = req.raw_path().len();
    if target > limits.max_uri_bytes {
        return Some(HeadRefusal {
            status: 414,
            code: "uri_too_long",
            message: format!(
                "the request target is {target} bytes; the limit is {}",
                limits.max_uri_bytes
            ),
        });
    }
    let size = session
        .as_http1()
        .map_or(0, |h1| h1.get_headers_raw_bytes().len());
    if size > limits.max_header_bytes {
        return Some(HeadRefusal::too_large(&format!(
            "{size} bytes; the limit is {}",
            limits.max_header_bytes
        )));
    }
    None
}

/// What to answer when Pingora could not read a request header: the client
/// learns why instead of seeing a reset. `None`: the client is gone.
pub fn head_error(e: &Error) -> Option<HeadRefusal> {
    let cause = e.cause.as_ref().map(|c| c.to_string()).unwrap_or_default();
    let context = e.context.as_ref().map(|c| c.as_str()).unwrap_or_default();
    match e.etype() {
        ReadTimedout => Some(HeadRefusal {
            status: 408,
            code: "request_timeout",
            message: "the request header was not received in time".into(),
        }),
        InvalidHTTPHeader if context.starts_with("Request header larger than") => {
            Some(HeadRefusal::too_large("over 1 MiB"))
        }
        InvalidHTTPHeader if cause.contains("too many headers") => {
            Some(HeadRefusal::too_large("too many header fields"))
        }
        InvalidHTTPHeader => Some(HeadRefusal {
            status: 400,
            code: "invalid_request",
            message: format!("malformed request header: {}", cause_or(&cause, context)),
        }),
        _ => {
            tracing::debug!(error = %e, "reading a request failed");
            None
        }
    }
}

fn cause_or<'a>(cause: &'a str, context: &'a str) -> &'a str {
    if cause.is_empty() {
        // The context of a framing error names it (it may quote the header: keep it short).
        context
            .get(..context.len().min(200))
            .unwrap_or("bad framing")
    } else {
        cause
    }
}

/// Read the whole request body, refusing it once it passes `limit` bytes.
pub async fn read_body(
    session: &mut Session,
    limit: usize,
    deadline: Duration,
) -> Result<std::result::Result<Bytes, ApiError>> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(Err(ApiError::body_too_large(limit)));
    }
    session.set_read_timeout(Some(CLIENT_BODY_READ_TIMEOUT));
    // A client that asked to wait (curl does for large bodies) would
    // otherwise pause a full second before sending the body.
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session.write_continue_response().await?;
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(4096).min(limit));
    let read = async {
        while let Some(chunk) = session.read_request_body().await? {
            if buf.len() + chunk.len() > limit {
                return Ok(false);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok::<_, Box<Error>>(true)
    };
    let refusal = match fast_timeout::fast_timeout(deadline, read).await {
        Ok(Ok(true)) => return Ok(Ok(buf.freeze())),
        Ok(Ok(false)) => return Ok(Err(ApiError::body_too_large(limit))),
        Ok(Err(e)) => match body_error(&e) {
            Some(refusal) => refusal,
            None => return Err(e),
        },
        Err(_) => ApiError::new(
            408,
            "invalid_request_error",
            "request_timeout",
            format!(
                "the request body was not received within {} ms",
                deadline.as_millis()
            ),
        ),
    };
    // The rest of the body cannot be trusted or waited for: answer, then close.
    session.set_keepalive(None);
    Ok(Err(refusal))
}

/// A body that could not be read: 400 for broken framing, 408 for a stalled
/// client; `None` when the client went away (nothing to answer).
fn body_error(e: &Error) -> Option<ApiError> {
    match e.etype() {
        ReadTimedout => Some(ApiError::new(
            408,
            "invalid_request_error",
            "request_timeout",
            "the request body stalled",
        )),
        ErrorType::Custom(kind) if matches!(*kind, "InvalidChunk" | "InvalidTrailerEnd") => {
            Some(ApiError::bad_request(
                "invalid_framing",
                format!("malformed chunked request body: {e}"),
            ))
        }
        InvalidHTTPHeader => Some(ApiError::bad_request(
            "invalid_framing",
            format!("malformed request body framing: {e}"),
        )),
        _ => None,
    }
}

/// Write a complete response with a body, keeping the connection alive.
pub async fn respond(
    session: &mut Session,
    ctx: &mut crate::service::ReqCtx,
    status: u16,
    content_type: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4 + headers.len()))?;
    resp.insert_header("content-type", content_type)?;
    resp.insert_header("content-length", body.len().to_string())?;
    for (k, v) in headers {
        resp.insert_header(k.to_string(), *v)?;
    }
    ctx.status = status;
    session.write_response_header(Box::new(resp)).await?;
    session.write_response_body(body, true).await
}

/// The label of an HTTP status, without allocating for the common ones.
pub fn status_label(status: u16) -> std::borrow::Cow<'static, str> {
    match status {
        200 => "200".into(),
        400 => "400".into(),
        404 => "404".into(),
        405 => "405".into(),
        413 => "413".into(),
        429 => "429".into(),
        499 => "499".into(),
        502 => "502".into(),
        503 => "503".into(),
        504 => "504".into(),
        other => other.to_string().into(),
    }
}
