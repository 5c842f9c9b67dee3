//! `[knowledge]`: retrieval, sync from the KDNs, prompt layout, and the KDNs themselves.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnowledgeSection {
    /// How often each KDN's registry (versioned: unchanged costs a 304) and load, and
    /// each agent's load, are pulled.
    pub sync_interval_ms: u64,
    /// Timeout of one pull.
    pub sync_timeout_ms: u64,
    /// Seconds a registered member lives without a heartbeat, when it does not say.
    pub member_ttl_s: f64,
    /// Most members (KDNs and agents) registered at once; more are refused (429).
    pub max_members: usize,
    /// Optional OpenAI-compatible embeddings endpoint (vLLM, TEI): base URL. When set,
    /// retrieval ranks blocks by cosine similarity of embeddings instead of BM25.
    pub embeddings_url: String,
    /// Model name sent to the embeddings endpoint.
    pub embeddings_model: String,
    /// Bearer token for the KDNs' write paths (the gateway asks them to inject);
    /// empty: `CACHEROUTE_KDN_TOKEN` from the environment, else none.
    pub kdn_token: String,
}

impl Default for KnowledgeSection {
    fn default() -> Self {
        KnowledgeSection {
            sync_interval_ms: 1_000,
            sync_timeout_ms: 2_000,
            member_ttl_s: 10.0,
            max_members: 256,
            embeddings_url: String::new(),
            embeddings_model: String::new(),
            kdn_token: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdnConfig {
    /// Base URL of the KDN API.
    pub url: String,
}
