//! One upstream exchange: send a pre-read request body to an instance over
//! Pingora's pooled connector and stream the response back to the client.

use crate::fleet::PoolInstance;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::Session;
use std::time::{Duration, Instant};

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
    /// Nothing reached the instance (connect failed, or a pooled connection
    /// turned out dead before the request was taken): safe to retry elsewhere.
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

pub async fn exchange(
    connector: &Connector,
    session: &mut Session,
    inst: &PoolInstance,
    body: Bytes,
    extra_headers: &[(&str, &str)],
    start: Instant,
) -> std::result::Result<Completed, ExchangeError> {
    let peer = inst.peer();
    let (mut up, reused) = connector
        .get_http_session(&peer)
        .await
        .map_err(ExchangeError::NotSent)?;
    let read_timeout = Some(inst.read_timeout);
    up.set_read_timeout(read_timeout);
    up.set_write_timeout(read_timeout);

    let req = upstream_request(session, inst, body.len()).map_err(ExchangeError::NotSent)?;
    // A pooled connection the instance has closed fails on first use: the
    // request never reached it, so it is safe to go again elsewhere.
    let sent = async {
        up.write_request_header(Box::new(req)).await?;
        up.write_request_body(body, true).await?;
        up.finish_request_body().await?;
        up.read_response_header().await
    }
    .await;
    if let Err(e) = sent {
        let stale = reused && matches!(e.etype(), ConnectionClosed | ReadError | WriteError);
        return Err(if stale {
            ExchangeError::NotSent(e)
        } else {
            ExchangeError::Failed {
                status_sent: false,
                error: e,
            }
        });
    }
    let Some(upstream_resp) = up.response_header() else {
        return Err(ExchangeError::Failed {
            status_sent: false,
            error: Error::explain(InternalError, "no response header after reading it"),
        });
    };
    let status = upstream_resp.status.as_u16();
    let resp = downstream_response(upstream_resp, extra_headers).map_err(|error| {
        ExchangeError::Failed {
            status_sent: false,
            error,
        }
    })?;
    session
        .write_response_header(Box::new(resp), false)
        .await
        .map_err(ExchangeError::Downstream)?;

    let mut ttft = None;
    loop {
        match up.read_response_body().await {
            Ok(Some(chunk)) => {
                if ttft.is_none() && !chunk.is_empty() {
                    ttft = Some(start.elapsed());
                }
                // If the client went away, dropping `up` closes the upstream
                // connection, which makes vLLM abort the generation.
                session
                    .write_response_body(Some(chunk), false)
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
        .write_response_body(None, true)
        .await
        .map_err(ExchangeError::Downstream)?;
    if up.response_done() {
        connector
            .release_http_session(up, &peer, peer.options.idle_timeout)
            .await;
    }
    Ok(Completed { status, ttft })
}

fn upstream_request(
    session: &Session,
    inst: &PoolInstance,
    body_len: usize,
) -> Result<RequestHeader> {
    let down = session.req_header();
    let path = down.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = RequestHeader::build(
        down.method.clone(),
        path.as_bytes(),
        Some(down.headers.len() + 3),
    )?;
    for (name, value) in down.headers.iter() {
        if !NOT_FORWARDED.contains(&name.as_str()) {
            req.append_header(name.clone(), value.clone())?;
        }
    }
    req.insert_header("host", format!("{}:{}", inst.url.host, inst.url.port))?;
    req.insert_header("content-length", body_len.to_string())?;
    if let Some(client) = session.client_addr().and_then(|a| a.as_inet()) {
        req.append_header("x-forwarded-for", client.ip().to_string())?;
    }
    Ok(req)
}

fn downstream_response(
    upstream: &ResponseHeader,
    extra: &[(&str, &str)],
) -> Result<ResponseHeader> {
    let mut resp = upstream.clone();
    resp.remove_header("connection");
    resp.remove_header("keep-alive");
    for (k, v) in extra {
        resp.insert_header(k.to_string(), *v)?;
    }
    Ok(resp)
}
