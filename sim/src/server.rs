//! The HTTP surface: vLLM's OpenAI server routes over the simulated engine.

use crate::api::{self, ApiError, CompletionRequest, Endpoint, Prompt, RespMeta};
use crate::engine::{EngineHandle, SchedulerConfig, SeqEvent, Submit};
use crate::filler;
use crate::lmcache::{LmCache, Lookup};
use crate::metrics::SimMetrics;
use crate::tokenizer::Tokenizer;
use crate::PrefixCache;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cacheroute_filters::cost_model::CostModel;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Largest request body accepted (RAG prompts can be large).
pub const MAX_BODY_BYTES: usize = 256 << 20;

/// Default `max_tokens` when a request has none.
pub const DEFAULT_MAX_TOKENS: u64 = 16;

/// Header with which the gateway attaches a KV handle (counted, not yet validated).
pub const KV_HANDLE_HEADER: &str = "x-cacheroute-kv-handle";

/// Everything a sim server shares between requests.
pub struct AppState {
    pub model: String,
    pub max_model_len: u64,
    pub zero_latency: bool,
    pub seed: u64,
    pub tokenizer: Arc<Tokenizer>,
    pub engine: Option<EngineHandle>,
    pub metrics: Arc<SimMetrics>,
    pub cost: CostModel,
    pub sched_cfg: SchedulerConfig,
    pub time_scale: f64,
    pub prefix_cache: Arc<dyn PrefixCache>,
    /// `--kv-store`: lookups and writes of LMCache chunks (replaces `prefix_cache`).
    pub lmcache: Option<Arc<LmCache>>,
    pub last_request: Mutex<Value>,
    pub counter: AtomicU64,
    pub started: u64,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .route("/debug/last_request", get(last_request))
        .route("/debug/engine", get(engine_debug))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response()
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn version() -> Json<Value> {
    Json(json!({"version": concat!("cacheroute-sim-", env!("CARGO_PKG_VERSION"))}))
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.model,
            "object": "model",
            "created": st.started,
            "owned_by": "cacheroute-sim",
            "root": st.model,
            "parent": null,
            "max_model_len": st.max_model_len,
        }],
    }))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.metrics.render(),
    )
        .into_response()
}

async fn last_request(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(st.last_request.lock().expect("last_request lock").clone())
}

async fn engine_debug(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "zero_latency": st.zero_latency,
        "time_scale": st.time_scale,
        "scheduler": {
            "max_num_seqs": st.sched_cfg.max_num_seqs,
            "max_num_batched_tokens": st.sched_cfg.max_num_batched_tokens,
            "block_size": st.sched_cfg.block_size,
            "num_gpu_blocks": st.sched_cfg.num_gpu_blocks,
            "kv_capacity_tokens": st.sched_cfg.kv_capacity_tokens(),
        },
        "cost_model": st.cost,
        "stats": st.engine.as_ref().map(|e| e.stats()),
        "lmcache": st.lmcache.as_ref().map(|l| l.describe()),
    }))
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(st, Endpoint::Chat, "/v1/chat/completions", &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(st, Endpoint::Completions, "/v1/completions", &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// A request that passed validation, with its token accounting.
struct Accepted {
    req: CompletionRequest,
    meta: RespMeta,
    prompt_tokens: u64,
    cached_tokens: u64,
    max_tokens: u64,
    finish_reason: &'static str,
    seed: u64,
    /// Chunks to write to the LMCache store once the prefill is done.
    kv_save: Option<(Arc<LmCache>, Lookup)>,
}

impl Accepted {
    fn usage(&self, completion_tokens: u64) -> Value {
        api::usage(self.prompt_tokens, completion_tokens, self.cached_tokens)
    }

    /// The prefill is done (first token sampled): store the new chunks, as LMCache does.
    async fn prefill_done(&mut self) {
        if let Some((lm, lookup)) = self.kv_save.take() {
            lm.save_after_prefill(lookup).await;
        }
    }
}

async fn handle(
    st: Arc<AppState>,
    endpoint: Endpoint,
    path: &'static str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if headers.contains_key(KV_HANDLE_HEADER) {
        st.metrics.kv_handle_requests.inc();
    }
    let parsed: Result<Value, _> = serde_json::from_slice(&body);
    *st.last_request.lock().expect("last_request lock") = json!({
        "path": path,
        "bytes": body.len(),
        "sha256": hex::encode(Sha256::digest(&body)),
        "body": parsed.as_ref().ok().cloned().unwrap_or(Value::Null),
    });
    let value = parsed.map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))?;
    let req = api::parse_request(endpoint, &value)?;
    if req.kv_transfer_params.is_some() {
        st.metrics.kv_transfer_params_requests.inc();
    }
    if let Some(m) = &req.model {
        if *m != st.model {
            return Err(ApiError::not_found(format!(
                "The model `{m}` does not exist."
            )));
        }
    }
    let mut acc = accept(&st, req).await?;
    if st.zero_latency {
        acc.prefill_done().await;
        return Ok(respond_now(&st, &acc));
    }
    let engine = st
        .engine
        .as_ref()
        .ok_or_else(|| ApiError::internal("engine not running"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    if !engine.submit(Submit {
        prompt_tokens: acc.prompt_tokens,
        cached_tokens: acc.cached_tokens,
        max_tokens: acc.max_tokens,
        finish_reason: acc.finish_reason,
        events: tx,
    }) {
        return Err(ApiError::internal("engine stopped"));
    }
    if acc.req.stream {
        Ok(stream_response(acc, rx))
    } else {
        collect_response(acc, rx).await
    }
}

/// Tokenize and check lengths, as vLLM does before scheduling.
async fn accept(st: &Arc<AppState>, req: CompletionRequest) -> Result<Accepted, ApiError> {
    fn encode(tok: &Tokenizer, prompt: &Prompt) -> Vec<u32> {
        match prompt {
            Prompt::Chat(msgs) => tok.encode_chat(msgs),
            Prompt::Text(t) => tok.encode(t),
            Prompt::Ids(ids) => ids.clone(),
        }
    }
    let text_len = match &req.prompt {
        Prompt::Chat(msgs) => msgs.iter().map(|m| m.content.len()).sum(),
        Prompt::Text(t) => t.len(),
        Prompt::Ids(_) => 0,
    };
    // small prompts inline (cheap); large ones off the async threads
    let ids = if text_len < 16 << 10 {
        encode(&st.tokenizer, &req.prompt)
    } else {
        let tok = st.tokenizer.clone();
        let prompt = req.prompt.clone();
        tokio::task::spawn_blocking(move || encode(&tok, &prompt))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
    };
    let prompt_tokens = ids.len() as u64;
    let what = match req.endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    let too_long = |total: u64, completion: u64| {
        ApiError::bad_request(format!(
            "This model's maximum context length is {} tokens. However, you requested {total} \
             tokens ({prompt_tokens} in the {what}, {completion} in the completion). Please \
             reduce the length of the {what} or completion.",
            st.max_model_len
        ))
    };
    if prompt_tokens == 0 {
        return Err(ApiError::bad_request("The prompt is empty."));
    }
    if prompt_tokens >= st.max_model_len {
        return Err(too_long(prompt_tokens + 1, 1));
    }
    let (max_tokens, finish_reason) = match req.max_tokens {
        Some(n) => (n, "length"),
        // no limit asked: the filler "naturally" stops after DEFAULT_MAX_TOKENS tokens
        None => (
            DEFAULT_MAX_TOKENS.min(st.max_model_len - prompt_tokens),
            "stop",
        ),
    };
    if prompt_tokens + max_tokens > st.max_model_len {
        return Err(too_long(prompt_tokens + max_tokens, max_tokens));
    }
    let capacity = st.sched_cfg.kv_capacity_tokens();
    if !st.zero_latency && prompt_tokens + max_tokens > capacity {
        return Err(ApiError::bad_request(format!(
            "The request needs {} tokens of KV cache but the simulated GPU holds {capacity}.",
            prompt_tokens + max_tokens
        )));
    }
    let (cached_tokens, kv_save) = match &st.lmcache {
        Some(lm) => {
            let lookup = lm.query(&ids).await;
            let cached = lookup.cached_tokens.min(prompt_tokens - 1);
            let save = (!req.lmcache_skip_save()).then(|| (lm.clone(), lookup));
            (cached, save)
        }
        None => (
            st.prefix_cache
                .lookup(&st.model, &ids)
                .await
                .min(prompt_tokens - 1),
            None,
        ),
    };
    st.metrics.prompt_tokens.inc_by(prompt_tokens);
    st.metrics.prefix_cache_queries.inc_by(prompt_tokens);
    st.metrics.prefix_cache_hits.inc_by(cached_tokens);
    let n = st.counter.fetch_add(1, Ordering::Relaxed);
    let salt = filler::splitmix64(st.seed ^ n.rotate_left(32));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let id = format!("{:016x}{:016x}", salt, filler::splitmix64(nanos ^ salt));
    let meta = RespMeta {
        id: match req.endpoint {
            Endpoint::Chat => format!("chatcmpl-{id}"),
            Endpoint::Completions => format!("cmpl-{id}"),
        },
        created: unix_now(),
        model: st.model.clone(),
    };
    Ok(Accepted {
        seed: filler::request_seed(st.seed, &ids),
        req,
        meta,
        prompt_tokens,
        cached_tokens,
        max_tokens,
        finish_reason,
        kv_save,
    })
}

fn sse_response(body: Body) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `--zero-latency`: the whole answer at once.
fn respond_now(st: &AppState, acc: &Accepted) -> Response {
    let n = acc.max_tokens;
    st.metrics.generation_tokens.inc_by(n);
    st.metrics.ttft.observe(0.0);
    st.metrics.e2e.observe(0.0);
    st.metrics
        .request_success
        .with_label_values(&[acc.finish_reason])
        .inc();
    let ep = acc.req.endpoint;
    if acc.req.stream {
        let mut out = Vec::new();
        for i in 0..n {
            out.extend_from_slice(&api::token_chunk(
                ep,
                &acc.meta,
                &filler::token_text(acc.seed, i),
                i == 0,
            ));
        }
        out.extend_from_slice(&api::finish_chunk(ep, &acc.meta, acc.finish_reason));
        if acc.req.include_usage {
            out.extend_from_slice(&api::usage_chunk(ep, &acc.meta, acc.usage(n)));
        }
        out.extend_from_slice(api::DONE);
        sse_response(Body::from(out))
    } else {
        let text = filler::text(acc.seed, n);
        Json(api::full_response(
            ep,
            &acc.meta,
            &text,
            acc.finish_reason,
            acc.usage(n),
        ))
        .into_response()
    }
}

async fn collect_response(
    mut acc: Accepted,
    mut rx: mpsc::UnboundedReceiver<SeqEvent>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut produced = 0u64;
    let last = loop {
        let Some(ev) = rx.recv().await else {
            return Err(ApiError::internal("the engine dropped the request"));
        };
        if ev.index == 0 {
            acc.prefill_done().await;
        }
        text.push_str(&filler::token_text(acc.seed, ev.index));
        produced += 1;
        if ev.finished {
            break ev;
        }
    };
    let mut r = Json(api::full_response(
        acc.req.endpoint,
        &acc.meta,
        &text,
        acc.finish_reason,
        acc.usage(produced),
    ))
    .into_response();
    let h = r.headers_mut();
    for (name, v) in [
        ("x-sim-ttft-ms", last.ttft_ms),
        ("x-sim-e2e-ms", last.since_arrival_ms),
        ("x-sim-queue-ms", last.queue_ms),
    ] {
        if let Ok(v) = HeaderValue::from_str(&format!("{v:.3}")) {
            h.insert(name, v);
        }
    }
    Ok(r)
}

enum Phase {
    Tokens,
    Done,
}

struct StreamState {
    acc: Accepted,
    rx: mpsc::UnboundedReceiver<SeqEvent>,
    produced: u64,
    phase: Phase,
}

/// SSE: one frame per token as the engine samples it (dropping the body aborts the
/// request in the engine), then the finish frame, the usage frame if asked, `[DONE]`.
fn stream_response(acc: Accepted, rx: mpsc::UnboundedReceiver<SeqEvent>) -> Response {
    let state = StreamState {
        acc,
        rx,
        produced: 0,
        phase: Phase::Tokens,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if let Phase::Done = s.phase {
            return None;
        }
        let ev = s.rx.recv().await?;
        if ev.index == 0 {
            s.acc.prefill_done().await;
        }
        let ep = s.acc.req.endpoint;
        let piece = filler::token_text(s.acc.seed, ev.index);
        let first = s.produced == 0;
        s.produced += 1;
        let chunk = api::token_chunk(ep, &s.acc.meta, &piece, first);
        let out = if ev.finished {
            s.phase = Phase::Done;
            let mut out = chunk.to_vec();
            out.extend_from_slice(&api::finish_chunk(ep, &s.acc.meta, s.acc.finish_reason));
            if s.acc.req.include_usage {
                out.extend_from_slice(&api::usage_chunk(ep, &s.acc.meta, s.acc.usage(s.produced)));
            }
            out.extend_from_slice(api::DONE);
            Bytes::from(out)
        } else {
            chunk
        };
        Some((Ok::<Bytes, std::convert::Infallible>(out), s))
    });
    sse_response(Body::from_stream(stream))
}
