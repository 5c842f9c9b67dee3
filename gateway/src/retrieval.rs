//! The knowledge requirement of a request: explicit ids, or retrieval over the
//! synced catalog (BM25 in process; or cosine similarity of embeddings from an
//! OpenAI-compatible `/v1/embeddings` endpoint, when one is configured).
//!
//! Block embeddings are computed by the sync task when the catalog changes, so a
//! request only embeds its own query; if that call fails, retrieval falls back to
//! BM25 instead of failing the request.

use crate::config::KnowledgeSection;
use crate::knowledge::{Catalog, IndexText};
use crate::pull::PullError;
use cacheroute_decisions::openai::{ApiError, CompletionBody};
use cacheroute_decisions::scheduler::{
    query_text, resolve_explicit, retrieve, Extensions, KnowledgeRequirement, RetrievedBlock,
    SchedulerConfig,
};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Blocks embedded per call to the endpoint.
const EMBED_BATCH: usize = 64;
/// The request-path embedding call gets this long before BM25 takes over.
const QUERY_EMBED_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Deserialize)]
struct EmbeddingList {
    data: Vec<Embedding>,
}

#[derive(Deserialize)]
struct Embedding {
    index: usize,
    embedding: Vec<f32>,
}

/// Why an embeddings call gave no usable vectors.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Pull(#[from] PullError),
    /// The endpoint answered with a different number of vectors than inputs.
    #[error("{url}: {got} embeddings for {want} inputs")]
    Count {
        url: String,
        got: usize,
        want: usize,
    },
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

async fn embed(
    client: &reqwest::Client,
    cfg: &KnowledgeSection,
    inputs: &[String],
    timeout: Duration,
) -> Result<Vec<Vec<f32>>, EmbedError> {
    let url = format!("{}/v1/embeddings", cfg.embeddings_url.trim_end_matches('/'));
    let body = serde_json::json!({"model": cfg.embeddings_model, "input": inputs});
    let resp = client
        .post(&url)
        .json(&body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| PullError::send(&url, e))?;
    if !resp.status().is_success() {
        return Err(PullError::status(&url, resp.status()).into());
    }
    let body = resp.bytes().await.map_err(|e| PullError::body(&url, e))?;
    let mut list: EmbeddingList =
        serde_json::from_slice(&body).map_err(|e| PullError::json(&url, e))?;
    if list.data.len() != inputs.len() {
        return Err(EmbedError::Count {
            url,
            got: list.data.len(),
            want: inputs.len(),
        });
    }
    list.data.sort_by_key(|e| e.index);
    Ok(list
        .data
        .into_iter()
        .map(|e| normalised(e.embedding))
        .collect())
}

/// Embed the blocks of `catalog` that have no embedding yet (no-op without an
/// endpoint). Failures leave blocks unembedded; they are retried on the next change.
pub async fn embed_catalog(
    client: &reqwest::Client,
    cfg: &KnowledgeSection,
    mut catalog: Catalog,
) -> Catalog {
    if cfg.embeddings_url.is_empty() {
        return catalog;
    }
    let mut missing: Vec<String> = catalog
        .blocks
        .keys()
        .filter(|id| !catalog.embeddings.contains_key(*id))
        .cloned()
        .collect();
    missing.sort();
    for batch in missing.chunks(EMBED_BATCH) {
        let texts: Vec<String> = batch
            .iter()
            .map(|id| catalog.blocks[id].block.index_text())
            .collect();
        match embed(client, cfg, &texts, Duration::from_secs(30)).await {
            Ok(vectors) => {
                for (id, v) in batch.iter().zip(vectors) {
                    catalog.embeddings.insert(id.clone(), v);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "embedding knowledge blocks; BM25 serves meanwhile");
                break;
            }
        }
    }
    catalog
}

/// The best `top_k` blocks by cosine similarity to `query` (both normalised).
pub fn rank_by_embedding(
    catalog: &Catalog,
    query: &[f32],
    top_k: usize,
    min_score: f64,
) -> Vec<RetrievedBlock> {
    let mut scored: Vec<RetrievedBlock> = catalog
        .embeddings
        .iter()
        .filter(|(_, v)| v.len() == query.len())
        .map(|(id, v)| RetrievedBlock {
            id: id.clone(),
            score: v.iter().zip(query).map(|(a, b)| a * b).sum::<f32>() as f64,
        })
        .filter(|h| h.score >= min_score && h.score > 0.0)
        .collect();
    scored.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
    scored.truncate(top_k);
    scored
}

/// The requirement step: explicit ids (checked against the catalog) win; otherwise
/// retrieval when RAG is on (the request's `RAG`, `scheduler.rag_always`, or
/// `rag_always` on a pool serving the model).
pub async fn requirement(
    client: &reqwest::Client,
    knowledge: &KnowledgeSection,
    cfg: &SchedulerConfig,
    rag_always: bool,
    ext: &Extensions,
    catalog: &Arc<Catalog>,
    body: &CompletionBody,
) -> Result<KnowledgeRequirement, ApiError> {
    if let Some(ids) = &ext.knowledge_ids {
        return resolve_explicit(ids, |id| catalog.contains(id));
    }
    if !ext.rag.unwrap_or(cfg.rag_always || rag_always) {
        return Ok(KnowledgeRequirement::None);
    }
    let query = query_text(body);
    if !knowledge.embeddings_url.is_empty() && !catalog.embeddings.is_empty() {
        match embed(
            client,
            knowledge,
            std::slice::from_ref(&query),
            QUERY_EMBED_TIMEOUT,
        )
        .await
        {
            Ok(mut v) => {
                let q = v.pop().unwrap_or_default();
                let hits =
                    rank_by_embedding(catalog, &q, cfg.retrieval_top_k, cfg.retrieval_min_score);
                return Ok(if hits.is_empty() {
                    KnowledgeRequirement::None
                } else {
                    KnowledgeRequirement::Retrieved { query, hits }
                });
            }
            Err(e) => tracing::warn!(error = %e, "query embedding failed; using BM25"),
        }
    }
    if query.len().saturating_mul(catalog.blocks.len()) <= BM25_INLINE_WORK {
        return Ok(retrieve(cfg, &catalog.index, &query));
    }
    // A long query over a large catalog takes milliseconds (4 KiB over 100,000
    // blocks: ~6 ms, `cargo bench --bench worker_bound`): off the worker thread.
    let (cfg, catalog) = (cfg.clone(), catalog.clone());
    tokio::task::spawn_blocking(move || retrieve(&cfg, &catalog.index, &query))
        .await
        .map_err(|e| {
            ApiError::new(
                500,
                "server_error",
                "retrieval_failed",
                format!("retrieval task failed: {e}"),
            )
        })
}

/// Query bytes × catalog blocks up to which BM25 runs on the worker thread (a 4 KiB
/// query over 2,000 blocks, well under a millisecond); above it, on the blocking pool.
const BM25_INLINE_WORK: usize = 8 << 20;
