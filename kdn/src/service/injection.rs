//! Inject requests: resolving the target (a configured name or an allowed store URL),
//! checking every block is `kv_ready` for the model, and queueing the job.

use std::sync::Arc;

use serde::Deserialize;

use super::{Kdn, KdnError};
use crate::config::is_store_url;
use crate::inject::{BlockSpec, Job, SubmitError, Target};
use crate::registry::BlockStatus;

/// An inject request (`POST /v1/inject`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRequest {
    pub knowledge_ids: Vec<String>,
    /// Served model name.
    pub model: String,
    /// A configured target name, or a store URL (`redis://…`, `memory://NAME`).
    pub target: String,
    /// Answer when the job finished (or after `timeout_ms`).
    #[serde(default)]
    pub wait: bool,
    /// Limit of `wait`, in ms (default 600000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl Kdn {
    /// Resolve an inject target: a configured name, or a store URL.
    pub fn resolve_target(&self, target: &str) -> Result<Target, KdnError> {
        if let Some(t) = self.targets.iter().find(|t| t.name == target) {
            return Ok(t.clone());
        }
        if let Some(t) = self.targets.iter().find(|t| t.url == target) {
            return Ok(t.clone());
        }
        if is_store_url(target) {
            if !self.config.kdn.allow_url_targets {
                return Err(KdnError::forbidden(
                    "target_not_allowed",
                    format!(
                        "target {target:?} is a store URL; this KDN injects only into its \
                         configured [[targets]] (set [kdn] allow_url_targets to allow URLs)"
                    ),
                ));
            }
            return Ok(Target {
                name: target.to_string(),
                url: target.to_string(),
                link_gbps: None,
            });
        }
        let known: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
        Err(KdnError::bad_request(
            "unknown_target",
            format!(
                "unknown target {target:?}: give a configured target ({}) or a store URL \
                 (redis://host:port[/db], memory://NAME)",
                if known.is_empty() {
                    "none configured".to_string()
                } else {
                    known.join(", ")
                }
            ),
        ))
    }

    /// Validate and queue an inject request.
    pub fn inject(&self, req: &InjectRequest) -> Result<Arc<Job>, KdnError> {
        if req.knowledge_ids.is_empty() {
            return Err(KdnError::bad_request(
                "no_knowledge",
                "knowledge_ids is empty",
            ));
        }
        let rt = self.model(&req.model)?;
        let target = self.resolve_target(&req.target)?;
        let mut blocks = Vec::with_capacity(req.knowledge_ids.len());
        for id in &req.knowledge_ids {
            let rec = self.registry.get(id).ok_or_else(|| {
                KdnError::not_found("knowledge_not_found", format!("knowledge {id:?} not found"))
            })?;
            let entry = rec.models.get(&req.model).ok_or_else(|| {
                KdnError::conflict(
                    "not_registered_for_model",
                    format!(
                        "knowledge {id:?} is not registered for model {:?}; register it again \
                         with that model",
                        req.model
                    ),
                )
            })?;
            if entry.status != BlockStatus::KvReady {
                return Err(KdnError::conflict(
                    "not_kv_ready",
                    format!(
                        "knowledge {id:?} is not kv_ready for model {:?} (status: {}{}); use \
                         text injection",
                        req.model,
                        entry.status.name(),
                        entry
                            .error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                ));
            }
            blocks.push(BlockSpec {
                block_id: id.clone(),
                keys: entry.keys.clone(),
                world_size: entry.world_size,
                logical_bytes_per_key: rt.cfg.logical_bytes_per_key(),
            });
        }
        self.injector
            .submit(&req.model, target, blocks)
            .map_err(|e| match e {
                SubmitError::QueueFull { .. } => KdnError::unavailable("queue_full", e.to_string()),
                SubmitError::Empty => KdnError::bad_request("no_knowledge", e.to_string()),
            })
    }
}
