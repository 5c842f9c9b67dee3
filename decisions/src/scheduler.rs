//! The scheduler filter: which knowledge a request needs, which pool serves it and
//! which KDN (if any) supplies the knowledge's KV. Plain data in, a decision out.
//!
//! # Knowledge requirement
//!
//! [`take_extensions`] takes the CacheRoute fields (`RAG`, `knowledge_ids`,
//! `injection`) out of the body's extra fields, so that vLLM never sees them.
//! Explicit ids are used as given ([`resolve_explicit`]: an unknown id is a 400 that
//! names it); otherwise, when RAG is on, [`retrieve`] runs BM25 over the registry with
//! the query text ([`query_text`]: the last user message, or the prompt), keeping the
//! best `retrieval_top_k` hits scoring at least `retrieval_min_score`.
//!
//! # KDN choice (per candidate pool)
//!
//! With `K` the required block ids and `m` the model, a KDN's *coverage* is the number
//! of ids `b ∈ K` with `(b, m)` in its `covers`. A KDN *qualifies* when its coverage is
//! positive and it is not overloaded. Overloaded (the original's checks, `≥`, `0`
//! disables a check): `pending ≥ kdn_pending_overload_th`, `active ≥
//! kdn_active_overload_th`, `queue_ms ≥ kdn_queue_ms_overload_th`, or the KDN says so
//! itself (`overloaded`). For a pool `p`, the KDN is the qualifying one with the highest
//! coverage, then the cheapest `link_cost_to[p]` (missing → `default_link_cost`), then
//! the smallest id. No qualifying KDN → none: the knowledge goes as text.
//!
//! # Pool choice
//!
//! Candidates: the pools whose `models` contain `m`. For each:
//!
//! * `load(p) = (inflight + queue_len) / capacity` (`1 + inflight + queue_len` when
//!   `capacity` is 0, so an unsized pool is never preferred for being unsized);
//! * `history(p)` = the fraction of `K` resident in the pool's instances' stores
//!   (`resident`); 0 when `K` is empty. Every block weighs the same (the original
//!   weighted by character length, a defect);
//! * `link(p)` = the link cost from `p`'s KDN to `p`, divided by the largest such cost
//!   among the candidates (so in `[0, 1]`); 0 without a KDN. A pool that already holds
//!   every block needs no transfer, so its link term is 0.
//!
//! **Load safety window.** A pool is *in the window* when `load(p) ≤ min_load +
//! pool_load_ratio_delta` (min over candidates; the original's
//! `SCHEDULER_CACHEROUTE_PROXY_LOAD_RATIO_DELTA`, 0.1) and, when `pool_max_queue > 0`,
//! `queue_len ≤ pool_max_queue`. Pools outside the window are skipped unless no pool is
//! in it, in which case all candidates compete.
//!
//! **Score** (higher wins), over the pools that compete:
//!
//! ```text
//! score(p) = w_history · history(p) − w_link · link(p) − w_load · load(p)
//! ```
//!
//! Ties: lower load, then name. Defaults `w_history = 1.0`, `w_link = 0.5`,
//! `w_load = 1.0`. The decision carries every KDN's and pool's inputs and score.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::bm25::Bm25Index;
use crate::openai::{ApiError, CompletionBody, Prompt};

// ---------------------------------------------------------------- configuration

/// The scheduler's knobs (a `[scheduler]` config table; every field has a default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Retrieve for every request of this deployment, not only `"RAG": true` ones.
    pub rag_always: bool,
    /// Blocks kept by retrieval (original `SCHEDULER_RETRIEVAL_TOP_K`, 1).
    pub retrieval_top_k: usize,
    /// BM25 score a hit needs (original `SCHEDULER_RETRIEVAL_MIN_SCORE` was a cosine
    /// 0.25; BM25 scores are unbounded, so the default 0 keeps every positive hit).
    pub retrieval_min_score: f64,
    /// KDN overloaded if `pending ≥` this; 0 = off
    /// (`SCHEDULER_CACHEROUTE_KDN_PENDING_OVERLOAD_TH`, default 0, README example 8).
    pub kdn_pending_overload_th: u64,
    /// KDN overloaded if `active ≥` this; 0 = off
    /// (`SCHEDULER_CACHEROUTE_KDN_ACTIVE_OVERLOAD_TH`, default 0, README example 4).
    pub kdn_active_overload_th: u64,
    /// KDN overloaded if `queue_ms ≥` this; 0 = off
    /// (`SCHEDULER_CACHEROUTE_KDN_QUEUE_MS_OVERLOAD_TH`, default 0, README example 30).
    pub kdn_queue_ms_overload_th: f64,
    /// Load safety window width over the least loaded pool
    /// (`SCHEDULER_CACHEROUTE_PROXY_LOAD_RATIO_DELTA`, 0.1).
    pub pool_load_ratio_delta: f64,
    /// Pools with more queued requests than this are outside the window; 0 = off.
    pub pool_max_queue: u64,
    /// Link cost assumed when a KDN reports none for a pool.
    pub default_link_cost: f64,
    /// Weight of knowledge history (fraction of blocks already resident).
    pub w_history: f64,
    /// Weight of the normalised KDN → pool link cost.
    pub w_link: f64,
    /// Weight of the pool's load ratio.
    pub w_load: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            rag_always: false,
            retrieval_top_k: 1,
            retrieval_min_score: 0.0,
            kdn_pending_overload_th: 0,
            kdn_active_overload_th: 0,
            kdn_queue_ms_overload_th: 0.0,
            pool_load_ratio_delta: 0.1,
            pool_max_queue: 0,
            default_link_cost: 10.0,
            w_history: 1.0,
            w_link: 0.5,
            w_load: 1.0,
        }
    }
}

// ---------------------------------------------------------------- request extensions

/// How the client asked the knowledge to be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InjectionPreference {
    /// Let the proxy filter decide (cost model).
    #[default]
    Auto,
    Kv,
    Text,
}

/// The CacheRoute fields of a request, taken out of its body.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Extensions {
    /// `"RAG"`: `None` when absent.
    pub rag: Option<bool>,
    /// `"knowledge_ids"`: `None` when absent.
    pub knowledge_ids: Option<Vec<String>>,
    pub injection: InjectionPreference,
}

fn type_error(param: &'static str, what: &str) -> ApiError {
    ApiError::bad_request("invalid_type", format!("`{param}` must be {what}")).with_param(param)
}

/// Remove `RAG`, `knowledge_ids` and `injection` from a body's extra fields (they must
/// not reach vLLM) and type-check them. `RAG`: a boolean; `knowledge_ids`: an array of
/// non-empty strings (duplicates dropped, order kept); `injection`: `"auto"`, `"kv"`
/// (also `"kvcache"`) or `"text"`. `null` counts as absent.
/// Most entries of a request's `knowledge_ids` (a prompt leads with one block, and a
/// handful follow as text: a list past this is a mistake or an attack).
pub const MAX_KNOWLEDGE_IDS: usize = 64;

pub fn take_extensions(extra: &mut Map<String, Value>) -> Result<Extensions, ApiError> {
    let mut ext = Extensions::default();
    match extra.remove("RAG") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => ext.rag = Some(b),
        Some(_) => return Err(type_error("RAG", "a boolean")),
    }
    match extra.remove("knowledge_ids") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            if items.len() > MAX_KNOWLEDGE_IDS {
                return Err(ApiError::bad_request(
                    "too_many_knowledge_ids",
                    format!(
                        "knowledge_ids has {} entries; at most {MAX_KNOWLEDGE_IDS} are accepted",
                        items.len()
                    ),
                )
                .with_param("knowledge_ids"));
            }
            let mut ids: Vec<String> = Vec::with_capacity(items.len());
            let mut seen = std::collections::HashSet::with_capacity(items.len());
            for v in items {
                match v {
                    Value::String(s) if !s.trim().is_empty() => {
                        let s = s.trim().to_string();
                        // first occurrence wins; linear in the list
                        if seen.insert(s.clone()) {
                            ids.push(s);
                        }
                    }
                    _ => return Err(type_error("knowledge_ids", "an array of non-empty strings")),
                }
            }
            ext.knowledge_ids = Some(ids);
        }
        Some(_) => return Err(type_error("knowledge_ids", "an array of non-empty strings")),
    }
    match extra.remove("injection") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            ext.injection = match s.to_ascii_lowercase().as_str() {
                "auto" => InjectionPreference::Auto,
                "kv" | "kvcache" | "kv_cache" => InjectionPreference::Kv,
                "text" => InjectionPreference::Text,
                _ => return Err(type_error("injection", "one of \"auto\", \"kv\", \"text\"")),
            }
        }
        Some(_) => return Err(type_error("injection", "one of \"auto\", \"kv\", \"text\"")),
    }
    Ok(ext)
}

/// Most bytes of a request's text that retrieval looks at: the end of it (where the
/// question is). A query's cost grows with its distinct terms, and a client must not be
/// able to make one request scan the whole index on a worker thread.
pub const MAX_QUERY_BYTES: usize = 4096;

/// The text retrieval runs on: the last user message of a chat (all messages as
/// `role: text` lines when none is from the user), or the prompt (texts joined;
/// token-id prompts have no text); at most its last [`MAX_QUERY_BYTES`].
pub fn query_text(body: &CompletionBody) -> String {
    let mut text = full_query_text(body);
    if text.len() > MAX_QUERY_BYTES {
        let mut start = text.len() - MAX_QUERY_BYTES;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text.drain(..start);
    }
    text
}

fn full_query_text(body: &CompletionBody) -> String {
    match body {
        CompletionBody::Chat(chat) => match chat.messages.iter().rev().find(|m| m.role == "user") {
            Some(m) => m.text(),
            None => chat
                .messages
                .iter()
                .map(|m| format!("{}: {}", m.role, m.text()))
                .collect::<Vec<_>>()
                .join("\n"),
        },
        CompletionBody::Completions(c) => match &c.prompt {
            Prompt::Text(s) => s.clone(),
            Prompt::Texts(v) => v.join("\n"),
            Prompt::Tokens(_) | Prompt::TokenBatches(_) => String::new(),
        },
    }
}

// ---------------------------------------------------------------- requirement

/// One retrieved block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetrievedBlock {
    pub id: String,
    pub score: f64,
}

/// The knowledge a request needs.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KnowledgeRequirement {
    /// No knowledge (not RAG, or retrieval found nothing).
    #[default]
    None,
    /// `knowledge_ids` given by the client.
    Explicit { ids: Vec<String> },
    /// Found by retrieval, best first.
    Retrieved {
        query: String,
        hits: Vec<RetrievedBlock>,
    },
}

impl KnowledgeRequirement {
    /// The required block ids, in order.
    pub fn ids(&self) -> Vec<&str> {
        match self {
            KnowledgeRequirement::None => Vec::new(),
            KnowledgeRequirement::Explicit { ids } => ids.iter().map(String::as_str).collect(),
            KnowledgeRequirement::Retrieved { hits, .. } => {
                hits.iter().map(|h| h.id.as_str()).collect()
            }
        }
    }
}

/// Explicit ids, checked against the registry: the first unknown id is a 400 naming it.
pub fn resolve_explicit(
    ids: &[String],
    known: impl Fn(&str) -> bool,
) -> Result<KnowledgeRequirement, ApiError> {
    if let Some(bad) = ids.iter().find(|id| !known(id)) {
        return Err(ApiError::bad_request(
            "unknown_knowledge_id",
            format!("unknown knowledge id `{bad}`"),
        )
        .with_param("knowledge_ids"));
    }
    if ids.is_empty() {
        return Ok(KnowledgeRequirement::None);
    }
    Ok(KnowledgeRequirement::Explicit { ids: ids.to_vec() })
}

/// BM25 retrieval over the registry's index with the config's `top_k` and `min_score`.
pub fn retrieve(cfg: &SchedulerConfig, index: &Bm25Index, query: &str) -> KnowledgeRequirement {
    let hits = index.search_min(query, cfg.retrieval_top_k, cfg.retrieval_min_score);
    if hits.is_empty() {
        return KnowledgeRequirement::None;
    }
    KnowledgeRequirement::Retrieved {
        query: query.to_string(),
        hits: hits
            .into_iter()
            .map(|h| RetrievedBlock {
                id: h.id,
                score: h.score,
            })
            .collect(),
    }
}

/// The whole requirement step: explicit ids win; otherwise retrieval when RAG is on
/// (the request's `RAG`, or `rag_always`); otherwise none.
pub fn requirement(
    cfg: &SchedulerConfig,
    ext: &Extensions,
    index: &Bm25Index,
    body: &CompletionBody,
) -> Result<KnowledgeRequirement, ApiError> {
    if let Some(ids) = &ext.knowledge_ids {
        return resolve_explicit(ids, |id| index.contains(id));
    }
    if ext.rag.unwrap_or(cfg.rag_always) {
        return Ok(retrieve(cfg, index, &query_text(body)));
    }
    Ok(KnowledgeRequirement::None)
}

// ---------------------------------------------------------------- world views

/// What the scheduler knows of one KDN.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct KdnView {
    pub id: String,
    /// `(block id, model)` pairs whose KV this KDN holds.
    pub covers: BTreeSet<(String, String)>,
    /// Injection jobs waiting.
    pub pending: u64,
    /// Injection jobs running.
    pub active: u64,
    /// Network queue delay, ms (EMA).
    pub queue_ms: f64,
    /// The KDN reports itself overloaded.
    pub overloaded: bool,
    /// Link cost to each pool (e.g. ms per MB); lower is better.
    pub link_cost_to: BTreeMap<String, f64>,
}

/// What the scheduler knows of one pool.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PoolView {
    pub name: String,
    pub models: Vec<String>,
    /// Requests waiting in the pool's admission queues.
    pub queue_len: u64,
    /// Requests running on the pool's instances.
    pub inflight: u64,
    /// Sum of the instances' in-flight limits.
    pub capacity: u64,
    /// Block ids resident in the pool's instances' KV stores.
    pub resident: BTreeSet<String>,
}

// ---------------------------------------------------------------- decision

/// One KDN as the scheduler saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KdnCandidate {
    pub id: String,
    pub coverage: usize,
    pub pending: u64,
    pub active: u64,
    pub queue_ms: f64,
    /// Which checks fired: `pending`, `active`, `queue_ms`, `self_reported`.
    pub overloaded_by: Vec<&'static str>,
    pub qualifies: bool,
}

/// One pool as the scheduler saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolCandidate {
    pub name: String,
    pub queue_len: u64,
    pub inflight: u64,
    pub capacity: u64,
    pub load: f64,
    pub in_window: bool,
    pub history: f64,
    /// The KDN that would supply this pool (none → text).
    pub kdn: Option<String>,
    pub link_cost: Option<f64>,
    pub link: f64,
    pub score: f64,
}

/// The scheduler's decision, with everything it looked at (for `/debug/strategy`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedulingDecision {
    pub model: String,
    pub knowledge: KnowledgeRequirement,
    /// `None` when no pool serves the model.
    pub pool: Option<String>,
    /// `None`: no knowledge, or no KDN qualifies (knowledge goes as text).
    pub kdn: Option<String>,
    pub reason: String,
    /// All candidates competed because none was inside the load safety window.
    pub window_overridden: bool,
    pub kdn_candidates: Vec<KdnCandidate>,
    pub pool_candidates: Vec<PoolCandidate>,
}

fn overloaded_by(cfg: &SchedulerConfig, k: &KdnView) -> Vec<&'static str> {
    let mut why = Vec::new();
    if cfg.kdn_pending_overload_th > 0 && k.pending >= cfg.kdn_pending_overload_th {
        why.push("pending");
    }
    if cfg.kdn_active_overload_th > 0 && k.active >= cfg.kdn_active_overload_th {
        why.push("active");
    }
    if cfg.kdn_queue_ms_overload_th > 0.0 && k.queue_ms >= cfg.kdn_queue_ms_overload_th {
        why.push("queue_ms");
    }
    if k.overloaded {
        why.push("self_reported");
    }
    why
}

fn load_of(p: &PoolView) -> f64 {
    let busy = (p.inflight + p.queue_len) as f64;
    if p.capacity == 0 {
        1.0 + busy
    } else {
        busy / p.capacity as f64
    }
}

/// Choose the pool and the KDN for a request needing `req` on `model`.
pub fn decide(
    cfg: &SchedulerConfig,
    req: &KnowledgeRequirement,
    model: &str,
    kdns: &[KdnView],
    pools: &[PoolView],
) -> SchedulingDecision {
    let ids = req.ids();
    let kdn_candidates: Vec<KdnCandidate> = kdns
        .iter()
        .map(|k| {
            let coverage = ids
                .iter()
                .filter(|b| k.covers.contains(&(b.to_string(), model.to_string())))
                .count();
            let why = overloaded_by(cfg, k);
            KdnCandidate {
                id: k.id.clone(),
                coverage,
                pending: k.pending,
                active: k.active,
                queue_ms: k.queue_ms,
                qualifies: coverage > 0 && why.is_empty(),
                overloaded_by: why,
            }
        })
        .collect();

    let serving: Vec<&PoolView> = pools
        .iter()
        .filter(|p| p.models.iter().any(|m| m == model))
        .collect();

    // Per pool: the best qualifying KDN (coverage, then cheapest link, then id).
    let link_cost = |k: &KdnView, pool: &str| {
        k.link_cost_to
            .get(pool)
            .copied()
            .unwrap_or(cfg.default_link_cost)
    };
    let mut pool_candidates: Vec<PoolCandidate> = serving
        .iter()
        .map(|p| {
            let best = kdns
                .iter()
                .zip(&kdn_candidates)
                .filter(|(_, c)| c.qualifies)
                .min_by(|(ka, ca), (kb, cb)| {
                    cb.coverage
                        .cmp(&ca.coverage)
                        .then_with(|| link_cost(ka, &p.name).total_cmp(&link_cost(kb, &p.name)))
                        .then_with(|| ka.id.cmp(&kb.id))
                })
                .map(|(k, _)| k);
            let history = if ids.is_empty() {
                0.0
            } else {
                ids.iter().filter(|b| p.resident.contains(**b)).count() as f64 / ids.len() as f64
            };
            PoolCandidate {
                name: p.name.clone(),
                queue_len: p.queue_len,
                inflight: p.inflight,
                capacity: p.capacity,
                load: load_of(p),
                in_window: false,
                history,
                kdn: best.map(|k| k.id.clone()),
                link_cost: best.map(|k| link_cost(k, &p.name)),
                link: 0.0,
                score: 0.0,
            }
        })
        .collect();

    // Load safety window.
    let min_load = pool_candidates
        .iter()
        .map(|c| c.load)
        .fold(f64::INFINITY, f64::min);
    for c in &mut pool_candidates {
        c.in_window = c.load <= min_load + cfg.pool_load_ratio_delta.max(0.0) + 1e-12
            && (cfg.pool_max_queue == 0 || c.queue_len <= cfg.pool_max_queue);
    }
    let window_overridden =
        !pool_candidates.is_empty() && pool_candidates.iter().all(|c| !c.in_window);

    // Score.
    let max_link = pool_candidates
        .iter()
        .filter(|c| c.history < 1.0)
        .filter_map(|c| c.link_cost)
        .fold(0.0_f64, f64::max);
    for c in &mut pool_candidates {
        c.link = match c.link_cost {
            Some(cost) if c.history < 1.0 && max_link > 0.0 => cost / max_link,
            _ => 0.0,
        };
        c.score = cfg.w_history * c.history - cfg.w_link * c.link - cfg.w_load * c.load;
    }

    let chosen = pool_candidates
        .iter()
        .filter(|c| c.in_window || window_overridden)
        .min_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.load.total_cmp(&b.load))
                .then_with(|| a.name.cmp(&b.name))
        });

    let (pool, kdn, reason) = match chosen {
        None => (None, None, format!("no pool serves model `{model}`")),
        Some(c) => {
            let why = if ids.is_empty() {
                "no knowledge required".to_string()
            } else if c.kdn.is_none() {
                "no KDN holds the knowledge for this model and is not overloaded: text".to_string()
            } else {
                format!(
                    "KDN {} covers {}/{} blocks",
                    c.kdn.as_deref().unwrap_or_default(),
                    kdn_candidates
                        .iter()
                        .find(|k| Some(&k.id) == c.kdn.as_ref())
                        .map_or(0, |k| k.coverage),
                    ids.len()
                )
            };
            let window = if window_overridden {
                "; every pool beyond the load safety window"
            } else {
                ""
            };
            (
                Some(c.name.clone()),
                c.kdn.clone(),
                format!("pool {} score {:.3}; {why}{window}", c.name, c.score),
            )
        }
    };

    SchedulingDecision {
        model: model.to_string(),
        knowledge: req.clone(),
        pool,
        kdn,
        reason,
        window_overridden,
        kdn_candidates,
        pool_candidates,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Route;
    use serde_json::json;

    const M: &str = "llama";

    fn kdn(id: &str, blocks: &[&str], links: &[(&str, f64)]) -> KdnView {
        KdnView {
            id: id.into(),
            covers: blocks
                .iter()
                .map(|b| (b.to_string(), M.to_string()))
                .collect(),
            link_cost_to: links.iter().map(|(p, c)| (p.to_string(), *c)).collect(),
            ..Default::default()
        }
    }

    fn pool(name: &str, inflight: u64, queue_len: u64, resident: &[&str]) -> PoolView {
        PoolView {
            name: name.into(),
            models: vec![M.into()],
            queue_len,
            inflight,
            capacity: 10,
            resident: resident.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn need(ids: &[&str]) -> KnowledgeRequirement {
        KnowledgeRequirement::Explicit {
            ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn cfg() -> SchedulerConfig {
        SchedulerConfig::default()
    }

    #[test]
    fn coverage_picks_the_kdn_holding_the_blocks_for_the_model() {
        let kdns = [
            kdn("k1", &["a"], &[("p", 1.0)]),
            kdn("k2", &["a", "b"], &[("p", 5.0)]),
        ];
        let pools = [pool("p", 0, 0, &[])];
        let d = decide(&cfg(), &need(&["a", "b"]), M, &kdns, &pools);
        assert_eq!(
            d.kdn.as_deref(),
            Some("k2"),
            "more coverage beats a cheaper link"
        );
        // KV for another model does not count
        let mut other = kdn("k3", &[], &[("p", 0.1)]);
        other.covers.insert(("a".into(), "qwen".into()));
        let d = decide(&cfg(), &need(&["a"]), M, &[other], &pools);
        assert_eq!(d.kdn, None);
        assert_eq!(d.pool.as_deref(), Some("p"));
        assert!(d.reason.contains("text"), "{}", d.reason);
    }

    #[test]
    fn each_overload_threshold_drops_a_kdn() {
        let pools = [pool("p", 0, 0, &[])];
        let base = || {
            [
                kdn("k1", &["a"], &[("p", 1.0)]),
                kdn("k2", &["a"], &[("p", 2.0)]),
            ]
        };
        assert_eq!(
            decide(&cfg(), &need(&["a"]), M, &base(), &pools)
                .kdn
                .as_deref(),
            Some("k1")
        );

        let c = SchedulerConfig {
            kdn_pending_overload_th: 8,
            ..cfg()
        };
        let mut ks = base();
        ks[0].pending = 7;
        assert_eq!(
            decide(&c, &need(&["a"]), M, &ks, &pools).kdn.as_deref(),
            Some("k1")
        );
        ks[0].pending = 8; // `≥`
        let d = decide(&c, &need(&["a"]), M, &ks, &pools);
        assert_eq!(d.kdn.as_deref(), Some("k2"));
        assert_eq!(d.kdn_candidates[0].overloaded_by, vec!["pending"]);

        let c = SchedulerConfig {
            kdn_active_overload_th: 4,
            ..cfg()
        };
        let mut ks = base();
        ks[0].active = 4;
        assert_eq!(
            decide(&c, &need(&["a"]), M, &ks, &pools).kdn.as_deref(),
            Some("k2")
        );

        let c = SchedulerConfig {
            kdn_queue_ms_overload_th: 30.0,
            ..cfg()
        };
        let mut ks = base();
        ks[0].queue_ms = 29.9;
        assert_eq!(
            decide(&c, &need(&["a"]), M, &ks, &pools).kdn.as_deref(),
            Some("k1")
        );
        ks[0].queue_ms = 30.0;
        assert_eq!(
            decide(&c, &need(&["a"]), M, &ks, &pools).kdn.as_deref(),
            Some("k2")
        );

        let mut ks = base();
        ks[0].overloaded = true;
        assert_eq!(
            decide(&cfg(), &need(&["a"]), M, &ks, &pools).kdn.as_deref(),
            Some("k2")
        );

        // thresholds at 0 are off
        let mut ks = base();
        ks[0].pending = 1000;
        ks[0].active = 1000;
        ks[0].queue_ms = 1e6;
        assert_eq!(
            decide(&cfg(), &need(&["a"]), M, &ks, &pools).kdn.as_deref(),
            Some("k1")
        );
    }

    #[test]
    fn no_qualifying_kdn_goes_as_text() {
        let c = SchedulerConfig {
            kdn_pending_overload_th: 1,
            ..cfg()
        };
        let mut k = kdn("k1", &["a"], &[("p", 1.0)]);
        k.pending = 3;
        let d = decide(&c, &need(&["a"]), M, &[k], &[pool("p", 0, 0, &[])]);
        assert_eq!(d.pool.as_deref(), Some("p"));
        assert_eq!(d.kdn, None);
        assert!(!d.kdn_candidates[0].qualifies);
        // no KDNs at all
        let d = decide(&cfg(), &need(&["a"]), M, &[], &[pool("p", 0, 0, &[])]);
        assert_eq!((d.pool.as_deref(), d.kdn), (Some("p"), None));
        // no knowledge: no KDN needed
        let d = decide(
            &cfg(),
            &KnowledgeRequirement::None,
            M,
            &[kdn("k1", &["a"], &[])],
            &[pool("p", 0, 0, &[])],
        );
        assert_eq!((d.pool.as_deref(), d.kdn), (Some("p"), None));
        assert!(d.reason.contains("no knowledge"));
    }

    #[test]
    fn link_cost_picks_kdn_per_pool_and_moves_the_pool() {
        // k1 is close to p1, k2 close to p2; both pools equal otherwise.
        let kdns = [
            kdn("k1", &["a"], &[("p1", 1.0), ("p2", 9.0)]),
            kdn("k2", &["a"], &[("p1", 9.0), ("p2", 3.0)]),
        ];
        let pools = [pool("p1", 0, 0, &[]), pool("p2", 0, 0, &[])];
        let d = decide(&cfg(), &need(&["a"]), M, &kdns, &pools);
        assert_eq!(d.pool.as_deref(), Some("p1"));
        assert_eq!(d.kdn.as_deref(), Some("k1"));
        assert_eq!(d.pool_candidates[1].kdn.as_deref(), Some("k2"));
        // make p1's link worse: p2 wins with k2
        let kdns = [
            kdn("k1", &["a"], &[("p1", 5.0), ("p2", 9.0)]),
            kdn("k2", &["a"], &[("p1", 9.0), ("p2", 3.0)]),
        ];
        let d = decide(&cfg(), &need(&["a"]), M, &kdns, &pools);
        assert_eq!(
            (d.pool.as_deref(), d.kdn.as_deref()),
            (Some("p2"), Some("k2"))
        );
        // a missing link costs default_link_cost
        let kdns = [kdn("k1", &["a"], &[("p2", 1.0)])];
        let d = decide(&cfg(), &need(&["a"]), M, &kdns, &pools);
        assert_eq!(d.pool.as_deref(), Some("p2"));
        assert_eq!(d.pool_candidates[0].link_cost, Some(10.0));
    }

    #[test]
    fn load_moves_the_choice() {
        let pools = [pool("p1", 1, 0, &[]), pool("p2", 0, 0, &[])];
        let d = decide(&cfg(), &KnowledgeRequirement::None, M, &[], &pools);
        assert_eq!(d.pool.as_deref(), Some("p2"));
        let pools = [pool("p1", 0, 0, &[]), pool("p2", 0, 1, &[])];
        let d = decide(&cfg(), &KnowledgeRequirement::None, M, &[], &pools);
        assert_eq!(
            d.pool.as_deref(),
            Some("p1"),
            "queued requests count as load"
        );
    }

    #[test]
    fn knowledge_history_moves_the_choice() {
        // p1 slightly busier (inside the window) but already holds the block.
        let kdns = [kdn("k1", &["a"], &[("p1", 1.0), ("p2", 1.0)])];
        let pools = [pool("p1", 1, 0, &["a"]), pool("p2", 0, 0, &[])];
        let d = decide(&cfg(), &need(&["a"]), M, &kdns, &pools);
        assert_eq!(d.pool.as_deref(), Some("p1"));
        assert_eq!(d.pool_candidates[0].history, 1.0);
        // without history, the idle pool wins
        let pools = [pool("p1", 1, 0, &[]), pool("p2", 0, 0, &[])];
        let d = decide(&cfg(), &need(&["a"]), M, &kdns, &pools);
        assert_eq!(d.pool.as_deref(), Some("p2"));
        // partial history counts by fraction
        let pools = [pool("p1", 0, 0, &["a"]), pool("p2", 0, 0, &["a", "b"])];
        let d = decide(&cfg(), &need(&["a", "b"]), M, &kdns, &pools);
        assert_eq!(d.pool.as_deref(), Some("p2"));
    }

    #[test]
    fn safety_window_skips_loaded_pools_unless_all_are() {
        // p1 holds the knowledge (history +1) but is well beyond the window.
        let pools = [pool("p1", 5, 0, &["a"]), pool("p2", 0, 0, &[])];
        let d = decide(&cfg(), &need(&["a"]), M, &[], &pools);
        assert!(!d.pool_candidates[0].in_window);
        assert_eq!(d.pool.as_deref(), Some("p2"));
        // widen the window: history wins
        let c = SchedulerConfig {
            pool_load_ratio_delta: 1.0,
            ..cfg()
        };
        let d = decide(&c, &need(&["a"]), M, &[], &pools);
        assert_eq!(d.pool.as_deref(), Some("p1"));
        // an absolute queue window: every pool beyond it → still choose among all
        let c = SchedulerConfig {
            pool_max_queue: 2,
            ..cfg()
        };
        let pools = [pool("p1", 0, 5, &[]), pool("p2", 0, 3, &[])];
        let d = decide(&c, &KnowledgeRequirement::None, M, &[], &pools);
        assert!(d.window_overridden);
        assert_eq!(d.pool.as_deref(), Some("p2"));
        assert!(d.reason.contains("window"));
        let pools = [pool("p1", 0, 5, &[]), pool("p2", 0, 2, &[])];
        let d = decide(&c, &KnowledgeRequirement::None, M, &[], &pools);
        assert!(!d.window_overridden);
        assert_eq!(d.pool.as_deref(), Some("p2"));
    }

    #[test]
    fn weights_change_the_tradeoff() {
        // p1: holds the block, busier; p2: idle, no history. Window wide open.
        let pools = [pool("p1", 3, 0, &["a"]), pool("p2", 0, 0, &[])];
        let open = SchedulerConfig {
            pool_load_ratio_delta: 10.0,
            ..cfg()
        };
        let d = decide(&open, &need(&["a"]), M, &[], &pools);
        assert_eq!(d.pool.as_deref(), Some("p1")); // 1.0 - 0.3 > 0
        let c = SchedulerConfig {
            w_load: 5.0,
            ..open.clone()
        };
        assert_eq!(
            decide(&c, &need(&["a"]), M, &[], &pools).pool.as_deref(),
            Some("p2")
        );
        let c = SchedulerConfig {
            w_history: 0.0,
            ..open.clone()
        };
        assert_eq!(
            decide(&c, &need(&["a"]), M, &[], &pools).pool.as_deref(),
            Some("p2")
        );
        // link weight: p1 far from the only KDN, p2 close; equal load
        let kdns = [kdn("k1", &["a"], &[("p1", 10.0), ("p2", 1.0)])];
        let pools = [pool("p1", 0, 0, &[]), pool("p2", 1, 0, &[])];
        let c = SchedulerConfig {
            w_link: 0.0,
            ..open.clone()
        };
        assert_eq!(
            decide(&c, &need(&["a"]), M, &kdns, &pools).pool.as_deref(),
            Some("p1")
        );
        let c = SchedulerConfig {
            w_link: 1.0,
            ..open
        };
        assert_eq!(
            decide(&c, &need(&["a"]), M, &kdns, &pools).pool.as_deref(),
            Some("p2")
        );
    }

    #[test]
    fn only_pools_serving_the_model_compete() {
        let mut other = pool("q", 0, 0, &[]);
        other.models = vec!["qwen".into()];
        let d = decide(
            &cfg(),
            &KnowledgeRequirement::None,
            M,
            &[],
            &[other.clone()],
        );
        assert_eq!(d.pool, None);
        assert!(d.reason.contains("no pool serves"));
        let d = decide(
            &cfg(),
            &KnowledgeRequirement::None,
            M,
            &[],
            &[other, pool("p", 9, 9, &[])],
        );
        assert_eq!(d.pool.as_deref(), Some("p"));
        assert_eq!(d.pool_candidates.len(), 1);
    }

    #[test]
    fn decision_serialises_with_every_candidate() {
        let kdns = [kdn("k1", &["a"], &[("p1", 2.0)]), kdn("k2", &[], &[])];
        let pools = [pool("p1", 1, 0, &[]), pool("p2", 0, 0, &["a"])];
        let d = decide(&cfg(), &need(&["a"]), M, &kdns, &pools);
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["kdn_candidates"].as_array().unwrap().len(), 2);
        assert_eq!(v["pool_candidates"].as_array().unwrap().len(), 2);
        assert_eq!(v["knowledge"]["kind"], "explicit");
        for c in v["pool_candidates"].as_array().unwrap() {
            for key in ["load", "in_window", "history", "link", "score", "kdn"] {
                assert!(c.get(key).is_some(), "{key} missing in {c}");
            }
        }
    }

    #[test]
    fn config_defaults_and_overrides() {
        let c: SchedulerConfig = serde_json::from_value(json!({})).unwrap();
        assert_eq!(c, SchedulerConfig::default());
        assert_eq!(c.kdn_pending_overload_th, 0);
        assert_eq!(c.pool_load_ratio_delta, 0.1);
        let c: SchedulerConfig =
            serde_json::from_value(json!({"kdn_queue_ms_overload_th": 30.0, "w_link": 2})).unwrap();
        assert_eq!((c.kdn_queue_ms_overload_th, c.w_link), (30.0, 2.0));
        assert!(serde_json::from_value::<SchedulerConfig>(json!({"typo": 1})).is_err());
    }

    #[test]
    fn extensions_are_taken_out_and_type_checked() {
        let mut m: Map<String, Value> = serde_json::from_value(json!({
            "RAG": true, "knowledge_ids": ["a", " b ", "a"], "injection": "KV", "user": "x"
        }))
        .unwrap();
        let e = take_extensions(&mut m).unwrap();
        assert_eq!(e.rag, Some(true));
        assert_eq!(
            e.knowledge_ids,
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(e.injection, InjectionPreference::Kv);
        assert_eq!(m.len(), 1, "only the unknown field stays: {m:?}");

        for (body, param) in [
            (json!({"RAG": "yes"}), "RAG"),
            (json!({"knowledge_ids": "a"}), "knowledge_ids"),
            (json!({"knowledge_ids": ["a", 3]}), "knowledge_ids"),
            (json!({"knowledge_ids": [""]}), "knowledge_ids"),
            (json!({"injection": "fast"}), "injection"),
            (json!({"injection": 1}), "injection"),
        ] {
            let mut m: Map<String, Value> = serde_json::from_value(body).unwrap();
            let err = take_extensions(&mut m).unwrap_err();
            assert_eq!(
                (err.status, err.param),
                (400, Some(param)),
                "{}",
                err.message
            );
        }
        let mut m = Map::new();
        assert_eq!(take_extensions(&mut m).unwrap(), Extensions::default());
    }

    #[test]
    fn a_long_query_keeps_only_its_end() {
        let long = format!(
            "{}Which tower is in Paris?",
            "é padding words ".repeat(100_000)
        );
        let body = CompletionBody::parse(
            Route::Chat,
            json!({"model": "m", "messages": [{"role": "user", "content": long}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let q = query_text(&body);
        assert!(
            q.len() <= MAX_QUERY_BYTES && q.len() > MAX_QUERY_BYTES - 4,
            "{}",
            q.len()
        );
        assert!(q.ends_with("Which tower is in Paris?"));
    }

    #[test]
    fn knowledge_ids_are_bounded() {
        let ids = |n: usize| -> Map<String, Value> {
            let list: Vec<String> = (0..n).map(|i| format!("id-{}", i % 50)).collect();
            serde_json::from_value(json!({ "knowledge_ids": list })).unwrap()
        };
        let e = take_extensions(&mut ids(MAX_KNOWLEDGE_IDS)).unwrap();
        assert_eq!(e.knowledge_ids.unwrap().len(), 50, "duplicates dropped");
        for n in [MAX_KNOWLEDGE_IDS + 1, 60_000] {
            let err = take_extensions(&mut ids(n)).unwrap_err();
            assert_eq!(
                (err.status, err.code, err.param),
                (400, "too_many_knowledge_ids", Some("knowledge_ids"))
            );
            assert!(err.message.contains(&n.to_string()), "{}", err.message);
        }
    }

    #[test]
    fn requirement_explicit_retrieved_or_none() {
        let mut ix = Bm25Index::new();
        ix.insert("eiffel", "The Eiffel Tower is a lattice tower in Paris");
        ix.insert("nba", "National Basketball Association scoring leaders");
        let body = CompletionBody::parse(
            Route::Chat,
            br#"{"model":"llama","messages":[{"role":"user","content":"old question about basketball"},
                {"role":"assistant","content":"..."},{"role":"user","content":"Which tower is in Paris?"}]}"#,
        )
        .unwrap();
        assert_eq!(query_text(&body), "Which tower is in Paris?");
        let c = cfg();
        let rag = Extensions {
            rag: Some(true),
            ..Default::default()
        };
        let r = requirement(&c, &rag, &ix, &body).unwrap();
        assert_eq!(r.ids(), vec!["eiffel"]);
        assert!(matches!(r, KnowledgeRequirement::Retrieved { .. }));
        // no RAG → none, unless the pool config says always
        let r = requirement(&c, &Extensions::default(), &ix, &body).unwrap();
        assert_eq!(r, KnowledgeRequirement::None);
        let always = SchedulerConfig {
            rag_always: true,
            ..cfg()
        };
        assert_eq!(
            requirement(&always, &Extensions::default(), &ix, &body)
                .unwrap()
                .ids(),
            vec!["eiffel"]
        );
        // min_score drops weak hits
        let strict = SchedulerConfig {
            retrieval_min_score: 1e6,
            ..cfg()
        };
        assert_eq!(
            requirement(&strict, &rag, &ix, &body).unwrap(),
            KnowledgeRequirement::None
        );
        // explicit ids win and are checked
        let ext = Extensions {
            knowledge_ids: Some(vec!["nba".into()]),
            ..rag.clone()
        };
        assert_eq!(
            requirement(&c, &ext, &ix, &body).unwrap().ids(),
            vec!["nba"]
        );
        let ext = Extensions {
            knowledge_ids: Some(vec!["nba".into(), "zzz".into()]),
            ..rag
        };
        let err = requirement(&c, &ext, &ix, &body).unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.message.contains("zzz"));
        // completions prompt
        let body = CompletionBody::parse(
            Route::Completions,
            br#"{"model":"m","prompt":"basketball leaders"}"#,
        )
        .unwrap();
        assert_eq!(query_text(&body), "basketball leaders");
    }
}
