//! The service plane: the OpenAI-compatible API, as a Pingora `HttpServerApp`.
//!
//! A completion request is read and parsed whole, then the scheduler filter
//! ([`ServicePlane::plan`]: knowledge, pool, KDN) and the proxy filter (admission,
//! instance, injection) decide, and the exchange runs through Pingora's
//! connector while the response streams back chunk by chunk (Pingora cannot
//! forward a pre-read body over 64 KiB through its proxy pipeline;
//! research/pingora.md §3). Filters decide; this module does the I/O.

use crate::admission::{Refused, Slot};
use crate::config::Role;
use crate::decisions::{DecisionRecord, Outcome};
use crate::fleet::{Fleet, InflightGuard, InstanceMetrics, Pool, PoolInstance, PrefillGuard};
use crate::forward::{self, ExchangeError};
use crate::headers;
use crate::knowledge::{self, AgentLive, Catalog};
use crate::kv_inject::{self, InjectState};
use crate::proxy::{self, KvPlan};
use crate::retrieval;
use crate::state::GatewayState;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use cacheroute_filters::balance::BalancePolicy;
use cacheroute_filters::injection::{InjectionDecision, InjectionMode, ReleasePolicy};
use cacheroute_filters::layout::{self, Applied};
use cacheroute_filters::openai::{ApiError, CompletionBody, Route};
use cacheroute_filters::prompt;
use cacheroute_filters::scheduler::{
    self, take_extensions, InjectionPreference, KnowledgeRequirement, SchedulingDecision,
};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as Session;
use pingora::server::ShutdownWatch;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
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
    pub(crate) route: &'static str,
    status: u16,
    /// The instance that answered, if any.
    served_by: Option<Arc<InstanceMetrics>>,
    ttft: Option<Duration>,
    /// The filters' decisions for a completion request.
    pub(crate) plan: Option<Arc<Plan>>,
    /// The proxy filter's injection decision for the attempt that answered.
    injection: Option<InjectionDecision>,
    /// How the KV got there, or why it did not.
    kv_note: Option<String>,
    /// What happened on the way (fallbacks).
    notes: Vec<String>,
    /// The body's framing was broken or it came too slowly: the answer is
    /// the last thing on this connection.
    pub(crate) body_refused: bool,
}

/// What the filters decided for one completion request.
pub struct Plan {
    pub id: u64,
    pub role: Role,
    pub hops: u32,
    pub model: String,
    /// The body as it goes upstream (extensions removed, knowledge laid out).
    pub body: Bytes,
    /// The parsed body, kept when KV-mode requests carry `kv_transfer_params`.
    pub parsed: Option<CompletionBody>,
    /// Pools to try, the chosen one first.
    pub pool_order: Vec<usize>,
    /// Required knowledge ids, the leading (prefix) block first.
    pub ids: Vec<String>,
    pub decision: Arc<SchedulingDecision>,
    /// Headers added to the upstream request.
    pub request_headers: Vec<(&'static str, String)>,
    /// The leading block's registered prefix leads the prompt (KV can serve it).
    pub leading_applied: bool,
    /// Tokens of the leading block's registered prefix.
    pub knowledge_tokens: u64,
    /// Estimated tokens of the rest of the prompt.
    pub prompt_tokens: u64,
    pub client_injection: InjectionPreference,
    /// The prompt's text, for `prefix_affinity` (requests without knowledge).
    pub prefix_text: Option<String>,
    pub notes: Vec<String>,
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
        let _active = ActiveRequest::new(&self.state);
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
            plan: None,
            injection: None,
            kv_note: None,
            notes: Vec::new(),
            body_refused: false,
        };
        let result = self.route_request(&mut session, &mut ctx).await;
        self.record(&ctx, result.is_err());
        if session.body_bytes_read() > COLLECT_AFTER_BYTES {
            // A large body's buffers are freed by now (the request's state
            // goes with `ctx`); have mimalloc return them to the OS at once
            // rather than when this thread next allocates enough.
            drop(ctx.plan.take());
            // SAFETY: mi_collect only walks mimalloc's own heaps.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
        if let Err(e) = result {
            tracing::debug!(error = %e, "request ended early");
            return None;
        }
        if ctx.body_refused {
            lingering_close(session).await;
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        let reusable = session.finish().await.ok()??;
        wait_next_request(reusable, settings).await
    }
}

/// Close a connection after an error answer without losing that answer: stop
/// sending, then read and drop what the client still sends (bounded), so that
/// closing with unread bytes does not reset the connection before the client
/// has read the answer (RFC 9112 §9.6).
async fn lingering_close(session: Session) {
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
        let mut buf = [0u8; 16 * 1024];
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
const COLLECT_AFTER_BYTES: usize = 4 << 20;

/// Seconds a kept-alive connection may stay idle between requests.
const KEEPALIVE_SECS: u64 = 60;

/// Wait on a kept-alive connection for the first bytes of its next request and
/// hand them to the next session as its prefix, so that the next header's
/// deadline counts from its first byte, not from the end of the idle wait. It
/// is the read Pingora would have made itself: no extra syscall.
async fn wait_next_request(
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
struct HeadLimits {
    header_timeout: Duration,
    max_header_bytes: usize,
    max_uri_bytes: usize,
}

impl HeadLimits {
    fn of(gw: &crate::config::GatewaySection) -> HeadLimits {
        HeadLimits {
            header_timeout: Duration::from_millis(gw.header_timeout_ms),
            max_header_bytes: gw.max_header_bytes,
            max_uri_bytes: gw.max_uri_bytes,
        }
    }
}

/// A request header the gateway answers with an error, then closes.
struct HeadRefusal {
    status: u16,
    code: &'static str,
    message: String,
}

impl HeadRefusal {
    fn timeout(t: Duration) -> HeadRefusal {
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
fn check_head(session: &Session, limits: &HeadLimits) -> Option<HeadRefusal> {
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
fn head_error(e: &Error) -> Option<HeadRefusal> {
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
        if let Some(plan) = &ctx.plan {
            self.record_decision(ctx, plan, status);
        }
    }

    /// Count and keep a completed request's decisions.
    fn record_decision(&self, ctx: &ReqCtx, plan: &Plan, status: u16) {
        let d = &plan.decision;
        let source = match d.knowledge {
            KnowledgeRequirement::None => 0,
            KnowledgeRequirement::Explicit { .. } => 1,
            KnowledgeRequirement::Retrieved { .. } => 2,
        };
        let fleet = self.state.fleet.load();
        if let Some(pool) = fleet
            .pools
            .iter()
            .find(|p| Some(p.name.as_str()) == d.pool.as_deref())
        {
            pool.scheduled[source][usize::from(d.kdn.is_some())].inc();
        }
        let keep = fleet.config.gateway.decision_history;
        let record = DecisionRecord {
            id: plan.id,
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            route: ctx.route,
            role: plan.role.as_str(),
            hops: plan.hops,
            scheduling: plan.decision.clone(),
            injection: ctx.injection.clone(),
            outcome: Outcome {
                status,
                instance: ctx.served_by.as_ref().map(|i| i.url.clone()),
                ttft_ms: ctx.ttft.map(|t| t.as_secs_f64() * 1e3),
                duration_ms: ctx.start.elapsed().as_secs_f64() * 1e3,
                kv: ctx.kv_note.clone(),
                notes: plan.notes.iter().chain(&ctx.notes).cloned().collect(),
            },
        };
        self.state.decisions.push(record, keep);
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
                        return self.pass_through(session, ctx, r).await;
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
            Some(route) => self.completion(session, ctx, route).await,
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

    async fn completion(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        route: Route,
    ) -> Result<()> {
        // Every request keeps the fleet it started with, through reloads.
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
        let plan = match self.plan(session, &fleet, route, raw).await {
            Ok(p) => p,
            Err(err) => return self.reject(session, ctx, err).await,
        };
        ctx.plan = Some(Arc::new(plan));
        self.forward(session, ctx, &fleet).await
    }

    /// The scheduler filter: parse, take the extensions out, find the knowledge,
    /// choose the pool and the KDN, and lay the knowledge out in the body.
    async fn plan(
        &self,
        session: &Session,
        fleet: &Fleet,
        route: Route,
        raw: Bytes,
    ) -> std::result::Result<Plan, ApiError> {
        let gw = &fleet.config.gateway;
        let req = session.req_header();
        let hops = header_str(req, headers::HOPS)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if hops >= gw.max_hops {
            return Err(ApiError::loop_detected(hops, gw.max_hops));
        }
        let mut body = CompletionBody::parse(route, &raw)?;
        let had_extensions = ["RAG", "knowledge_ids", "injection"]
            .iter()
            .any(|k| body.extra_mut().contains_key(*k));
        let mut ext = take_extensions(body.extra_mut())?;
        let model = body.model().to_string();
        let pools = fleet.pools_for(&model);
        if pools.is_empty() {
            return Err(ApiError::model_not_found(&model));
        }
        let role = gw.role;
        // A proxy behind a scheduler trusts the decision in the headers, from a
        // scheduler that proves it is one; a client's are ignored.
        let peer = req.headers.get(headers::PEER).map(|v| v.as_bytes());
        let trusted = cacheroute_kdn::auth::secret_matches(peer, &gw.peer_token);
        let upstream = if role == Role::Proxy && hops > 0 && trusted {
            UpstreamDecision::from_headers(req)?
        } else {
            None
        };
        let catalog = self.state.knowledge.catalog.load();
        let pool_refs: Vec<&Pool> = pools.iter().map(|&p| &fleet.pools[p]).collect();
        let requirement = match &upstream {
            Some(u) => {
                ext.injection = u.injection;
                if u.knowledge.is_empty() {
                    KnowledgeRequirement::None
                } else {
                    KnowledgeRequirement::Explicit {
                        ids: u.knowledge.clone(),
                    }
                }
            }
            None => {
                retrieval::requirement(
                    &self.state.http,
                    &fleet.config.knowledge,
                    &fleet.config.scheduler,
                    pool_refs.iter().any(|p| p.rag_always),
                    &ext,
                    &catalog,
                    &body,
                )
                .await?
            }
        };
        let ids = requirement.ids();
        let mut pool_views = Vec::new();
        let mut decision = if ids.is_empty() && pool_refs.len() == 1 {
            // Nothing to weigh: the plain-proxy path stays cheap.
            SchedulingDecision {
                model: model.clone(),
                knowledge: requirement.clone(),
                pool: Some(pool_refs[0].name.clone()),
                kdn: None,
                reason: "the only pool serving the model; no knowledge required".into(),
                window_overridden: false,
                kdn_candidates: Vec::new(),
                pool_candidates: Vec::new(),
            }
        } else {
            let kdns = self.state.knowledge.kdns.load();
            let agents = self.state.knowledge.agents.load();
            let kdn_views = knowledge::kdn_views(&kdns, &catalog, &ids, &model, &pool_refs);
            pool_views = pool_refs
                .iter()
                .map(|p| {
                    knowledge::pool_view(p, &catalog, &agents, &self.state.injections, &ids, &model)
                })
                .collect();
            scheduler::decide(
                &fleet.config.scheduler,
                &requirement,
                &model,
                &kdn_views,
                &pool_views,
            )
        };
        if let Some(pool) = upstream.as_ref().and_then(|u| u.pool.as_deref()) {
            if pool_refs.iter().any(|p| p.name == pool) {
                decision.pool = Some(pool.to_string());
                decision.kdn = upstream.as_ref().and_then(|u| u.kdn.clone());
                decision.reason = format!("pool {pool} chosen by the upstream scheduler");
            }
        }
        // The chosen pool first, then the others serving the model (for retries).
        let mut pool_order: Vec<usize> = pools.to_vec();
        if let Some(chosen) = &decision.pool {
            if let Some(pos) = pool_order
                .iter()
                .position(|&p| fleet.pools[p].name == *chosen)
            {
                let p = pool_order.remove(pos);
                pool_order.insert(0, p);
            }
        }
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let mut notes = Vec::new();
        let mut request_headers = vec![(headers::HOPS, (hops + 1).to_string())];
        let mut knowledge_tokens = 0;
        let mut knowledge_bytes = 0;
        if role == Role::Scheduler {
            if !gw.peer_token.is_empty() {
                request_headers.push((headers::PEER, gw.peer_token.clone()));
            }
            // The proxy behind lays the knowledge out; it learns it from the headers.
            request_headers.push((
                headers::KNOWLEDGE,
                headers::encode_ids(ids.iter().map(String::as_str)),
            ));
            if let Some(pool) = &decision.pool {
                request_headers.push((headers::POOL, pool.clone()));
            }
            request_headers.push((
                headers::KDN,
                decision.kdn.clone().unwrap_or_else(|| "none".into()),
            ));
            request_headers.push((
                headers::INJECTION_PREFERENCE,
                preference_name(ext.injection).into(),
            ));
        }
        let mut ids = ids;
        let mut leading_applied = false;
        if role != Role::Scheduler && !ids.is_empty() {
            let resident = decision
                .pool
                .as_deref()
                .and_then(|n| pool_views.iter().find(|v| v.name == n))
                .map(|v| &v.resident);
            lead_with_cheapest(
                &mut ids,
                &catalog,
                &model,
                resident,
                decision.kdn.as_deref(),
            );
            let (leading, rest) = knowledge_texts(&catalog, &ids, &model, &mut notes);
            let rest_refs: Vec<&str> = rest.iter().map(String::as_str).collect();
            let template = fleet.config.proxy.template_of(&model);
            match layout::apply_knowledge(&mut body, template, &leading.content, &rest_refs) {
                Applied::Prefix => {
                    knowledge_tokens = leading.tokens;
                    knowledge_bytes = leading.content.len();
                    leading_applied = leading.registered;
                }
                Applied::Nothing => {}
                Applied::TokenPrompt => {
                    notes.push("token-id prompt: knowledge not added".to_string())
                }
            }
        }
        let rewritten = had_extensions || (role != Role::Scheduler && !ids.is_empty());
        let body_bytes = if rewritten {
            Bytes::from(body.to_json())
        } else {
            raw
        };
        // Tokens of the request without its leading block (≈ 4 bytes per token).
        let prompt_tokens = (body_bytes.len().saturating_sub(knowledge_bytes) / 4) as u64;
        let keep_body = fleet.config.proxy.kv_transfer_params && leading_applied;
        let prefix_text = (ids.is_empty()
            && pool_order
                .iter()
                .any(|&p| fleet.pools[p].settings.policy == BalancePolicy::PrefixAffinity))
        .then(|| prefix_text(&body));
        Ok(Plan {
            id: self.state.next_request_id.fetch_add(1, Ordering::Relaxed),
            role,
            hops,
            model,
            body: body_bytes,
            parsed: keep_body.then_some(body),
            pool_order,
            ids,
            decision: Arc::new(decision),
            request_headers,
            leading_applied,
            knowledge_tokens,
            prompt_tokens,
            client_injection: ext.injection,
            prefix_text,
            notes,
        })
    }

    /// Send the request to an instance, retrying on others while it could not
    /// be sent, and stream the answer back.
    pub(crate) async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        fleet: &Fleet,
    ) -> Result<()> {
        let metrics = &self.state.metrics;
        let Some(plan) = ctx.plan.clone() else {
            return Ok(());
        };
        let pools = plan.pool_order.clone();
        let max_retries = pools
            .iter()
            .map(|&p| fleet.pools[p].settings.max_retries)
            .max()
            .unwrap_or(0);
        let knowledge_header = headers::encode_ids(plan.ids.iter().map(String::as_str));
        let kdn_header = plan.decision.kdn.clone().unwrap_or_else(|| "none".into());
        let decision_id = plan.id.to_string();
        let owned_headers = plan.request_headers.clone();
        let body = plan.body.clone();
        let role = plan.role;
        let catalog = self.state.knowledge.catalog.load();
        let mut tried: Vec<(usize, usize)> = Vec::new();
        let mut connect_errors: Vec<String> = Vec::new();
        while tried.len() <= max_retries {
            let agents = self.state.knowledge.agents.load();
            let Some((pool, idx)) =
                choose(fleet, &pools, &tried, &plan, &catalog, &self.state, &agents)
            else {
                break;
            };
            tried.push((pool, idx));
            let pool_ref: &Pool = &fleet.pools[pool];
            let inst: &PoolInstance = &pool_ref.instances[idx];
            let mut kv = if role == Role::Scheduler {
                None
            } else {
                proxy::plan_kv(&self.state, fleet, pool_ref, idx, &plan, &catalog)
            };
            // Admission, and the ready-release policy of a KV request whose KV is
            // still on its way.
            let policy = pool_ref.proxy.release;
            let pending = kv.as_mut().and_then(|k| k.pending.take());
            let admitted = match pending {
                None => {
                    if policy == ReleasePolicy::TextBypass
                        && inst.state.kv_waiting.load(Ordering::Relaxed) > 0
                    {
                        self.state
                            .metrics
                            .ready_release
                            .with_label_values(&[policy.as_str(), "bypassed_by_text"])
                            .inc();
                    }
                    self.admit(session, pool_ref, inst).await
                }
                Some(mut rx) => {
                    let deadline = pool_ref.proxy.kv_deadline;
                    let (ready, slot) = if policy.waits_admitted() {
                        let slot = self.admit(session, pool_ref, inst).await;
                        let ready = match &slot {
                            Ok(_) => wait_kv(session, &mut rx, deadline).await,
                            Err(_) => Ok(InjectState::Pending),
                        };
                        (ready, Some(slot))
                    } else {
                        inst.state.kv_waiting.fetch_add(1, Ordering::Relaxed);
                        let gate = if policy == ReleasePolicy::TextBypass {
                            Some(inst.state.kv_gate.lock().await)
                        } else {
                            None
                        };
                        let ready = wait_kv(session, &mut rx, deadline).await;
                        drop(gate);
                        inst.state.kv_waiting.fetch_sub(1, Ordering::Relaxed);
                        (ready, None)
                    };
                    let ready = match ready {
                        Ok(r) => r,
                        Err(e) => return Err(e),
                    };
                    if let Some(k) = kv.as_mut() {
                        self.settle_kv(k, ready, policy, &mut ctx.notes);
                    }
                    match slot {
                        Some(slot) => slot,
                        None => self.admit(session, pool_ref, inst).await,
                    }
                }
            };
            let _slot = match admitted {
                Ok(slot) => slot,
                Err(Admit::Refused(err, retry_after)) => {
                    ctx.served_by = None;
                    let ra = retry_after.to_string();
                    return self
                        .reject_with(session, ctx, err, &[("retry-after", ra.as_str())])
                        .await;
                }
                Err(Admit::ClientGone(e)) => return Err(e),
            };
            let _inflight = InflightGuard::new(inst);
            let mode = kv.as_ref().map(|k| k.mode());
            let injection = match (mode, plan.ids.is_empty()) {
                (_, true) => "none",
                (Some(m), false) => m.as_str(),
                (None, false) if role == Role::Scheduler => "none",
                (None, false) => "text",
            };
            let mut request_headers: Vec<(&'static str, &str)> = owned_headers
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            let handle = kv
                .as_ref()
                .filter(|k| k.mode() == InjectionMode::Kv)
                .map(|k| k.handle());
            if let Some(h) = &handle {
                request_headers.push((headers::KV_HANDLE, h.as_str()));
            }
            let attempt_body = match (&kv, plan.parsed.as_ref()) {
                (Some(k), Some(parsed)) if k.mode() == InjectionMode::Kv => {
                    let mut parsed = parsed.clone();
                    parsed
                        .extra_mut()
                        .insert("kv_transfer_params".into(), k.transfer_params());
                    Bytes::from(parsed.to_json())
                }
                _ => body.clone(),
            };
            let all = [
                (headers::INSTANCE, inst.url.base.as_str()),
                (headers::POOL, pool_ref.name.as_str()),
                (headers::DECISION, decision_id.as_str()),
                (headers::KNOWLEDGE, knowledge_header.as_str()),
                (headers::KDN, kdn_header.as_str()),
                (headers::INJECTION, injection),
            ];
            // The knowledge headers only when the request carried knowledge (or a
            // scheduler in front said so): plain requests stay lean.
            let headers = if plan.ids.is_empty() && plan.hops == 0 {
                &all[..3]
            } else {
                &all[..]
            };
            ctx.served_by = Some(inst.metrics.clone());
            if let Some(k) = kv.as_ref() {
                ctx.injection = Some(k.decision.clone());
                ctx.kv_note = (k.mode() == InjectionMode::Kv).then(|| match &k.job {
                    Some(job) => format!("KV ready (job {job}) in {}", k.target),
                    None => format!("KV resident in {}", k.target),
                });
            }
            let outgoing = forward::Outgoing {
                body: attempt_body,
                headers: &request_headers,
                prefill: PrefillGuard::new(&inst.state, prefill_tokens(&plan, kv.as_ref())),
            };
            match forward::exchange(
                &self.state.transport,
                session,
                inst,
                outgoing,
                headers,
                ctx.start,
            )
            .await
            {
                Ok(done) => {
                    ctx.status = done.status;
                    ctx.ttft = done.ttft;
                    inst.state.clear_connect_failure();
                    if let Some(k) = &kv {
                        self.learn(ctx, inst, k);
                    }
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
        let model = ctx
            .plan
            .as_ref()
            .map(|p| p.model.clone())
            .unwrap_or_default();
        let mut err = ApiError::no_healthy_upstream(&model);
        if !connect_errors.is_empty() {
            err.message = format!(
                "{}; could not connect to: {}",
                err.message,
                connect_errors.join("; ")
            );
        }
        // Worth a retry once a health check may have seen an instance back.
        let retry_after = fleet
            .config
            .upstream
            .health_check_interval_ms
            .div_ceil(1000)
            .clamp(1, 60)
            .to_string();
        self.reject_with(session, ctx, err, &[("retry-after", retry_after.as_str())])
            .await
    }

    /// The outcome of waiting for a KV injection: ready, or text after the deadline
    /// or a failure.
    fn settle_kv(
        &self,
        kv: &mut KvPlan,
        ready: InjectState,
        policy: ReleasePolicy,
        notes: &mut Vec<String>,
    ) {
        let m = &self.state.metrics;
        let outcome = match ready {
            InjectState::Ready { job } => {
                kv.job = Some(job);
                m.kv_injections.with_label_values(&["ok"]).inc();
                "ready"
            }
            InjectState::Pending => {
                notes.push(format!(
                    "KV not resident in {} by the deadline ({}): sent as text",
                    kv.target,
                    policy.as_str()
                ));
                m.kv_injections.with_label_values(&["timeout"]).inc();
                kv.decision.mode = InjectionMode::Text;
                kv.decision.reason = "kv_deadline";
                "deadline_text"
            }
            InjectState::Failed(e) => {
                notes.push(format!(
                    "KV injection into {} failed: {e}; sent as text",
                    kv.target
                ));
                m.kv_injections.with_label_values(&["failed"]).inc();
                kv.decision.mode = InjectionMode::Text;
                kv.decision.reason = "kv_failed";
                "failed_text"
            }
        };
        m.ready_release
            .with_label_values(&[policy.as_str(), outcome])
            .inc();
    }

    /// After a successful exchange: metrics of the knowledge's injection and the
    /// online correction of the adaptive predictor.
    fn learn(&self, ctx: &ReqCtx, inst: &PoolInstance, kv: &KvPlan) {
        let m = &self.state.metrics;
        let d = &kv.decision;
        let mode = d.mode.as_str();
        m.injection.with_label_values(&[mode, d.reason]).inc();
        let tokens = d.inputs.knowledge.knowledge_tokens;
        m.knowledge_tokens.with_label_values(&[mode]).inc_by(tokens);
        if d.mode == InjectionMode::Kv {
            m.knowledge_cached_tokens.inc_by(kv.chunks * kv.chunk_size);
        }
        if ctx.status != 200 {
            return;
        }
        if d.mode == InjectionMode::Text
            && self.state.fleet.load().config.proxy.engine_stores_prefix
        {
            // LMCache keeps what the engine computed: the next request finds it.
            self.state
                .injections
                .mark_resident(kv.key.clone(), "prefill");
        }
        let Some(ttft) = ctx.ttft else {
            return;
        };
        let measured = ttft.as_secs_f64() * 1e3;
        let predicted = match d.mode {
            InjectionMode::Text => d.predicted_text_ms,
            InjectionMode::Kv => d.predicted_kv_ms,
        };
        if predicted.is_finite() && predicted > 0.0 {
            m.ttft_prediction_ratio
                .with_label_values(&[mode])
                .observe(measured / predicted);
        }
        if let Some(a) = &d.adaptive {
            let raw = match d.mode {
                InjectionMode::Text => a.text_raw_ms,
                InjectionMode::Kv => a.kv_raw_ms,
            };
            self.state
                .corrections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(&inst.url.base, d.mode, raw, measured);
        }
    }

    /// Wait for a slot on `inst`, giving up if the client goes away.
    async fn admit(
        &self,
        session: &mut Session,
        pool: &Pool,
        inst: &PoolInstance,
    ) -> std::result::Result<Option<Slot>, Admit> {
        let limit = inst.max_inflight;
        if limit == 0 {
            return Ok(None);
        }
        let adm = &inst.state.admission;
        if let Some(slot) = adm.try_acquire(limit) {
            return Ok(Some(slot));
        }
        let s = &pool.settings;
        let timeout = Duration::from_millis(s.queue_timeout_ms);
        let m = &self.state.metrics;
        let gauge = m
            .queue_length
            .with_label_values(&[&pool.name, &inst.url.base]);
        let waited = Instant::now();
        let result = {
            let acquire = adm.acquire(limit, s.queue_size, timeout);
            gauge.set(adm.queued() as i64 + 1);
            tokio::select! {
                r = acquire => Ok(r),
                gone = session.read_body_or_idle(true) => Err(gone),
            }
        };
        gauge.set(adm.queued() as i64);
        m.queue_wait
            .with_label_values(&[&pool.name])
            .observe(waited.elapsed().as_secs_f64());
        let retry_after = (s.queue_timeout_ms / 1000).clamp(1, 60);
        match result {
            Ok(Ok(slot)) => Ok(Some(slot)),
            Ok(Err(refused)) => {
                let (reason, err) = match refused {
                    Refused::QueueFull => (
                        "queue_full",
                        ApiError::too_many_requests(
                            "queue_full",
                            format!(
                                "instance {} has {} requests in flight and {} waiting; try again later",
                                inst.url.base, limit, s.queue_size
                            ),
                        ),
                    ),
                    Refused::Timeout => (
                        "timeout",
                        ApiError::too_many_requests(
                            "queue_timeout",
                            format!(
                                "no slot on instance {} within {} ms; try again later",
                                inst.url.base, s.queue_timeout_ms
                            ),
                        ),
                    ),
                };
                m.admission_rejected
                    .with_label_values(&[&pool.name, reason])
                    .inc();
                Err(Admit::Refused(err, retry_after))
            }
            Err(gone) => Err(Admit::ClientGone(match gone {
                Err(e) => e,
                Ok(_) => Error::explain(ConnectionClosed, "client went away while queued"),
            })),
        }
    }
}

/// Prompt tokens the engine computes for this attempt: the estimate of the whole
/// prompt, less the knowledge chunks its store serves (all of them in KV mode, the
/// resident ones in text mode: LMCache finds those whatever the mode).
fn prefill_tokens(plan: &Plan, kv: Option<&KvPlan>) -> u64 {
    let total = plan.prompt_tokens + plan.knowledge_tokens;
    let cached = kv.map_or(0, |k| {
        let chunks = match k.mode() {
            InjectionMode::Kv => k.chunks,
            InjectionMode::Text => k.decision.inputs.knowledge.resident_chunks,
        };
        chunks * k.chunk_size
    });
    total.saturating_sub(cached).max(1)
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

/// Why a request was not admitted.
enum Admit {
    /// 429, with the seconds for Retry-After.
    Refused(ApiError, u64),
    ClientGone(Box<Error>),
}

/// A scheduler gateway's decision, as a proxy receives it.
struct UpstreamDecision {
    pool: Option<String>,
    kdn: Option<String>,
    knowledge: Vec<String>,
    injection: InjectionPreference,
}

impl UpstreamDecision {
    fn from_headers(
        req: &pingora::http::RequestHeader,
    ) -> std::result::Result<Option<UpstreamDecision>, ApiError> {
        let Some(knowledge) = header_str(req, headers::KNOWLEDGE) else {
            return Ok(None);
        };
        let knowledge = headers::decode_ids(knowledge).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_header",
                format!("malformed {} header", headers::KNOWLEDGE),
            )
        })?;
        let injection = match header_str(req, headers::INJECTION_PREFERENCE) {
            Some("kv") => InjectionPreference::Kv,
            Some("text") => InjectionPreference::Text,
            _ => InjectionPreference::Auto,
        };
        Ok(Some(UpstreamDecision {
            pool: header_str(req, headers::POOL).map(str::to_string),
            kdn: header_str(req, headers::KDN)
                .filter(|k| *k != "none")
                .map(str::to_string),
            knowledge,
            injection,
        }))
    }
}

fn header_str<'a>(req: &'a pingora::http::RequestHeader, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

fn preference_name(p: InjectionPreference) -> &'static str {
    match p {
        InjectionPreference::Auto => "auto",
        InjectionPreference::Kv => "kv",
        InjectionPreference::Text => "text",
    }
}

/// The leading block's registered content for `model` (or its bare layout when it
/// was not registered for the model), and the other blocks' texts.
struct Leading {
    content: String,
    tokens: u64,
    /// `content` is the registered prefix for the model (not a bare fallback).
    registered: bool,
}

/// Put first the block whose KV is cheapest to have: resident in the chosen pool's
/// stores (as its pool view found them), then held by the chosen KDN; the order is
/// otherwise kept.
fn lead_with_cheapest(
    ids: &mut [String],
    catalog: &Catalog,
    model: &str,
    resident_in_pool: Option<&std::collections::BTreeSet<String>>,
    kdn: Option<&str>,
) {
    let rank = |id: &String| -> u8 {
        let Some(b) = catalog.blocks.get(id) else {
            return 3;
        };
        if resident_in_pool.is_some_and(|r| r.contains(id)) {
            return 0;
        }
        match kdn {
            Some(k) if b.kv_ready_on(k, model) => 1,
            _ => 2,
        }
    };
    if let Some(best) = (0..ids.len()).min_by_key(|&i| (rank(&ids[i]), i)) {
        ids[..=best].rotate_right(1);
    }
}

fn knowledge_texts(
    catalog: &Catalog,
    ids: &[String],
    model: &str,
    notes: &mut Vec<String>,
) -> (Leading, Vec<String>) {
    let mut leading = Leading {
        content: String::new(),
        tokens: 0,
        registered: false,
    };
    let mut rest = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let Some(block) = catalog.blocks.get(id) else {
            notes.push(format!(
                "knowledge {id} is not in this gateway's catalog; left out"
            ));
            continue;
        };
        if i == 0 || leading.content.is_empty() {
            match block.model(model) {
                Some(m) if !m.content.is_empty() => {
                    leading.content = m.content.clone();
                    leading.tokens = m.tokens;
                    leading.registered = true;
                }
                _ => {
                    leading.content = prompt::knowledge_message_content(&block.block.text, 0);
                    notes.push(format!(
                        "knowledge {id} has no prefix for model {model}: bare text"
                    ));
                }
            }
        } else {
            rest.push(block.block.text.clone());
        }
    }
    (leading, rest)
}

/// The next (pool, instance) to try: the first pool, in the plan's order, that
/// still has an untried healthy instance, chosen by the pool's policy.
fn choose(
    fleet: &Fleet,
    pools: &[usize],
    tried: &[(usize, usize)],
    plan: &Plan,
    catalog: &Catalog,
    state: &GatewayState,
    agents: &HashMap<String, AgentLive>,
) -> Option<(usize, usize)> {
    let leading = plan.ids.first().and_then(|id| catalog.blocks.get(id));
    pools.iter().find_map(|&p| {
        let pool = &fleet.pools[p];
        let policy = pool.settings.policy;
        let agent_load = |inst: &PoolInstance| {
            agents
                .get(&inst.url.base)
                .filter(|a| a.up)
                .map_or(0, |a| a.load.running + a.load.waiting)
        };
        let holds_kv = |i: usize| {
            plan.ids.first().is_some_and(|id| {
                knowledge::residency(pool, i, &plan.model, id, leading, agents, &state.injections)
                    .is_some()
            })
        };
        if let (BalancePolicy::PrefixAffinity, Some(text)) = (policy, &plan.prefix_text) {
            let loads: Vec<u64> = pool
                .instances
                .iter()
                .map(|inst| (inst.state.inflight() + inst.state.queued()).max(agent_load(inst)))
                .collect();
            let eligible: Vec<bool> = (0..pool.instances.len())
                .map(|i| !tried.contains(&(p, i)) && pool.is_healthy(&pool.instances[i]))
                .collect();
            return state
                .prefix
                .choose(pool, text, &loads, &eligible)
                .map(|i| (p, i));
        }
        let affinity = |i: usize| match policy {
            BalancePolicy::KnowledgeAffinity | BalancePolicy::PrefixAffinity => holds_kv(i),
            _ => false,
        };
        pool.choose(|i| tried.contains(&(p, i)), affinity, agent_load)
            .map(|i| (p, i))
    })
}

/// The text a prompt's prefix tree sees: the chat's messages in order, or the prompt.
fn prefix_text(body: &CompletionBody) -> String {
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

/// Wait for a KV injection up to `deadline`, giving up if the client goes away.
async fn wait_kv(
    session: &mut Session,
    rx: &mut tokio::sync::watch::Receiver<InjectState>,
    deadline: Duration,
) -> Result<InjectState> {
    let until = Instant::now() + deadline;
    tokio::select! {
        s = kv_inject::wait_ready(rx, until) => Ok(s),
        gone = session.read_body_or_idle(true) => Err(match gone {
            Err(e) => e,
            Ok(_) => Error::explain(ConnectionClosed, "client went away while its KV was injected"),
        }),
    }
}

/// Read the whole request body, refusing it once it passes `limit` bytes.
pub(crate) async fn read_body(
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
        429 => "429".into(),
        499 => "499".into(),
        502 => "502".into(),
        503 => "503".into(),
        504 => "504".into(),
        other => other.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knowledge::{BlockModel, KdnSnapshot, SnapshotBlock};
    use std::collections::{BTreeMap, BTreeSet};

    fn block(id: &str, status: &str) -> Arc<SnapshotBlock> {
        Arc::new(SnapshotBlock {
            id: id.into(),
            title: None,
            tags: vec![],
            text: format!("text of {id}"),
            models: BTreeMap::from([(
                "m".to_string(),
                BlockModel {
                    status: status.into(),
                    template: "llama3".into(),
                    tokens: 256,
                    chunks: 1,
                    chunk_size: 256,
                    bytes: 0,
                    content: String::new(),
                    resident: vec![],
                },
            )]),
            digest: None,
            text_bytes: 0,
        })
    }

    #[test]
    fn the_cheapest_block_leads_the_rest_keep_their_order() {
        let snap = KdnSnapshot {
            kdn_id: "k".into(),
            version: "1".into(),
            blocks: vec![
                block("a", "registered"),
                block("b", "kv_ready"),
                block("c", "kv_ready"),
            ],
        };
        let catalog = Catalog::build(&[&snap], &Catalog::default());
        let ids = || vec!["a".to_string(), "b".to_string(), "c".to_string()];
        // Nothing resident, no KDN: the client's order.
        let mut v = ids();
        lead_with_cheapest(&mut v, &catalog, "m", None, None);
        assert_eq!(v, ["a", "b", "c"]);
        // The KDN holds b and c: b (the first of them) leads.
        let mut v = ids();
        lead_with_cheapest(&mut v, &catalog, "m", None, Some("k"));
        assert_eq!(v, ["b", "a", "c"]);
        // c is already in the pool's stores: it leads, even over a KDN's block.
        let resident = BTreeSet::from(["c".to_string()]);
        let mut v = ids();
        lead_with_cheapest(&mut v, &catalog, "m", Some(&resident), Some("k"));
        assert_eq!(v, ["c", "a", "b"]);
    }
}
