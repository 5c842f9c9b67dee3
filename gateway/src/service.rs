//! The service plane: the OpenAI-compatible API, as a Pingora `ProxyHttp`.
//!
//! Completion requests are answered entirely in `request_filter`: the whole
//! body is read and parsed before the upstream is chosen, then the exchange
//! runs through Pingora's pooled connector and the response streams back
//! chunk by chunk (Pingora cannot forward a pre-read body over 64 KiB through
//! its normal pipeline; research/pingora.md §3).

use crate::fleet::{Fleet, InflightGuard, InstanceMetrics, Pool, PoolInstance};
use crate::forward::{self, ExchangeError};
use crate::state::GatewayState;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use cacheroute_filters::openai::{ApiError, CompletionBody, Route};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as Session;
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Slow clients get this long between body chunks before the read fails.
const CLIENT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ServicePlane {
    pub state: Arc<GatewayState>,
}

/// Per-request state, for the `logging` phase.
pub struct ReqCtx {
    start: Instant,
    route: &'static str,
    status: u16,
    /// The instance that answered, if any.
    served_by: Option<Arc<InstanceMetrics>>,
    ttft: Option<Duration>,
}

#[async_trait]
impl HttpServerApp for ServicePlane {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: Session,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            // The client closed an idle keep-alive connection.
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "reading a request failed");
                return None;
            }
        }
        let keepalive = if *shutdown.borrow() { None } else { Some(60) };
        session.set_keepalive(keepalive);
        let mut ctx = ReqCtx {
            start: Instant::now(),
            route: "other",
            status: 0,
            served_by: None,
            ttft: None,
        };
        let result = self.route_request(&mut session, &mut ctx).await;
        self.record(&ctx, result.is_err());
        if let Err(e) = result {
            tracing::debug!(error = %e, "request ended early");
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(stream) => stream.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
            Err(_) => None,
        }
    }
}

impl ServicePlane {
    /// Metrics of one finished request. Successful completions use the
    /// instance's pre-resolved series; the rest look their labels up.
    fn record(&self, ctx: &ReqCtx, failed: bool) {
        let m = &self.state.metrics;
        // 499: the client went away before a response was written.
        let status = match (ctx.status, failed) {
            (0, true) => 499,
            (s, _) => s,
        };
        let route = InstanceMetrics::route_index(ctx.route);
        match (&ctx.served_by, route) {
            (Some(inst), Some(r)) if status == 200 => inst.ok[r].inc(),
            (served_by, _) => {
                let upstream = served_by.as_ref().map(|i| i.url.as_str()).unwrap_or("");
                m.requests
                    .with_label_values(&[ctx.route, status_label(status).as_ref(), upstream])
                    .inc();
            }
        }
        m.duration(ctx.route)
            .observe(ctx.start.elapsed().as_secs_f64());
        if let (Some(inst), Some(r), Some(ttft)) = (&ctx.served_by, route, ctx.ttft) {
            inst.ttft[r].observe(ttft.as_secs_f64());
        }
    }

    async fn route_request(&self, session: &mut Session, ctx: &mut ReqCtx) -> Result<()> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let (label, allowed) = match Route::from_path(&path) {
            Some(route) => (route.label(), http::Method::POST),
            None => match path.as_str() {
                "/v1/models" => ("models", http::Method::GET),
                "/health" => ("health", http::Method::GET),
                _ => return self.reject(session, ctx, ApiError::not_found(&path)).await,
            },
        };
        ctx.route = label;
        if method != allowed {
            let err = ApiError::method_not_allowed(method.as_str(), &path);
            return self.reject(session, ctx, err).await;
        }
        match Route::from_path(&path) {
            Some(route) => self.completion(session, ctx, route).await,
            None if label == "models" => {
                let body = models_json(&self.state.fleet.load());
                respond(session, ctx, 200, "application/json", body.into(), &[]).await
            }
            None => {
                let body = Bytes::from_static(b"{\"status\":\"ok\"}");
                respond(session, ctx, 200, "application/json", body, &[]).await
            }
        }
    }

    async fn reject(&self, session: &mut Session, ctx: &mut ReqCtx, err: ApiError) -> Result<()> {
        let allow = match (err.code, ctx.route) {
            ("method_not_allowed", "chat" | "completions") => Some("POST"),
            ("method_not_allowed", _) => Some("GET"),
            _ => None,
        };
        let headers: &[(&str, &str)] = match allow {
            Some(a) => &[("allow", a)],
            None => &[],
        };
        respond(
            session,
            ctx,
            err.status,
            "application/json",
            err.to_json().into(),
            headers,
        )
        .await
    }

    async fn completion(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        route: Route,
    ) -> Result<()> {
        // Every request keeps the fleet it started with, through reloads.
        let fleet = self.state.fleet.load_full();
        let limit = fleet.config.gateway.max_body_bytes;
        let body = match read_body(session, limit).await? {
            Ok(b) => b,
            Err(err) => return self.reject(session, ctx, err).await,
        };
        let parsed = match CompletionBody::parse(route, &body) {
            Ok(p) => p,
            Err(err) => return self.reject(session, ctx, err).await,
        };
        let model = parsed.model();
        let pools = fleet.pools_for(model);
        if pools.is_empty() {
            return self
                .reject(session, ctx, ApiError::model_not_found(model))
                .await;
        }
        self.forward(session, ctx, &fleet, pools, model, body).await
    }

    /// Send the request to an instance, retrying on others while it could not
    /// be sent, and stream the answer back.
    async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        fleet: &Fleet,
        pools: &[usize],
        model: &str,
        body: Bytes,
    ) -> Result<()> {
        let metrics = &self.state.metrics;
        let max_retries = pools
            .iter()
            .map(|&p| fleet.pools[p].settings.max_retries)
            .max()
            .unwrap_or(0);
        let mut tried: Vec<(usize, usize)> = Vec::new();
        let mut connect_errors: Vec<String> = Vec::new();
        while tried.len() <= max_retries {
            let Some((pool, idx)) = choose(fleet, pools, &tried) else {
                break;
            };
            tried.push((pool, idx));
            let pool_ref: &Pool = &fleet.pools[pool];
            let inst: &PoolInstance = &pool_ref.instances[idx];
            let _inflight = InflightGuard::new(inst);
            let headers = [
                ("x-cacheroute-instance", inst.url.base.as_str()),
                ("x-cacheroute-pool", pool_ref.name.as_str()),
            ];
            ctx.served_by = Some(inst.metrics.clone());
            match forward::exchange(
                &self.state.transport,
                session,
                inst,
                body.clone(),
                &headers,
                ctx.start,
            )
            .await
            {
                Ok(done) => {
                    ctx.status = done.status;
                    ctx.ttft = done.ttft;
                    inst.state.clear_connect_failure();
                    return Ok(());
                }
                Err(ExchangeError::NotSent(e)) => {
                    inst.state.mark_connect_failure();
                    metrics
                        .upstream_errors
                        .with_label_values(&[&inst.url.base, "connect"])
                        .inc();
                    metrics
                        .retries
                        .with_label_values(&[&pool_ref.name, &inst.url.base])
                        .inc();
                    tracing::warn!(upstream = %inst.url.base, error = %e, "request not sent; trying another instance");
                    connect_errors.push(format!("{}: {}", inst.url.base, e));
                }
                Err(ExchangeError::Failed {
                    status_sent: true,
                    error,
                }) => {
                    // The response had started: the stream is cut, nothing
                    // else can be said to the client.
                    metrics
                        .upstream_errors
                        .with_label_values(&[&inst.url.base, "stream"])
                        .inc();
                    ctx.status = 200;
                    return Err(error);
                }
                Err(ExchangeError::Failed {
                    status_sent: false,
                    error,
                }) => {
                    let timeout = matches!(error.etype(), ReadTimedout | WriteTimedout);
                    let kind = if timeout { "timeout" } else { "failed" };
                    metrics
                        .upstream_errors
                        .with_label_values(&[&inst.url.base, kind])
                        .inc();
                    let api = if timeout {
                        ApiError::upstream_timeout(format!(
                            "{} did not answer in time",
                            inst.url.base
                        ))
                    } else {
                        ApiError::upstream_failed(format!("{}: {}", inst.url.base, error))
                    };
                    return self.reject(session, ctx, api).await;
                }
                Err(ExchangeError::Downstream(e)) => return Err(e),
            }
        }
        ctx.served_by = None;
        let mut err = ApiError::no_healthy_upstream(model);
        if !connect_errors.is_empty() {
            err.message = format!(
                "{}; could not connect to: {}",
                err.message,
                connect_errors.join("; ")
            );
        }
        self.reject(session, ctx, err).await
    }
}

/// The next (pool, instance) to try: the first pool, in config order, that
/// still has an untried healthy instance.
fn choose(fleet: &Fleet, pools: &[usize], tried: &[(usize, usize)]) -> Option<(usize, usize)> {
    pools.iter().find_map(|&p| {
        fleet.pools[p]
            .choose(|i| tried.contains(&(p, i)))
            .map(|i| (p, i))
    })
}

/// Read the whole request body, refusing it once it passes `limit` bytes.
async fn read_body(
    session: &mut Session,
    limit: usize,
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
    while let Some(chunk) = session.read_request_body().await? {
        if buf.len() + chunk.len() > limit {
            return Ok(Err(ApiError::body_too_large(limit)));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Ok(buf.freeze()))
}

fn models_json(fleet: &Fleet) -> Vec<u8> {
    let data: Vec<_> = fleet
        .models
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m,
                "object": "model",
                "created": 0,
                "owned_by": "cacheroute",
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"object": "list", "data": data})).unwrap_or_default()
}

/// Write a complete response with a body, keeping the connection alive.
pub async fn respond(
    session: &mut Session,
    ctx: &mut ReqCtx,
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
fn status_label(status: u16) -> std::borrow::Cow<'static, str> {
    match status {
        200 => "200".into(),
        400 => "400".into(),
        404 => "404".into(),
        405 => "405".into(),
        413 => "413".into(),
        499 => "499".into(),
        502 => "502".into(),
        503 => "503".into(),
        504 => "504".into(),
        other => other.to_string().into(),
    }
}
