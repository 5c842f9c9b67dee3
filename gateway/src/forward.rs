//! One upstream exchange: send a pre-read request body to an instance over
//! Pingora's pooled connector and stream the response back to the client.

use crate::fleet::{PoolInstance, PrefillGuard};
use bytes::Bytes;
use http::HeaderName;
use pingora::connectors::TransportConnector;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
use pingora::protocols::http::ServerSession as Session;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Request headers that describe one connection, not the request: never
/// forwarded (RFC 9110 §7.6.1), plus the framing headers we set ourselves.
const NOT_FORWARDED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "expect",
];

pub struct Completed {
    pub status: u16,
    /// Time from the request's arrival to the first response body chunk.
    pub ttft: Option<Duration>,
}

pub enum ExchangeError {
    /// No connection to the instance could be made: nothing reached it, so
    /// the request may go to another instance. (A kept-alive connection
    /// found closed is not this: the exchange retries on a fresh one.)
    NotSent(Box<Error>),
    /// The instance failed after the request was sent; not retried, since
    /// generation is not idempotent. `status_sent`: the client already has
    /// the response header.
    Failed {
        status_sent: bool,
        error: Box<Error>,
    },
    /// Writing to the client failed (it went away).
    Downstream(Box<Error>),
}

/// What goes to the instance in one attempt.
pub struct Outgoing<'a> {
    pub body: Bytes,
    /// Headers added to the client's (a KV handle, decision headers).
    pub headers: &'a [(&'static str, &'a str)],
    /// Counts the request in the instance's prefill backlog until its first byte.
    pub prefill: PrefillGuard<'a>,
}

pub async fn exchange(
    transport: &TransportConnector,
    session: &mut Session,
    inst: &PoolInstance,
    outgoing: Outgoing<'_>,
    extra_headers: &[(&'static str, &str)],
    on_response: &(dyn Fn(&mut ResponseHeader) + Sync),
    start: Instant,
) -> std::result::Result<Completed, ExchangeError> {
    let Outgoing {
        body,
        headers: request_headers,
        prefill,
    } = outgoing;
    let mut prefill = Some(prefill);
    let peer = inst.peer();
    // Header and body leave in one write: one send per request on the
    // upstream side, as a tuned reverse proxy does (Pingora's h1 client
    // flushes the header on its own).
    let request = upstream_request_bytes(session, inst, request_headers, &body);
    // A large body is written after the header from where it is, not copied
    // next to it: a copy would double its memory (one more write is nothing
    // next to the many a large body takes anyway).
    let tail: &[u8] = if body.len() > INLINE_BODY_MAX {
        &body
    } else {
        &[]
    };
    let mut up = loop {
        let (stream, reused) = match inst.state.idle.take() {
            Some(stream) => (stream, true),
            None => {
                // Boxed: a new connection is rare on a kept-alive path, and its
                // future would otherwise make every exchange's state larger.
                let fresh = Box::pin(transport.new_stream(&peer)).await;
                (fresh.map_err(ExchangeError::NotSent)?, false)
            }
        };
        // A client that goes away during a long prefill aborts the upstream
        // request (dropping the connection makes vLLM abort it). Watching costs
        // a read per request, so only answers slower than CLIENT_WATCH_AFTER pay
        // it. The client sends nothing until it has our answer, so the probe
        // cannot take a byte of its next request.
        let sent = tokio::select! {
            biased;
            r = send(stream, &peer, &request, tail, inst) => r,
            gone = watch_client(session) => return Err(client_gone(gone)),
        };
        match sent {
            Ok(up) => break up,
            // A kept-alive connection the instance has closed fails on first
            // use, before the request reached it: the others kept since are
            // likely closed too, so drop them and go again on a fresh one.
            Err(e) if reused && matches!(e.etype(), ConnectionClosed | ReadError | WriteError) => {
                tracing::debug!(upstream = %inst.url.base, error = %e, "stale kept-alive connection");
                inst.state.idle.clear();
            }
            Err(e) => return Err(failed(e)),
        }
    };
    let Some(upstream_resp) = up.resp_header() else {
        return Err(failed(Error::explain(
            InternalError,
            "no response header after reading it",
        )));
    };
    let status = upstream_resp.status.as_u16();
    let mut resp = downstream_response(upstream_resp, extra_headers).map_err(failed)?;
    // The request filters' response phase.
    on_response(&mut resp);
    session
        .write_response_header(Box::new(resp))
        .await
        .map_err(ExchangeError::Downstream)?;

    let mut ttft = None;
    loop {
        // While the body streams, a client that went away is seen when the next
        // chunk cannot be written (no probe read: once the body is done, the
        // client may already be sending its next request).
        match up.read_body_bytes().await {
            Ok(Some(chunk)) => {
                if ttft.is_none() && !chunk.is_empty() {
                    ttft = Some(start.elapsed());
                    prefill.take();
                }
                // If the client went away, dropping `up` closes the upstream
                // connection, which makes vLLM abort the generation.
                session
                    .write_response_body(chunk, false)
                    .await
                    .map_err(ExchangeError::Downstream)?;
            }
            Ok(None) => break,
            Err(error) => {
                return Err(ExchangeError::Failed {
                    status_sent: true,
                    error,
                })
            }
        }
    }
    session
        .finish_body()
        .await
        .map_err(ExchangeError::Downstream)?;
    if up.is_body_done() {
        up.respect_keepalive();
        if let Some(stream) = up.reuse().await {
            inst.state.idle.put(stream);
        }
    }
    Ok(Completed { status, ttft })
}

/// Write the request and read the response header.
async fn send(
    mut stream: pingora::protocols::Stream,
    peer: &pingora::prelude::HttpPeer,
    request: &[u8],
    tail: &[u8],
    inst: &PoolInstance,
) -> Result<Http1Session> {
    let timeout = inst.read_timeout;
    let written = async {
        stream.write_all(request).await?;
        if !tail.is_empty() {
            stream.write_all(tail).await?;
        }
        stream.flush().await
    };
    match tokio::time::timeout(timeout, written).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Error::because(
                WriteError,
                "writing the request upstream",
                e,
            ))
        }
        Err(_) => return Error::e_explain(WriteTimedout, "writing the request upstream"),
    }
    let mut up = Http1Session::new_with_options(stream, peer);
    // A hung engine is given up on at the first-byte deadline; once it has
    // answered, each read of the (streamed) body gets the inter-chunk timeout.
    up.read_timeout = Some(inst.first_byte_timeout);
    up.read_response().await?;
    up.read_timeout = Some(timeout);
    Ok(up)
}

/// Bodies up to this size leave in the same write as the header.
const INLINE_BODY_MAX: usize = 64 * 1024;

/// How long an exchange runs before the gateway starts watching for the client
/// going away.
const CLIENT_WATCH_AFTER: Duration = Duration::from_millis(20);

/// Resolves when the client closes its connection (watching from
/// CLIENT_WATCH_AFTER on).
async fn watch_client(session: &mut Session) -> Result<Option<Bytes>> {
    // Pingora's timer wheel: a tokio timer per request would wake the parked
    // time driver's thread each time.
    fast_timeout::fast_sleep(CLIENT_WATCH_AFTER).await;
    session.read_body_or_idle(true).await
}

/// The downstream idle read ended: the client closed the connection.
fn client_gone(r: Result<Option<Bytes>>) -> ExchangeError {
    ExchangeError::Downstream(match r {
        Err(e) => e,
        Ok(_) => Error::explain(
            ConnectionClosed,
            "client sent data while waiting for the response",
        ),
    })
}

fn failed(error: Box<Error>) -> ExchangeError {
    ExchangeError::Failed {
        status_sent: false,
        error,
    }
}

/// The request as it goes on the wire: the client's headers minus the
/// per-connection ones, our Host and Content-Length, then the body when it is
/// at most INLINE_BODY_MAX (a larger one is written after it, from where it is).
fn upstream_request_bytes(
    session: &Session,
    inst: &PoolInstance,
    request_headers: &[(&'static str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let down = session.req_header();
    let path = down.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let inline = body.len() <= INLINE_BODY_MAX;
    let body_room = if inline { body.len() } else { 0 };
    let mut buf = Vec::with_capacity(256 + body_room + down.headers.len() * 48);
    buf.extend_from_slice(down.method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(path.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in down.headers.iter() {
        // Our own headers are set by this gateway only.
        if !NOT_FORWARDED.contains(&name.as_str()) && !name.as_str().starts_with("x-cacheroute-") {
            buf.extend_from_slice(name.as_str().as_bytes());
            buf.extend_from_slice(b": ");
            buf.extend_from_slice(value.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
    }
    for (name, value) in request_headers {
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"host: ");
    buf.extend_from_slice(inst.host_header.as_bytes());
    buf.extend_from_slice(b"\r\ncontent-length: ");
    buf.extend_from_slice(body.len().to_string().as_bytes());
    buf.extend_from_slice(b"\r\n\r\n");
    if inline {
        buf.extend_from_slice(body);
    }
    buf
}

fn downstream_response(
    upstream: &ResponseHeader,
    extra: &[(&'static str, &str)],
) -> Result<ResponseHeader> {
    // Built from the header map alone, without Pingora's case-preserving name map:
    // cloning that map and keeping it in step on every insert (ours and Pingora's
    // date and connection) was a tenth of a plain request's instructions. Names go
    // out lowercase, as HTTP/2 sends them and HTTP/1.1 allows.
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = upstream.status;
    parts.version = upstream.version;
    parts.headers = upstream.headers.clone();
    parts.headers.remove(http::header::CONNECTION);
    parts.headers.remove(HeaderName::from_static("keep-alive"));
    // A gateway behind this one (role proxy) already said what it decided; its
    // answer is the more precise one. Engines never send these headers.
    for (k, v) in extra {
        // A static name skips parsing and lowercasing it per response.
        let name = HeaderName::from_static(k);
        if !parts.headers.contains_key(&name) {
            let value = http::HeaderValue::from_str(v)
                .or_err(InvalidHTTPHeader, "invalid x-cacheroute header value")?;
            parts.headers.insert(name, value);
        }
    }
    let mut resp = ResponseHeader::from(parts);
    // A reason phrase the engine chose (not the status's own) goes through.
    if let Some(reason) = upstream.get_reason_phrase() {
        if Some(reason) != upstream.status.canonical_reason() {
            resp.set_reason_phrase(Some(reason))?;
        }
    }
    Ok(resp)
}
