//! The HTTP surface: vLLM's OpenAI server routes over the simulated engine.

use crate::api::{
    self, ApiError, CompletionRequest, Endpoint, KvHandle, KvHandleCheck, KvHandleError, Prompt,
    RespMeta,
};
use crate::embeddings::{self, EmbeddingResponse};
use crate::engine::{
    record_admission, Admission, CachedSplit, EngineHandle, ExternalHit, SchedulerConfig, SeqEvent,
    Submit, Tier,
};
use crate::filler;
use crate::lmcache::{LmCache, Lookup};
use crate::metrics::SimMetrics;
use crate::tokenizer::{render_llama3_chat, Tokenizer};
use crate::PrefixCache;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cacheroute_decisions::cost_model::CostModel;
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

/// Header with which the gateway attaches a KV handle (`job=<id>;chunks=<n>;tokens=<t>`).
pub const KV_HANDLE_HEADER: &str = "x-cacheroute-kv-handle";

/// Response header with the result of checking the request's KV handle.
pub const KV_HANDLE_RESULT_HEADER: &str = "x-sim-kv-handle";

/// Response headers with the request's cached prompt tokens per tier.
pub const CACHED_GPU_HEADER: &str = "x-sim-cached-gpu";
pub const CACHED_CPU_HEADER: &str = "x-sim-cached-cpu";
pub const CACHED_REMOTE_HEADER: &str = "x-sim-cached-remote";

/// Everything a sim server shares between requests.
pub struct AppState {
    pub model: String,
    /// vLLM's `--model` (the card's `root`; LMCache keys name it): `--lmcache-model`,
    /// else the served name.
    pub root: String,
    pub max_model_len: u64,
    pub zero_latency: bool,
    pub seed: u64,
    pub tokenizer: Arc<Tokenizer>,
    pub engine: Option<EngineHandle>,
    pub metrics: Arc<SimMetrics>,
    pub cost: CostModel,
    pub sched_cfg: SchedulerConfig,
    pub time_scale: f64,
    /// A custom external prefix cache ([`crate::spawn_with_prefix_cache`]).
    pub prefix_cache: Option<Arc<dyn PrefixCache>>,
    /// `--kv-store`: lookups and writes of LMCache chunks (excludes `prefix_cache`).
    pub lmcache: Option<Arc<LmCache>>,
    /// The last completion request, and a sequence number so that a request only adds its
    /// KV-handle result to its own record.
    pub last_request: Mutex<(u64, Value)>,
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
        .route("/v1/embeddings", post(embeddings_route))
        .route("/tokenize", post(crate::tokenize::tokenize))
        .route("/detokenize", post(crate::tokenize::detokenize))
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
            "owned_by": "vllm",
            "root": st.root,
            "parent": null,
            "max_model_len": st.max_model_len,
            "permission": [{
                "id": format!("modelperm-{:016x}", st.seed ^ st.started),
                "object": "model_permission",
                "created": st.started,
                "allow_create_engine": false,
                "allow_sampling": true,
                "allow_logprobs": true,
                "allow_search_indices": false,
                "allow_view": true,
                "allow_fine_tuning": false,
                "organization": "*",
                "group": null,
                "is_blocking": false,
            }],
        }],
    }))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        lmcache_info(&st, st.metrics.render()),
    )
        .into_response()
}

/// The LMCache settings the sim's keys follow, as an info series after the
/// rest (`cacheroute doctor` compares them with a KDN's): a real engine
/// exposes no such series, so the doctor takes them from flags there.
fn lmcache_info(st: &AppState, text: String) -> String {
    let Some(lm) = &st.lmcache else {
        return text;
    };
    let p = &lm.config().params;
    let esc = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let seed = p
        .hash_seed
        .as_deref()
        .map(cacheroute_lmcache::keys::hash_seed_digest);
    format!(
        "{text}# HELP cacheroute_sim_lmcache_info The simulated LMCache's key settings.\n\
         # TYPE cacheroute_sim_lmcache_info gauge\n\
         cacheroute_sim_lmcache_info{{model=\"{}\",scheme=\"{}\",chunk_size=\"{}\",dtype=\"{}\",\
         world_size=\"{}\",hash_seed_digest=\"{}\",save_unfull_chunk=\"{}\"}} 1\n",
        esc(&p.model),
        p.scheme.name(),
        p.chunk_size,
        esc(&p.dtype),
        p.world_size,
        seed.unwrap_or_default(),
        p.save_unfull_chunk,
    )
}

async fn last_request(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(st.last_request.lock().expect("last_request lock").1.clone())
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
            "enable_prefix_caching": st.sched_cfg.enable_prefix_caching,
            "kv_store_gbps": st.sched_cfg.kv_store_gbps,
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

/// `/v1/embeddings`: answered at once (no engine time), see [`embeddings`].
async fn embeddings_route(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    embed(st, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn embed(st: Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))?;
    let req = embeddings::parse_request(&value)?;
    if let Some(m) = &req.model {
        if *m != st.model {
            return Err(ApiError::not_found(format!(
                "The model `{m}` does not exist."
            )));
        }
    }
    let tok = st.tokenizer.clone();
    let inputs = req.inputs.clone();
    let count = move || -> Vec<u64> { inputs.iter().map(|t| tok.encode(t).len() as u64).collect() };
    // small inputs inline (cheap); large ones off the async threads
    let counts = if req.inputs.iter().map(String::len).sum::<usize>() < 16 << 10 {
        count()
    } else {
        tokio::task::spawn_blocking(count)
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
    };
    if let Some(n) = counts.iter().find(|n| **n > st.max_model_len) {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {} tokens. However, you requested {n} \
             tokens in the input for embedding generation. Please reduce the length of the \
             input.",
            st.max_model_len
        )));
    }
    let n = st.counter.fetch_add(1, Ordering::Relaxed);
    let id = format!(
        "embd-{:016x}",
        filler::splitmix64(st.seed ^ n.rotate_left(32))
    );
    let resp =
        EmbeddingResponse::build(&req, id, unix_now(), st.model.clone(), counts.iter().sum());
    let bytes = serde_json::to_vec(&resp)
        .map_err(|e| ApiError::internal(format!("encoding the response: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response())
}

/// A KV handle as received: where it came from, its raw form, and its parse.
struct KvHandleIn {
    source: &'static str,
    raw: Value,
    parsed: Result<KvHandle, KvHandleError>,
}

/// The request's KV handle: the header, else `kv_transfer_params.cacheroute_kv_handle`.
fn kv_handle_in(headers: &HeaderMap, req: &CompletionRequest) -> Option<KvHandleIn> {
    if let Some(v) = headers.get(KV_HANDLE_HEADER) {
        return Some(match v.to_str() {
            Ok(s) => KvHandleIn {
                source: "header",
                raw: Value::String(s.to_string()),
                parsed: KvHandle::parse_header(s),
            },
            Err(_) => KvHandleIn {
                source: "header",
                raw: Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                parsed: Err(KvHandleError::NotAscii),
            },
        });
    }
    let parsed = req.body_kv_handle()?;
    let raw = req
        .kv_transfer_params
        .as_ref()
        .and_then(|p| p.get("cacheroute_kv_handle"))
        .cloned()
        .unwrap_or(Value::Null);
    Some(KvHandleIn {
        source: "kv_transfer_params",
        raw,
        parsed,
    })
}

/// Check a handle against this request's store lookup (`store`: the lookup and the chunk
/// size; None without `--kv-store`). Returns the result and a report for
/// `/debug/last_request`.
fn check_kv_handle(h: &KvHandleIn, store: Option<(&Lookup, usize)>) -> (KvHandleCheck, Value) {
    let mut report = json!({"source": h.source, "value": h.raw});
    let result = match &h.parsed {
        Err(e) => {
            report["error"] = json!(e.to_string());
            KvHandleCheck::Malformed
        }
        Ok(k) => {
            report["job"] = json!(k.job);
            report["chunks"] = json!(k.chunks);
            report["tokens"] = json!(k.tokens);
            match store {
                None => KvHandleCheck::NoStore,
                Some((lookup, chunk_size)) => {
                    report["chunk_size"] = json!(chunk_size);
                    report["prompt_chunks"] = json!(lookup.chunks.len());
                    report["present_chunks"] = json!(lookup.hit_chunks);
                    report["store_failed"] = json!(lookup.failed);
                    if k.chunks.checked_mul(chunk_size as u64) != Some(k.tokens) {
                        KvHandleCheck::Mismatch
                    } else if (lookup.hit_chunks as u64) < k.chunks {
                        // also when the prompt has fewer than `chunks` chunks at all
                        KvHandleCheck::Missing
                    } else {
                        KvHandleCheck::Ok
                    }
                }
            }
        }
    };
    report["result"] = json!(result.as_str());
    (result, report)
}

/// Tag a response with its cached tokens per tier.
fn with_cached(mut r: Response, c: CachedSplit) -> Response {
    let h = r.headers_mut();
    for (name, v) in [
        (CACHED_GPU_HEADER, c.gpu),
        (CACHED_CPU_HEADER, c.cpu),
        (CACHED_REMOTE_HEADER, c.remote),
    ] {
        h.insert(name, HeaderValue::from(v));
    }
    r
}

/// Tag a response with its KV-handle result.
fn with_kv_result(mut r: Response, check: Option<KvHandleCheck>) -> Response {
    if let Some(c) = check {
        r.headers_mut().insert(
            KV_HANDLE_RESULT_HEADER,
            HeaderValue::from_static(c.as_str()),
        );
    }
    r
}

/// A request that passed validation, with its token accounting.
struct Accepted {
    st: Arc<AppState>,
    /// This request's number in `last_request` (it only updates its own record).
    seq: u64,
    req: CompletionRequest,
    meta: RespMeta,
    prompt_tokens: u64,
    /// Hash chain of the prompt's full blocks, for the GPU prefix cache (empty when off).
    block_hashes: Arc<[u64]>,
    /// The external (LMCache or custom) hit looked up at submission.
    external: Option<Arc<ExternalHit>>,
    /// Cached prompt tokens per tier, known once the engine admitted the request.
    cached: CachedSplit,
    max_tokens: u64,
    finish_reason: &'static str,
    seed: u64,
    /// LMCache's lookup, for the CPU tier and the store writes after the prefill, and
    /// whether to store new chunks (not with `lmcache.skip_save`).
    kv_save: Option<(Arc<LmCache>, Lookup, bool)>,
    /// The KV handle's check, with its debug report (None: no handle).
    kv_check: Option<(KvHandleCheck, Value)>,
    /// Completions' `echo`: the prompt's text, which leads the answer.
    echo: String,
    /// The prompt's log probabilities, when asked (`prompt_logprobs`, or `echo` with
    /// `logprobs`).
    prompt_lp: Option<crate::logprobs::PromptLogprobs>,
}

impl Accepted {
    fn usage(&self, completion_tokens: u64) -> Value {
        api::usage(self.prompt_tokens, completion_tokens, self.cached.total())
    }

    /// The log probabilities of tokens `first..` (texts given), or null when not asked;
    /// `echoed`: this text starts with the echoed prompt, whose tokens lead (vLLM).
    fn logprobs_of(&self, first: u64, texts: &[String], offset: usize, echoed: bool) -> Value {
        match (self.req.logprobs, self.req.endpoint) {
            (None, _) => Value::Null,
            (Some(top), Endpoint::Chat) => crate::logprobs::chat(self.seed, first, texts, top),
            (Some(top), Endpoint::Completions) => {
                let generated = crate::logprobs::completion_entries(self.seed, first, texts, top);
                match self.prompt_lp.as_ref().filter(|_| echoed && self.req.echo) {
                    Some(p) => {
                        let mut all = p.entries(top);
                        all.extend(generated);
                        crate::logprobs::completions_value(&all, offset)
                    }
                    None => crate::logprobs::completions_value(&generated, offset),
                }
            }
        }
    }

    /// vLLM's `prompt_logprobs` field of the whole answer (null when not asked).
    fn prompt_logprobs(&self) -> Value {
        self.prompt_lp
            .as_ref()
            .map_or(Value::Null, crate::logprobs::PromptLogprobs::vllm)
    }

    /// Token `index`'s SSE frame after `produced` tokens (this one included): its log
    /// probabilities and, with continuous usage stats, the usage so far.
    fn token_frame(&self, index: u64, piece: String, produced: u64, offset: usize) -> Bytes {
        let first = produced == 1;
        let lp = self.logprobs_of(index, std::slice::from_ref(&piece), offset, first);
        let extra = api::ChunkExtra {
            logprobs: lp,
            usage: self.req.continuous_usage.then(|| self.usage(produced)),
        };
        let text = if first && !self.echo.is_empty() {
            format!("{}{piece}", self.echo)
        } else {
            piece
        };
        api::token_chunk(self.req.endpoint, &self.meta, &text, first, extra)
    }

    /// The closing frames: finish (with usage when continuous), usage if asked, `[DONE]`.
    fn closing_frames(&self, produced: u64, out: &mut Vec<u8>) {
        let ep = self.req.endpoint;
        let running = self.req.continuous_usage.then(|| self.usage(produced));
        out.extend_from_slice(&api::finish_chunk(
            ep,
            &self.meta,
            self.finish_reason,
            running,
        ));
        if self.req.include_usage {
            out.extend_from_slice(&api::usage_chunk(ep, &self.meta, self.usage(produced)));
        }
        out.extend_from_slice(api::DONE);
    }

    /// The whole answer of `produced` tokens whose texts are `pieces`.
    fn full(&self, pieces: &[String]) -> Value {
        let produced = pieces.len() as u64;
        let text = format!("{}{}", self.echo, pieces.concat());
        api::full_response(
            self.req.endpoint,
            &self.meta,
            &text,
            self.finish_reason,
            self.usage(produced),
            self.logprobs_of(0, pieces, 0, true),
            self.prompt_logprobs(),
        )
    }

    /// The prefill is done (first token sampled; `cached` is the split decided at
    /// admission): report it, then update LMCache's tiers and store the new chunks, as
    /// LMCache does.
    async fn prefill_done(&mut self, cached: CachedSplit) {
        self.cached = cached;
        {
            let mut last = self.st.last_request.lock().expect("last_request lock");
            if last.0 == self.seq {
                last.1["cached"] = json!(cached);
            }
        }
        if let Some((lm, lookup, store)) = self.kv_save.take() {
            lm.after_prefill(lookup, cached.gpu, store).await;
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
    let seq = {
        let mut last = st.last_request.lock().expect("last_request lock");
        last.0 += 1;
        last.1 = json!({
            "path": path,
            "bytes": body.len(),
            "sha256": hex::encode(Sha256::digest(&body)),
            "body": parsed.as_ref().ok().cloned().unwrap_or(Value::Null),
            "kv_handle": null,
            "cached": null,
        });
        last.0
    };
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
    let handle = kv_handle_in(headers, &req);
    let mut acc = accept(&st, seq, req, handle.as_ref()).await?;
    let check = acc.kv_check.take().map(|(check, report)| {
        st.metrics
            .kv_handle_checks
            .with_label_values(&[check.as_str()])
            .inc();
        let mut last = st.last_request.lock().expect("last_request lock");
        if last.0 == seq {
            last.1["kv_handle"] = report;
        }
        check
    });
    // whatever the result the request is served: a real engine just recomputes
    if st.zero_latency {
        // no engine and no GPU: the external hit is all there is, decided now
        let ext = acc.external.as_ref().map_or(0, |e| e.tokens());
        let cached = ext.min(acc.prompt_tokens - 1);
        let (split, chunks) = CachedSplit::of(0, acc.external.as_deref(), cached);
        record_admission(
            &st.metrics,
            &Admission {
                id: 0,
                prompt_tokens: acc.prompt_tokens,
                split,
                apc: st.sched_cfg.enable_prefix_caching,
                external: acc.external.is_some(),
                keys_loaded: chunks * acc.external.as_ref().map_or(0, |e| e.keys_per_chunk),
            },
        );
        acc.prefill_done(split).await;
        let r = with_cached(respond_now(&st, &acc), split);
        return Ok(with_kv_result(r, check));
    }
    let engine = st
        .engine
        .as_ref()
        .ok_or_else(|| ApiError::internal("engine not running"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    if !engine.submit(Submit {
        prompt_tokens: acc.prompt_tokens,
        block_hashes: acc.block_hashes.clone(),
        external: acc.external.clone(),
        max_tokens: acc.max_tokens,
        finish_reason: acc.finish_reason,
        events: tx,
    }) {
        return Err(ApiError::internal("engine stopped"));
    }
    let r = if acc.req.stream {
        stream_response(acc, rx).await?
    } else {
        collect_response(acc, rx).await?
    };
    Ok(with_kv_result(r, check))
}

/// Tokenize and check lengths, as vLLM does before scheduling.
async fn accept(
    st: &Arc<AppState>,
    seq: u64,
    req: CompletionRequest,
    handle: Option<&KvHandleIn>,
) -> Result<Accepted, ApiError> {
    fn encode(tok: &Tokenizer, prompt: &Prompt, add_special_tokens: bool) -> Vec<u32> {
        match prompt {
            Prompt::Chat(msgs) => tok.encode_with(&render_llama3_chat(msgs), add_special_tokens),
            Prompt::Text(t) => tok.encode_with(t, add_special_tokens),
            Prompt::Ids(ids) => ids.clone(),
        }
    }
    let add = req.add_special_tokens;
    let text_len = match &req.prompt {
        Prompt::Chat(msgs) => msgs.iter().map(|m| m.content.len()).sum(),
        Prompt::Text(t) => t.len(),
        Prompt::Ids(_) => 0,
    };
    // small prompts inline (cheap); large ones off the async threads
    let ids = if text_len < 16 << 10 {
        encode(&st.tokenizer, &req.prompt, add)
    } else {
        let tok = st.tokenizer.clone();
        let prompt = req.prompt.clone();
        tokio::task::spawn_blocking(move || encode(&tok, &prompt, add))
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
    // LMCache (or a custom external cache) is asked now; the GPU prefix cache at admission
    let (external, kv_save, kv_check) = match (&st.lmcache, &st.prefix_cache) {
        (Some(lm), _) => {
            let lookup = lm.query(&ids).await;
            // the lookup that decides the hits also checks the handle: one store round trip
            let check =
                handle.map(|h| check_kv_handle(h, Some((&lookup, lm.config().params.chunk_size))));
            let ext = lookup.external(lm.config().ranks.len() as u64);
            let save = (lm.clone(), lookup, !req.lmcache_skip_save());
            (Some(Arc::new(ext)), Some(save), check)
        }
        (None, Some(pc)) => {
            let tokens = pc.lookup(&st.model, &ids).await.min(prompt_tokens - 1);
            (
                Some(Arc::new(ExternalHit::single(tokens, Tier::Cpu))),
                None,
                handle.map(|h| check_kv_handle(h, None)),
            )
        }
        (None, None) => (None, None, handle.map(|h| check_kv_handle(h, None))),
    };
    let block_hashes: Arc<[u64]> = if st.sched_cfg.enable_prefix_caching && !st.zero_latency {
        crate::apc::block_hashes(&ids, st.sched_cfg.block_size).into()
    } else {
        Arc::from(Vec::new())
    };
    st.metrics.prompt_tokens.inc_by(prompt_tokens);
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
    let echo = match (&req.prompt, req.echo) {
        (_, false) | (Prompt::Chat(_), true) => String::new(),
        (Prompt::Text(t), true) => t.clone(),
        (Prompt::Ids(ids), true) => crate::tokenize::decode(&st.tokenizer, ids)?,
    };
    let seed = filler::request_seed(st.seed, &ids);
    let prompt_lp = match req.prompt_logprob_count() {
        None => None,
        // decoding every prompt token and its alternatives: off the async threads
        Some(top) => {
            let tok = st.tokenizer.clone();
            let lp = tokio::task::spawn_blocking(move || {
                crate::logprobs::for_prompt(&tok, seed, &ids, top)
            })
            .await
            .map_err(|e| ApiError::internal(format!("prompt logprobs task failed: {e}")))??;
            Some(lp)
        }
    };
    Ok(Accepted {
        echo,
        prompt_lp,
        st: st.clone(),
        seq,
        seed,
        req,
        meta,
        prompt_tokens,
        block_hashes,
        external,
        cached: CachedSplit::default(),
        max_tokens,
        finish_reason,
        kv_save,
        kv_check,
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
    if acc.req.stream {
        let mut out = Vec::new();
        let mut offset = 0;
        for i in 0..n {
            let piece = filler::token_text(acc.seed, i);
            // the next frame's offset: the characters sent so far (the echo with the first)
            let sent = piece.chars().count() + if i == 0 { acc.echo.chars().count() } else { 0 };
            out.extend_from_slice(&acc.token_frame(i, piece, i + 1, offset));
            offset += sent;
        }
        acc.closing_frames(n, &mut out);
        sse_response(Body::from(out))
    } else {
        let pieces: Vec<String> = (0..n).map(|i| filler::token_text(acc.seed, i)).collect();
        Json(acc.full(&pieces)).into_response()
    }
}

async fn collect_response(
    mut acc: Accepted,
    mut rx: mpsc::UnboundedReceiver<SeqEvent>,
) -> Result<Response, ApiError> {
    let mut pieces = Vec::new();
    let last = loop {
        let Some(ev) = rx.recv().await else {
            return Err(ApiError::internal("the engine dropped the request"));
        };
        if ev.index == 0 {
            acc.prefill_done(ev.cached).await;
        }
        pieces.push(filler::token_text(acc.seed, ev.index));
        if ev.finished {
            break ev;
        }
    };
    let mut r = Json(acc.full(&pieces)).into_response();
    r = with_cached(r, acc.cached);
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
    /// The first token, received before the response head (which carries its split).
    first: Option<SeqEvent>,
    produced: u64,
    /// Character offset of the next frame's text in the choice's text (completions'
    /// logprobs).
    offset: usize,
    phase: Phase,
}

/// SSE: one frame per token as the engine samples it (dropping the body aborts the
/// request in the engine), then the finish frame, the usage frame if asked, `[DONE]`.
/// The head waits for the first token, so that it carries the cached tokens per tier
/// decided at admission (nothing would be sent before it anyway).
async fn stream_response(
    mut acc: Accepted,
    mut rx: mpsc::UnboundedReceiver<SeqEvent>,
) -> Result<Response, ApiError> {
    let Some(first) = rx.recv().await else {
        return Err(ApiError::internal("the engine dropped the request"));
    };
    acc.prefill_done(first.cached).await;
    let cached = acc.cached;
    let state = StreamState {
        acc,
        rx,
        offset: 0,
        first: Some(first),
        produced: 0,
        phase: Phase::Tokens,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if let Phase::Done = s.phase {
            return None;
        }
        let ev = match s.first.take() {
            Some(ev) => ev,
            None => s.rx.recv().await?,
        };
        let piece = filler::token_text(s.acc.seed, ev.index);
        s.produced += 1;
        let sent = piece.chars().count()
            + if s.produced == 1 {
                s.acc.echo.chars().count()
            } else {
                0
            };
        let chunk = s.acc.token_frame(ev.index, piece, s.produced, s.offset);
        s.offset += sent;
        let out = if ev.finished {
            s.phase = Phase::Done;
            let mut out = chunk.to_vec();
            s.acc.closing_frames(s.produced, &mut out);
            Bytes::from(out)
        } else {
            chunk
        };
        Some((Ok::<Bytes, std::convert::Infallible>(out), s))
    });
    Ok(with_cached(sse_response(Body::from_stream(stream)), cached))
}
