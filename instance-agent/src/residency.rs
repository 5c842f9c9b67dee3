//! Which knowledge blocks are already in this instance's LMCache store.
//!
//! The KDN lists every block with, per model, its LMCache chunk keys
//! (chunk-major: chunk 0 rank 0, chunk 0 rank 1, …, `world_size` keys per chunk).
//! LMCache can only reuse a prefix, so what counts is how many *leading* chunks
//! have every rank's key present; a block is resident when all its chunks are.

use crate::engine::error_chain;
use crate::metrics::AgentMetrics;
use cacheroute_lmcache::store::{open_store, KvStore};
use serde::Serialize;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// One block × model as checked against the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResidentEntry {
    pub id: String,
    pub model: String,
    pub chunks: usize,
    pub resident_chunks: usize,
}

impl ResidentEntry {
    pub fn is_resident(&self) -> bool {
        self.chunks > 0 && self.resident_chunks == self.chunks
    }
}

/// A block × model from the KDN's list, with its keys if the KDN gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockKeys {
    pub id: String,
    pub model: String,
    pub chunks: usize,
    pub world_size: usize,
    pub keys: Option<Vec<String>>,
}

/// Pick the blocks out of `GET /v1/knowledge?keys=1` (`{"data":[{"id","models":{..}}]}`),
/// keeping only `model` when given. Malformed entries are skipped, not fatal.
pub fn parse_kdn_list(v: &Value, model: Option<&str>) -> Vec<BlockKeys> {
    let mut out = Vec::new();
    let Some(data) = v.get("data").and_then(Value::as_array) else {
        return out;
    };
    for block in data {
        let Some(id) = block.get("id").and_then(Value::as_str) else {
            continue;
        };
        let Some(models) = block.get("models").and_then(Value::as_object) else {
            continue;
        };
        for (name, m) in models {
            if model.is_some_and(|want| want != name) {
                continue;
            }
            let chunks = m.get("chunks").and_then(Value::as_u64).unwrap_or(0) as usize;
            let keys: Option<Vec<String>> = m.get("keys").and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            });
            // without world_size, infer it from the key count (a KDN always sends both)
            let world_size = m
                .get("world_size")
                .and_then(Value::as_u64)
                .map(|w| w as usize)
                .or_else(|| {
                    let n = keys.as_ref()?.len();
                    (chunks > 0 && n % chunks == 0).then_some(n / chunks)
                })
                .unwrap_or(1)
                .max(1);
            out.push(BlockKeys {
                id: id.to_string(),
                model: name.clone(),
                chunks,
                world_size,
                keys,
            });
        }
    }
    out
}

/// Leading chunks of `b` whose every rank's key is in `store` (0 when the keys
/// are missing or do not match `chunks × world_size`).
pub async fn resident_chunks(
    store: &dyn KvStore,
    b: &BlockKeys,
) -> Result<usize, cacheroute_lmcache::store::StoreError> {
    let Some(keys) = &b.keys else {
        return Ok(0);
    };
    if b.chunks == 0 || keys.len() != b.chunks * b.world_size {
        return Ok(0);
    }
    // chunk-major order: a present key prefix of length p covers p / W whole chunks
    let present = store.longest_present_prefix(keys).await?;
    Ok((present / b.world_size).min(b.chunks))
}

/// Check every block; a block whose lookup fails counts as not resident.
/// Returns the entries and how many lookups failed.
pub async fn check_all(store: &dyn KvStore, blocks: &[BlockKeys]) -> (Vec<ResidentEntry>, usize) {
    let mut out = Vec::with_capacity(blocks.len());
    let mut failed = 0;
    for b in blocks {
        let resident = match resident_chunks(store, b).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(id = %b.id, model = %b.model, error = %e, "store lookup failed");
                failed += 1;
                0
            }
        };
        out.push(ResidentEntry {
            id: b.id.clone(),
            model: b.model.clone(),
            chunks: b.chunks,
            resident_chunks: resident,
        });
    }
    (out, failed)
}

/// Ids of blocks fully resident for at least one (kept) model, in list order.
pub fn resident_ids(entries: &[ResidentEntry]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for e in entries.iter().filter(|e| e.is_resident()) {
        if !ids.contains(&e.id) {
            ids.push(e.id.clone());
        }
    }
    ids
}

/// Settings of the residency loop.
pub struct ResidencyConfig {
    pub kdn: String,
    pub store_url: String,
    pub model: Option<String>,
    pub interval: Duration,
}

/// Tracks whether a dependency is failing, to warn once per outage.
#[derive(Default)]
struct Health(Option<bool>);

impl Health {
    fn ok(&mut self, what: &str, url: &str) {
        if self.0 == Some(false) {
            tracing::info!(%url, "{what} reachable again");
        }
        self.0 = Some(true);
    }
    fn failed(&mut self, what: &str, url: &str, error: &str) {
        if self.0 != Some(false) {
            tracing::warn!(%url, %error, "{what} failed; retrying");
        } else {
            tracing::debug!(%url, %error, "{what} failed");
        }
        self.0 = Some(false);
    }
}

/// Why the KDN's knowledge list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The request failed, or the body was not JSON (the whole error chain).
    #[error("{0}")]
    Request(String),
    /// The KDN answered with an error status.
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
}

async fn fetch_list(client: &reqwest::Client, url: &str) -> Result<Value, ListError> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| ListError::Request(error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(ListError::Status(resp.status()));
    }
    resp.json::<Value>()
        .await
        .map_err(|e| ListError::Request(error_chain(&e)))
}

/// Every `interval`, list the KDN's blocks and check them against the store.
/// The store is opened lazily (and again after a failure to open), so a Redis that
/// starts after the agent is picked up. When the KDN cannot be reached the last
/// results stay (the store still holds what it held).
pub async fn residency_loop(
    client: reqwest::Client,
    cfg: ResidencyConfig,
    shared: Arc<Mutex<Vec<ResidentEntry>>>,
    metrics: Arc<AgentMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let list_url = format!("{}/v1/knowledge?keys=1&text=0", cfg.kdn);
    let timeout = Duration::from_secs(10).max(cfg.interval);
    let mut store: Option<Arc<dyn KvStore>> = None;
    let (mut kdn_health, mut store_health) = (Health::default(), Health::default());
    let mut warned_no_keys = false;
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let round = async {
            if store.is_none() {
                match open_store(&cfg.store_url).await {
                    Ok(s) => store = Some(s),
                    Err(e) => {
                        store_health.failed("opening the KV store", &cfg.store_url, &e.to_string());
                        return "store_error";
                    }
                }
            }
            let list = match fetch_list(&client, &list_url).await {
                Ok(v) => {
                    kdn_health.ok("KDN knowledge list", &cfg.kdn);
                    v
                }
                Err(e) => {
                    kdn_health.failed("KDN knowledge list", &cfg.kdn, &e.to_string());
                    return "kdn_error";
                }
            };
            let blocks = parse_kdn_list(&list, cfg.model.as_deref());
            if !warned_no_keys && !blocks.is_empty() && blocks.iter().all(|b| b.keys.is_none()) {
                tracing::warn!(kdn = %cfg.kdn, "the KDN lists no chunk keys (?keys=1 unsupported?); nothing counts as resident");
                warned_no_keys = true;
            }
            let Some(s) = store.as_ref() else {
                return "store_error";
            };
            let (entries, failed) = check_all(s.as_ref(), &blocks).await;
            metrics
                .resident_blocks
                .set(resident_ids(&entries).len() as i64);
            *shared.lock().unwrap_or_else(|p| p.into_inner()) = entries;
            if failed > 0 {
                store_health.failed(
                    "KV store lookups",
                    &cfg.store_url,
                    &format!("{failed} of {} lookups failed", blocks.len()),
                );
                "store_error"
            } else {
                store_health.ok("KV store", &cfg.store_url);
                "ok"
            }
        };
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, round) => r.unwrap_or("timeout"),
            _ = stop.changed() => return,
        };
        if result == "timeout" {
            tracing::debug!(kdn = %cfg.kdn, store = %cfg.store_url, "residency round timed out");
        }
        metrics.residency_checks.with_label_values(&[result]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cacheroute_lmcache::store::{Chunk, MemoryStore};
    use serde_json::json;

    fn chunk() -> Chunk {
        Chunk {
            kv_bytes: bytes::Bytes::from_static(b"kv"),
            metadata: bytes::Bytes::from_static(b"md"),
        }
    }

    #[test]
    fn parses_list_filters_model_and_infers_world_size() {
        let v = json!({"object": "list", "data": [
            {"id": "a", "models": {
                "m": {"chunks": 2, "world_size": 2, "keys": ["k0", "k1", "k2", "k3"]},
                "other": {"chunks": 1, "world_size": 1, "keys": ["x"]}}},
            {"id": "b", "models": {"m": {"chunks": 3, "keys": ["a", "b", "c"]}}},
            {"id": "c", "models": {"m": {"status": "ready", "chunks": 4, "world_size": 1}}},
            {"models": {"m": {}}},
            "junk"
        ]});
        let all = parse_kdn_list(&v, None);
        assert_eq!(all.len(), 4);
        let m = parse_kdn_list(&v, Some("m"));
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].id.as_str(), m[0].world_size), ("a", 2));
        assert_eq!(m[1].world_size, 1);
        assert_eq!(m[2].keys, None);
        assert!(parse_kdn_list(&json!({"error": "x"}), None).is_empty());
    }

    #[tokio::test]
    async fn counts_leading_whole_chunks_only() {
        let store = MemoryStore::new();
        let b = BlockKeys {
            id: "a".into(),
            model: "m".into(),
            chunks: 3,
            world_size: 2,
            keys: Some((0..6).map(|i| format!("k{i}")).collect()),
        };
        assert_eq!(resident_chunks(&store, &b).await.unwrap(), 0);
        // chunk 0 both ranks, chunk 1 rank 0 only, chunk 2 both ranks
        for k in ["k0", "k1", "k2", "k4", "k5"] {
            store.put_chunk(k, &chunk()).await.unwrap();
        }
        assert_eq!(resident_chunks(&store, &b).await.unwrap(), 1);
        store.put_chunk("k3", &chunk()).await.unwrap();
        assert_eq!(resident_chunks(&store, &b).await.unwrap(), 3);
        // a half-written chunk (kv_bytes but no metadata) is absent, as for LMCache
        store.raw_delete("k0metadata");
        assert_eq!(resident_chunks(&store, &b).await.unwrap(), 0);

        let mismatched = BlockKeys {
            keys: Some(vec!["k1".into()]),
            ..b.clone()
        };
        assert_eq!(resident_chunks(&store, &mismatched).await.unwrap(), 0);
        let no_keys = BlockKeys { keys: None, ..b };
        assert_eq!(resident_chunks(&store, &no_keys).await.unwrap(), 0);
    }

    #[test]
    fn resident_ids_dedup_and_need_all_chunks() {
        let e = |id: &str, model: &str, chunks, resident_chunks| ResidentEntry {
            id: id.into(),
            model: model.into(),
            chunks,
            resident_chunks,
        };
        let entries = [
            e("a", "m1", 2, 2),
            e("a", "m2", 2, 2),
            e("b", "m1", 2, 1),
            e("c", "m1", 0, 0),
        ];
        assert_eq!(resident_ids(&entries), ["a"]);
    }
}
