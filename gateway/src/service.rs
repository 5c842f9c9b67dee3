//! The service plane: the OpenAI-compatible API, as a Pingora `HttpServerApp`.
//!
//! A completion request is read and parsed whole, then runs through the request
//! filters ([`crate::pipeline`]: knowledge, pool, KDN, layout; then per attempt
//! injection and admission), and the exchange runs through Pingora's connector
//! while the response streams back chunk by chunk (Pingora cannot forward a
//! pre-read body over 64 KiB through its proxy pipeline). Filters decide; this
//! module does the I/O of a request's life (head, routes, body, answer), and
//! [`crate::dispatch`] that of its attempts: pick an instance, run the attempt's
//! filters, send, retry on another instance while the request could not be sent.

use crate::conn::{
    check_head, head_error, lingering_close, read_body, respond, status_label, wait_next_request,
    HeadLimits, HeadRefusal, COLLECT_AFTER_BYTES, KEEPALIVE_SECS,
};
use crate::fleet::InstanceMetrics;
use crate::pipeline::{Done, Incoming, Reply, RequestCtx};
use crate::state::GatewayState;
use async_trait::async_trait;
use bytes::Bytes;
use cacheroute_decisions::openai::{ApiError, CompletionBody, Route};
use cacheroute_decisions::scheduler;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as Session;
use pingora::server::ShutdownWatch;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct ServicePlane {
    pub state: Arc<GatewayState>,
}

/// Per-request state, for the metrics and the filters' done phase.
pub struct ReqCtx {
    pub(crate) start: Instant,
    pub(crate) route: &'static str,
    pub(crate) status: u16,
    /// The instance that answered, if any.
    pub(crate) served_by: Option<Arc<InstanceMetrics>>,
    pub(crate) ttft: Option<Duration>,
    /// The filters' context of a completion request (its body parsed).
    /// Boxed: it is the bulk of a request's state, and moves as a pointer.
    pub(crate) pipe: Option<Box<RequestCtx>>,
    /// The upstream exchange completed.
    pub(crate) exchanged: bool,
    /// The body's framing was broken or it came too slowly: the answer is
    /// the last thing on this connection.
    pub(crate) body_refused: bool,
}

#[async_trait]
impl HttpServerApp for ServicePlane {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: Session,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let limits = HeadLimits::of(&self.state.fleet.load().config.gateway);
        // Pipelined requests (RFC 9112 §9.3.2) are answered one after the
        // other, in order: Pingora carries the bytes read past this request
        // over to the next session on the connection.
        session.set_pipelining_enabled(true);
        // The header's deadline runs from its first byte (a kept-alive
        // connection's idle wait happened before this session; see
        // `wait_next_request`) or from the accept.
        let head = fast_timeout::fast_timeout(limits.header_timeout, session.read_request()).await;
        let refused = match head {
            Ok(Ok(true)) => check_head(&session, &limits),
            // The client closed an idle keep-alive connection.
            Ok(Ok(false)) => return None,
            Ok(Err(e)) => head_error(&e),
            Err(_) => Some(HeadRefusal::timeout(limits.header_timeout)),
        };
        if let Some(refusal) = refused {
            self.refuse_head(&mut session, refusal).await;
            lingering_close(session).await;
            return None;
        }
        // The request's own state lives in this block only: the connection's
        // next steps (linger, finish, wait for the next request) do not carry it.
        // Each request's future is moved into a box by Pingora, so its size is
        // copied per request.
        let _active = ActiveRequest::new(&self.state);
        let next = {
            let keepalive = if *shutdown.borrow() {
                None
            } else {
                Some(KEEPALIVE_SECS)
            };
            session.set_keepalive(keepalive);
            let mut ctx = ReqCtx {
                start: Instant::now(),
                route: "other",
                status: 0,
                served_by: None,
                ttft: None,
                pipe: None,
                exchanged: false,
                body_refused: false,
            };
            let result = self.route_request(&mut session, &mut ctx).await;
            let status = final_status(&ctx, result.is_err());
            if let Some(mut pipe) = ctx.pipe.take() {
                let done = Done {
                    status,
                    instance: ctx.served_by.as_ref().map(|i| i.url.as_str()),
                    ttft: ctx.ttft,
                    exchanged: ctx.exchanged,
                };
                let chain = pipe.fleet.chain.clone();
                chain.done(&mut pipe, &done, &*self.state);
            }
            self.record(&ctx, status);
            let body_refused = ctx.body_refused;
            drop(ctx);
            if session.body_bytes_read() > COLLECT_AFTER_BYTES {
                // A large body's buffers are freed by now (the request's state
                // went with `ctx`); have mimalloc return them to the OS at once
                // rather than when this thread next allocates enough.
                // SAFETY: mi_collect only walks mimalloc's own heaps.
                unsafe { libmimalloc_sys::mi_collect(true) };
            }
            // Ok(true): the body's framing was broken or it came too slowly,
            // so the answer is the last thing on this connection.
            result.map(|()| body_refused)
        };
        match next {
            Err(e) => {
                tracing::debug!(error = %e, "request ended early");
                return None;
            }
            Ok(true) => {
                lingering_close(session).await;
                return None;
            }
            Ok(false) => {}
        }
        let settings = HttpPersistentSettings::for_session(&session);
        let reusable = session.finish().await.ok()??;
        wait_next_request(reusable, settings).await
    }
}

/// The status a request ended with; 499: the client went away before a response
/// was written.
fn final_status(ctx: &ReqCtx, failed: bool) -> u16 {
    match (ctx.status, failed) {
        (0, true) => 499,
        (s, _) => s,
    }
}

impl ServicePlane {
    /// Answer a refused request header with OpenAI error JSON and close.
    async fn refuse_head(&self, session: &mut Session, r: HeadRefusal) {
        let err = ApiError::new(r.status, "invalid_request_error", r.code, r.message);
        let body = Bytes::from(err.to_json());
        let written = async {
            let mut resp = ResponseHeader::build(r.status, Some(3))?;
            resp.insert_header("content-type", "application/json")?;
            resp.insert_header("content-length", body.len().to_string())?;
            // Pingora closes the connection after an error response.
            session.write_error_response(resp, body).await
        };
        if let Err(e) = written.await {
            tracing::debug!(error = %e, "answering a refused request header failed");
        }
        self.state
            .metrics
            .requests
            .with_label_values(&["other", status_label(r.status).as_ref(), ""])
            .inc();
    }

    /// Metrics of one finished request. Successful completions use the
    /// instance's pre-resolved series; the rest look their labels up.
    fn record(&self, ctx: &ReqCtx, status: u16) {
        let m = &self.state.metrics;
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
                _ => {
                    // vLLM's other routes pass through; a model card is ours.
                    if let Some(r) = crate::routes::lookup(&path) {
                        return Box::pin(self.pass_through(session, ctx, r)).await;
                    }
                    if let Some(id) = path.strip_prefix("/v1/models/") {
                        return self.model_card(session, ctx, id).await;
                    }
                    return self.reject(session, ctx, ApiError::not_found(&path)).await;
                }
            },
        };
        ctx.route = label;
        if method != allowed {
            let err = ApiError::method_not_allowed(method.as_str(), &path);
            return self.reject(session, ctx, err).await;
        }
        match Route::from_path(&path) {
            // Boxed, so that the request's outer future, which Pingora moves
            // twice per request, stays small: the completion's large state
            // is moved once.
            Some(route) => Box::pin(self.completion(session, ctx, route)).await,
            None if label == "models" => self.models(session, ctx).await,
            None => {
                let body = Bytes::from_static(b"{\"status\":\"ok\"}");
                respond(session, ctx, 200, "application/json", body, &[]).await
            }
        }
    }

    pub(crate) async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        err: ApiError,
    ) -> Result<()> {
        let allow = match (err.code, ctx.route) {
            ("method_not_allowed", "chat" | "completions") => Some("POST"),
            ("method_not_allowed", _) => Some("GET"),
            _ => None,
        };
        let headers: &[(&str, &str)] = match allow {
            Some(a) => &[("allow", a)],
            None => &[],
        };
        self.reject_with(session, ctx, err, headers).await
    }

    pub(crate) async fn reject_with(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        err: ApiError,
        headers: &[(&str, &str)],
    ) -> Result<()> {
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

    /// Answer a filter's error, with `Retry-After` when it says when to retry.
    pub(crate) async fn reply(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        r: Reply,
    ) -> Result<()> {
        match r.retry_after {
            Some(secs) => {
                let ra = secs.to_string();
                self.reject_with(session, ctx, r.error, &[("retry-after", ra.as_str())])
                    .await
            }
            None => self.reject(session, ctx, r.error).await,
        }
    }

    async fn completion(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        route: Route,
    ) -> Result<()> {
        // Every request keeps the fleet (and the chain) it started with, through reloads.
        let fleet = self.state.fleet.load_full();
        let gw = &fleet.config.gateway;
        let deadline = Duration::from_millis(gw.body_timeout_ms);
        let raw = match read_body(session, gw.max_body_bytes, deadline).await? {
            Ok(b) => b,
            Err(err) => {
                ctx.body_refused = matches!(err.status, 400 | 408);
                return self.reject(session, ctx, err).await;
            }
        };
        let mut body = match parse_body(route, &raw).await {
            Ok(b) => b,
            Err(err) => return self.reject(session, ctx, err).await,
        };
        let chain = fleet.chain.clone();
        let mut pipe = Box::new(RequestCtx::new(
            fleet,
            route,
            body.model().to_string(),
            ctx.start,
        ));
        let passed = {
            let mut req = Incoming {
                header: session.req_header(),
                body: &mut body,
            };
            chain.request(&mut pipe, &mut req, &*self.state).await
        };
        let result = match passed {
            Err(r) => self.reply(session, ctx, r).await,
            Ok(()) => {
                pipe.id = self.state.next_request_id.fetch_add(1, Ordering::Relaxed);
                let upstream_body = seal(&mut pipe, body, raw);
                self.forward(session, ctx, &mut pipe, upstream_body).await
            }
        };
        ctx.pipe = Some(pipe);
        result
    }
}

/// Bodies up to this size are parsed on the worker thread (well under a
/// millisecond); larger ones on the blocking pool, so that one large body does
/// not hold up the other requests on the worker.
const PARSE_INLINE_MAX: usize = 64 << 10;

/// Parse a completion body, off the worker thread when it is large.
async fn parse_body(route: Route, raw: &Bytes) -> std::result::Result<CompletionBody, ApiError> {
    if raw.len() <= PARSE_INLINE_MAX {
        return CompletionBody::parse(route, raw);
    }
    let raw = raw.clone();
    tokio::task::spawn_blocking(move || CompletionBody::parse(route, &raw))
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::new(
                500,
                "server_error",
                "internal_error",
                format!("parsing the body failed: {e}"),
            ))
        })
}

/// The body as it goes upstream: serialised again only when a filter changed it.
/// Also what the attempts need of it: the prompt's size, the parsed body for
/// `kv_transfer_params`, the prompt's text for pickers that ask.
fn seal(pipe: &mut RequestCtx, body: CompletionBody, raw: Bytes) -> Bytes {
    let bytes = if pipe.rewritten {
        Bytes::from(body.to_json())
    } else {
        raw
    };
    // Tokens of the request without its leading block (≈ 4 bytes per token).
    pipe.prompt_tokens = (bytes.len().saturating_sub(pipe.knowledge_bytes) / 4) as u64;
    let fleet = &pipe.fleet;
    if pipe.ids.is_empty()
        && pipe
            .pool_order
            .iter()
            .any(|&p| fleet.pools[p].picker.wants_prompt_text())
    {
        pipe.prompt_text = Some(prompt_text(&body));
    }
    if fleet.config.proxy.kv_transfer_params && pipe.leading_applied {
        pipe.parsed = Some(body);
    }
    bytes
}

/// Counts a request in [`GatewayState::active_requests`] while it is handled
/// (answer streamed and finished included).
struct ActiveRequest<'a>(&'a GatewayState);

impl<'a> ActiveRequest<'a> {
    fn new(state: &'a GatewayState) -> Self {
        state.active_requests.fetch_add(1, Ordering::AcqRel);
        Self(state)
    }
}

impl Drop for ActiveRequest<'_> {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The text a prompt's prefix tree sees: the chat's messages in order, or the prompt.
fn prompt_text(body: &CompletionBody) -> String {
    match body {
        CompletionBody::Chat(c) => {
            let mut s = String::new();
            for m in &c.messages {
                s.push_str(&m.role);
                s.push('\n');
                s.push_str(&m.text());
                s.push('\n');
            }
            s
        }
        CompletionBody::Completions(_) => scheduler::query_text(body),
    }
}
