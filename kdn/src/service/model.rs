//! [`ModelRuntime`]: one configured model with its key parameters and tokenizer, which
//! lays a knowledge text out as that model's prefix and computes its LMCache keys.

use std::sync::Arc;

use anyhow::Context;
use axum::http::StatusCode;

use cacheroute_decisions::prompt::knowledge_prefix;

use super::{unix_now, KdnError};
use crate::config::ModelConfig;
use crate::keys::{chunk_keys_all_ranks, KeyError, KeyParams};
use crate::layout::layout_knowledge;
use crate::registry::{BlockStatus, ModelEntry};
use crate::tokenizer::Tokenizer;

/// Why a model could not key a prefix, or recompute a registered entry's prefix.
#[derive(Debug, thiserror::Error)]
pub enum PrefixError {
    /// The LMCache key computation refused the ids.
    #[error("model {model}: {source}")]
    Keys {
        model: String,
        #[source]
        source: KeyError,
    },
    /// Re-tokenising the entry's content gives other ids or keys than at registration.
    #[error(
        "model {model}: the tokenizer or key settings changed since the block was \
         registered (now {now} tokens, registered {registered}); delete and register it again"
    )]
    Changed {
        model: String,
        now: usize,
        registered: usize,
    },
}

/// One model, ready to lay out and key prefixes.
pub struct ModelRuntime {
    pub cfg: ModelConfig,
    pub key_params: KeyParams,
    pub tokenizer: Arc<Tokenizer>,
}

impl ModelRuntime {
    pub fn new(cfg: &ModelConfig) -> anyhow::Result<ModelRuntime> {
        let key_params = cfg.key_params()?;
        let tokenizer = cfg
            .tokenizer
            .resolve(&[&cfg.name, &cfg.lmcache_model], cfg.vocab_size)
            .with_context(|| format!("model {}", cfg.name))?;
        Ok(ModelRuntime {
            cfg: cfg.clone(),
            key_params,
            tokenizer,
        })
    }

    /// Lay out and key `text` (normalised) for this model: the entry and the prefix ids.
    pub(super) fn prepare(&self, text: &str) -> Result<(ModelEntry, Vec<u32>), KdnError> {
        let cfg = &self.cfg;
        let layout = layout_knowledge(cfg.template, &self.tokenizer, text, cfg.chunk_size)
            .map_err(|e| {
                KdnError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request_error",
                    "layout_failed",
                    format!("model {}: {e}", cfg.name),
                )
            })?;
        let keys = self
            .keys(&layout.token_ids)
            .map_err(|e| KdnError::internal(e.to_string()))?;
        let tokens = layout.token_ids.len();
        Ok((
            ModelEntry {
                status: BlockStatus::Registered,
                error: None,
                template: cfg.template,
                tokens,
                chunks: tokens / cfg.chunk_size,
                chunk_size: cfg.chunk_size,
                padding: layout.padding,
                bytes: tokens as u64 * cfg.kv_bytes_per_token,
                world_size: cfg.world_size,
                content: layout.content,
                keys,
                resident: Vec::new(),
                updated_at: unix_now(),
            },
            layout.token_ids,
        ))
    }

    /// Chunk-major keys of every rank.
    fn keys(&self, ids: &[u32]) -> Result<Vec<String>, PrefixError> {
        let per_rank =
            chunk_keys_all_ranks(&self.key_params, ids).map_err(|source| PrefixError::Keys {
                model: self.cfg.name.clone(),
                source,
            })?;
        let chunks = per_rank.first().map_or(0, |r| r.len());
        let mut keys = Vec::with_capacity(chunks * per_rank.len());
        for c in 0..chunks {
            for rank in &per_rank {
                keys.push(rank[c].key.clone());
            }
        }
        Ok(keys)
    }

    /// The prefix ids of a registered entry (re-tokenised), checked against its keys.
    pub(super) fn ids_of(&self, entry: &ModelEntry) -> Result<Vec<u32>, PrefixError> {
        let prefix = knowledge_prefix(entry.template, &entry.content);
        let ids = self
            .tokenizer
            .encode_with(&prefix, entry.template.add_special_tokens());
        let keys = self.keys(&ids)?;
        if ids.len() != entry.tokens || keys != entry.keys {
            return Err(PrefixError::Changed {
                model: self.cfg.name.clone(),
                now: ids.len(),
                registered: entry.tokens,
            });
        }
        Ok(ids)
    }
}
