//! The HTTP surface: vLLM's OpenAI server routes over the simulated engine.
//!
//! This file holds the router and the completion path (validation, admission to the
//! engine, token accounting); `state` holds the shared state and the header names,
//! `info` the small routes (models, health, metrics, debug), `embed` the
//! embeddings route, `kv_handle` the KV-handle check, and `respond` the answers
//! (at once, collected, or streamed as SSE).

use crate::api::{self, ApiError, CompletionRequest, Endpoint, KvHandleCheck, Prompt, RespMeta};
use crate::engine::{record_admission, Admission, CachedSplit, ExternalHit, Submit, Tier};
use crate::filler;
use crate::lmcache::{LmCache, Lookup};
use crate::tokenizer::{render_llama3_chat, Tokenizer};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

mod embed;
mod info;
mod kv_handle;
mod respond;
mod state;

use embed::embeddings_route;
use info::{engine_debug, health, last_request, metrics, models, not_found, version};
use kv_handle::{check_kv_handle, kv_handle_in, with_cached, with_kv_result, KvHandleIn};
use respond::{collect_response, respond_now, stream_response};
pub use state::{
    unix_now, AppState, CACHED_CPU_HEADER, CACHED_GPU_HEADER, CACHED_REMOTE_HEADER,
    DEFAULT_MAX_TOKENS, KV_HANDLE_HEADER, KV_HANDLE_RESULT_HEADER, MAX_BODY_BYTES,
};

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
