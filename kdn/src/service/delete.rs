//! Deleting a block: the registry record, then (unless kept) the chunks no other block
//! uses, from the KDN store and from the `memory://` targets it was injected into.

use std::collections::HashSet;

use serde_json::{json, Value};

use super::{lock, Kdn, KdnError};
use crate::registry::redact_url;

impl Kdn {
    /// Delete a block from the registry and (unless `keep_kv`) its chunks from the KDN
    /// store and from the `memory://` targets it was injected into, except chunks that
    /// another registered block also uses. O(the block's keys): the registry counts
    /// references per key, so nothing else is scanned. Chunks copied into Redis targets
    /// are left to those instances' LMCache (it may hold the same keys from its own
    /// prefills, and evicts them itself).
    pub async fn delete(&self, id: &str, keep_kv: bool) -> Result<Value, KdnError> {
        let rec = self
            .registry
            .remove(id)
            .await
            .map_err(|e| KdnError::unavailable("registry_unavailable", e.to_string()))?
            .ok_or_else(|| {
                KdnError::not_found("knowledge_not_found", format!("knowledge {id:?} not found"))
            })?;
        lock(&self.deferred).forget_block(id, rec.models.keys().cloned());
        let mut deleted = 0usize;
        let mut target_deleted = 0usize;
        let mut kv_error = None;
        if !keep_kv {
            let mut seen = HashSet::new();
            let keys: Vec<String> = rec
                .models
                .values()
                .flat_map(|m| m.keys.iter())
                .filter(|k| !self.registry.key_in_use(k) && seen.insert(k.as_str()))
                .cloned()
                .collect();
            match self.store.delete_chunks(&keys).await {
                Ok(n) => deleted = n,
                Err(e) => {
                    kv_error = Some(format!(
                        "deleting chunks from the KDN store {}: {e}",
                        redact_url(&self.config.kdn.store)
                    ))
                }
            }
            let resident: HashSet<&String> = rec
                .models
                .values()
                .flat_map(|m| m.resident.iter())
                .collect();
            for name in resident {
                let url = self
                    .targets
                    .iter()
                    .find(|t| &t.name == name)
                    .map_or(name.as_str(), |t| t.url.as_str());
                if !url.starts_with("memory://") {
                    continue;
                }
                let r = match self.injector.open_target(url).await {
                    Ok(t) => t.delete_chunks(&keys).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(n) => target_deleted += n,
                    Err(e) => {
                        kv_error.get_or_insert(format!("deleting chunks from target {name}: {e}"));
                    }
                }
            }
        }
        Ok(json!({
            "id": id,
            "object": "knowledge.deleted",
            "deleted": true,
            "kv_chunks_deleted": deleted,
            "target_chunks_deleted": target_deleted,
            "kv_error": kv_error,
        }))
    }
}
