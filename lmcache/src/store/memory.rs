//! [`MemoryStore`]: chunks in process memory (demos, simulators, tests), and the
//! process-wide table of named stores behind `memory://NAME` URLs.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Chunk, Counters, IoStats, KvStore, StoreError};
use crate::keys::{redis_kv_bytes_key, redis_metadata_key};

#[derive(Debug, Default)]
struct MemoryInner {
    /// Entries under their Redis names (`<key>kv_bytes`, `<key>metadata`), so
    /// half-written or half-evicted chunks behave as in Redis.
    entries: RwLock<HashMap<String, Bytes>>,
    counters: Counters,
}

/// An in-process store with Redis semantics. Clones share the same data and
/// counters, so several simulated instances in one process can share a store.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<MemoryInner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Bytes>> {
        self.inner.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn entries_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Bytes>> {
        self.inner
            .entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held in all values (what `kv_bytes` + `metadata` take).
    pub fn bytes_stored(&self) -> u64 {
        self.entries().values().map(|v| v.len() as u64).sum()
    }

    /// Chunks visible to LMCache (entries named `…metadata`).
    pub fn chunk_count(&self) -> usize {
        self.entries()
            .keys()
            .filter(|k| k.ends_with(crate::keys::REDIS_METADATA_SUFFIX))
            .count()
    }

    /// Raw entry by its Redis name (`<key>kv_bytes` or `<key>metadata`).
    pub fn raw_get(&self, name: &str) -> Option<Bytes> {
        self.entries().get(name).cloned()
    }

    /// Set a raw entry (e.g. to simulate a half-written chunk).
    pub fn raw_set(&self, name: impl Into<String>, value: Bytes) {
        self.entries_mut().insert(name.into(), value);
    }

    /// Delete a raw entry (e.g. to simulate eviction of one half of a chunk).
    pub fn raw_delete(&self, name: &str) -> bool {
        self.entries_mut().remove(name).is_some()
    }

    /// Remove everything.
    pub fn clear(&self) {
        self.entries_mut().clear();
    }
}

#[async_trait]
impl KvStore for MemoryStore {
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.entries().contains_key(&redis_metadata_key(key)))
    }

    async fn longest_present_prefix(&self, keys: &[String]) -> Result<usize, StoreError> {
        let entries = self.entries();
        Ok(keys
            .iter()
            .take_while(|k| entries.contains_key(&redis_metadata_key(k)))
            .count())
    }

    async fn chunks_present(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        let entries = self.entries();
        Ok(keys
            .iter()
            .map(|k| {
                entries.contains_key(&redis_metadata_key(k))
                    && entries.contains_key(&redis_kv_bytes_key(k))
            })
            .collect())
    }

    async fn get_chunks(&self, keys: &[String]) -> Result<Vec<Option<Chunk>>, StoreError> {
        let out: Vec<Option<Chunk>> = {
            let entries = self.entries();
            keys.iter()
                .map(|k| {
                    let metadata = entries.get(&redis_metadata_key(k))?.clone();
                    let kv_bytes = entries.get(&redis_kv_bytes_key(k))?.clone();
                    Some(Chunk { kv_bytes, metadata })
                })
                .collect()
        };
        self.inner.counters.read(out.iter().flatten());
        Ok(out)
    }

    async fn put_chunks(&self, chunks: &[(String, Chunk)]) -> Result<(), StoreError> {
        {
            let mut entries = self.entries_mut();
            for (k, c) in chunks {
                entries.insert(redis_kv_bytes_key(k), c.kv_bytes.clone());
                entries.insert(redis_metadata_key(k), c.metadata.clone());
            }
        }
        self.inner.counters.written(chunks.iter().map(|(_, c)| c));
        Ok(())
    }

    async fn delete_chunk(&self, key: &str) -> Result<bool, StoreError> {
        let mut entries = self.entries_mut();
        let a = entries.remove(&redis_metadata_key(key)).is_some();
        let b = entries.remove(&redis_kv_bytes_key(key)).is_some();
        Ok(a || b)
    }

    async fn delete_chunks(&self, keys: &[String]) -> Result<usize, StoreError> {
        let mut entries = self.entries_mut();
        let mut n = 0;
        for k in keys {
            let a = entries.remove(&redis_metadata_key(k)).is_some();
            let b = entries.remove(&redis_kv_bytes_key(k)).is_some();
            n += usize::from(a || b);
        }
        // a store emptied by deletes gives its table's memory back
        if entries.is_empty() {
            entries.shrink_to_fit();
        }
        Ok(n)
    }

    fn io_stats(&self) -> IoStats {
        self.inner.counters.snapshot()
    }
}

/// Process-wide named in-memory stores, so that components running in one
/// process (`cacheroute demo`) can share a store by URL: `memory://NAME`.
/// The table holds weak references: a store nobody uses any more (every handle
/// dropped) is freed with its data, and its name is forgotten.
type NamedStores = std::collections::HashMap<String, std::sync::Weak<MemoryInner>>;

fn memory_stores() -> &'static std::sync::Mutex<NamedStores> {
    static STORES: std::sync::OnceLock<std::sync::Mutex<NamedStores>> = std::sync::OnceLock::new();
    STORES.get_or_init(Default::default)
}

/// The in-memory store named `name` in this process: the one a live handle holds, or a
/// new empty one (a store whose handles were all dropped is gone).
pub fn named_memory_store(name: &str) -> MemoryStore {
    let mut stores = memory_stores().lock().unwrap_or_else(|p| p.into_inner());
    // forget names whose store was freed, so the table does not grow with them
    stores.retain(|_, w| w.strong_count() > 0);
    if let Some(inner) = stores.get(name).and_then(std::sync::Weak::upgrade) {
        return MemoryStore { inner };
    }
    let store = MemoryStore::default();
    stores.insert(name.to_string(), Arc::downgrade(&store.inner));
    store
}

/// Names of the in-memory stores alive in this process.
pub fn named_memory_stores() -> Vec<String> {
    let stores = memory_stores().lock().unwrap_or_else(|p| p.into_inner());
    stores
        .iter()
        .filter(|(_, w)| w.strong_count() > 0)
        .map(|(n, _)| n.clone())
        .collect()
}
