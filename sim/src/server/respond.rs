//! Answering a completion: at once (zero-latency mode), collected until the engine
//! finishes, or streamed as SSE frames as the engine produces tokens.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::mpsc;

use super::{with_cached, Accepted, AppState};
use crate::api::ApiError;
use crate::engine::SeqEvent;
use crate::filler;

pub(super) fn sse_response(body: Body) -> Response {
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
pub(super) fn respond_now(st: &AppState, acc: &Accepted) -> Response {
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

pub(super) async fn collect_response(
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
pub(super) async fn stream_response(
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
