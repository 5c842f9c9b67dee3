//! The knowledge registry: one record per knowledge block, persisted in Redis (or an
//! in-process map), cached in memory, with a BM25 index over title, tags and text.
//!
//! Redis layout: one hash, `<prefix>knowledge`, field = block id, value = the record's
//! JSON. Every write is a single `HSET` / `HDEL`, so a bulk registration is stored
//! entirely or not at all.
//!
//! This module holds the [`Registry`] (the in-memory copy, key references, versions,
//! registration); `record` holds the record types and their JSON views, `backend`
//! the persistence (Redis or in-process).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::bm25::Bm25Index;

mod backend;
mod record;

pub use backend::{
    open_backend, redact_url, MemoryRegistry, RedisRegistry, RegistryBackend, RegistryError,
};
pub use record::{BlockStatus, Detail, KnowledgeRecord, ModelEntry};

/// The outcome of registering one record.
#[derive(Debug, Clone)]
pub enum Registered {
    /// A new block.
    Created(KnowledgeRecord),
    /// The same id and text were already registered (models added or failed ones reset
    /// for another warm-up are included).
    Existing(KnowledgeRecord),
}

impl Registered {
    pub fn record(&self) -> &KnowledgeRecord {
        match self {
            Registered::Created(r) | Registered::Existing(r) => r,
        }
    }
}

/// Why a registration was refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(
        "knowledge id {0:?} is already registered with a different text; delete it first or \
         choose another id"
    )]
    Conflict(String),
    #[error("knowledge id {0:?} appears twice in one registration")]
    Duplicate(String),
    #[error(
        "the registry is full: it holds {have} blocks, this registration adds {adding}, and \
         [kdn] max_blocks is {max}; delete blocks first or raise max_blocks"
    )]
    Full {
        have: usize,
        adding: usize,
        max: usize,
    },
    #[error(transparent)]
    Backend(#[from] RegistryError),
}

/// A random 8-hex-digit tag, different for every registry opened (also within one
/// process), so that a version seen before a restart never matches one after it.
fn random_epoch() -> String {
    static OPENED: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS; time, pid and a counter separate the rest
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.write_u64(OPENED.fetch_add(1, Ordering::Relaxed));
    format!("{:08x}", h.finish() as u32)
}

/// The registry: an in-memory copy of every record (the source for reads), written
/// through to the backend.
pub struct Registry {
    backend: Arc<dyn RegistryBackend>,
    records: RwLock<BTreeMap<String, KnowledgeRecord>>,
    /// Tag of this registry instance (see [`Registry::version`]).
    epoch: String,
    /// Bumped on every change of `records`, while its write lock is held, so that a
    /// reader holding the read lock sees a version matching the records.
    counter: AtomicU64,
    index: RwLock<Bm25Index>,
    /// Chunk key → number of (record, model) entries using it, so that a delete finds
    /// the keys no other block uses without scanning the registry.
    key_refs: Mutex<HashMap<String, u32>>,
    /// Block id → [`KnowledgeRecord::content_digest`], kept with the records.
    digests: Mutex<HashMap<String, String>>,
    /// Records visited and key references updated since the start: the work the
    /// registry did, which tests bound to show a delete is O(its block).
    work: AtomicU64,
    /// Most records held (`[kdn] max_blocks`; 0: no bound).
    max_blocks: std::sync::atomic::AtomicUsize,
    /// Serialises writes so that the backend sees them in memory order.
    write: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// Open `url` and load every stored record.
    pub async fn open(url: &str, prefix: &str) -> Result<Registry, RegistryError> {
        let backend = open_backend(url, prefix).await?;
        Self::with_backend(backend).await
    }

    pub async fn with_backend(
        backend: Arc<dyn RegistryBackend>,
    ) -> Result<Registry, RegistryError> {
        let loaded = backend.load_all().await?;
        let reg = Registry {
            backend,
            records: RwLock::new(BTreeMap::new()),
            epoch: random_epoch(),
            counter: AtomicU64::new(0),
            index: RwLock::new(Bm25Index::new()),
            key_refs: Mutex::default(),
            digests: Mutex::default(),
            work: AtomicU64::new(0),
            max_blocks: std::sync::atomic::AtomicUsize::new(0),
            write: tokio::sync::Mutex::new(()),
        };
        for r in loaded {
            reg.publish(r);
        }
        // loading is not a change a reader could have seen
        reg.counter.store(0, Ordering::Release);
        Ok(reg)
    }

    /// The current version, `<epoch>-<counter>`: changes with every registered, updated
    /// or removed record, and never repeats across registry instances.
    pub fn version(&self) -> String {
        format!("{}-{}", self.epoch, self.counter.load(Ordering::Acquire))
    }

    /// Every record (as [`list`](Self::list) orders them) with the version they are at.
    pub fn snapshot(&self) -> (String, Vec<KnowledgeRecord>) {
        let (version, mut v) = {
            let records = self.records();
            let version = self.version();
            (version, records.values().cloned().collect::<Vec<_>>())
        };
        sort_records(&mut v);
        (version, v)
    }

    /// The backend's URL (no password).
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    fn records(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, KnowledgeRecord>> {
        self.records.read().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, r: KnowledgeRecord) {
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        let old = records.get(&r.id);
        let same = old.is_some_and(|o| o.same_content(&r));
        if !same {
            self.index
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(&r.id, &r.index_text());
            lock(&self.digests).insert(r.id.clone(), r.content_digest());
        }
        self.update_refs(old, Some(&r));
        records.insert(r.id.clone(), r);
        self.counter.fetch_add(1, Ordering::AcqRel);
    }

    /// Move the key references of one record from `old` to `new`, touching only the
    /// models whose keys changed.
    fn update_refs(&self, old: Option<&KnowledgeRecord>, new: Option<&KnowledgeRecord>) {
        let mut refs = lock(&self.key_refs);
        let mut touched = 0u64;
        fn keys_of<'a>(r: Option<&'a KnowledgeRecord>, m: &str) -> Option<&'a [String]> {
            r.and_then(|r| r.models.get(m)).map(|e| e.keys.as_slice())
        }
        let models: std::collections::BTreeSet<&String> = old
            .iter()
            .chain(new.iter())
            .flat_map(|r| r.models.keys())
            .collect();
        for m in models {
            let (before, after) = (keys_of(old, m), keys_of(new, m));
            if before == after {
                continue;
            }
            for k in before.unwrap_or_default() {
                touched += 1;
                if let Some(n) = refs.get_mut(k) {
                    *n -= 1;
                    if *n == 0 {
                        refs.remove(k);
                    }
                }
            }
            for k in after.unwrap_or_default() {
                touched += 1;
                *refs.entry(k.clone()).or_default() += 1;
            }
        }
        self.work.fetch_add(touched, Ordering::Relaxed);
    }

    /// Whether any registered block uses chunk `key`.
    pub fn key_in_use(&self, key: &str) -> bool {
        self.work.fetch_add(1, Ordering::Relaxed);
        lock(&self.key_refs).contains_key(key)
    }

    /// The content digest of block `id` ([`KnowledgeRecord::content_digest`]).
    pub fn digest(&self, id: &str) -> Option<String> {
        lock(&self.digests).get(id).cloned()
    }

    /// Refuse registrations that would hold more than `max` blocks (0: no bound).
    pub fn set_max_blocks(&self, max: usize) {
        self.max_blocks.store(max, Ordering::Relaxed);
    }

    /// Records visited and key references updated so far (see the field).
    pub fn work(&self) -> u64 {
        self.work.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.records().len()
    }

    pub fn is_empty(&self) -> bool {
        self.records().is_empty()
    }

    pub fn get(&self, id: &str) -> Option<KnowledgeRecord> {
        self.records().get(id).cloned()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.records().contains_key(id)
    }

    /// Every record, oldest first (ties by id).
    pub fn list(&self) -> Vec<KnowledgeRecord> {
        let mut v: Vec<KnowledgeRecord> = self.records().values().cloned().collect();
        sort_records(&mut v);
        v
    }

    /// Apply `f` to every record without copying.
    pub fn for_each(&self, mut f: impl FnMut(&KnowledgeRecord)) {
        let records = self.records();
        self.work.fetch_add(records.len() as u64, Ordering::Relaxed);
        for r in records.values() {
            f(r);
        }
    }

    /// BM25 search over title, tags and text: `(record, score)`, best first.
    pub fn search(&self, query: &str, k: usize) -> Vec<(KnowledgeRecord, f64)> {
        let hits = self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .search(query, k);
        let records = self.records();
        hits.into_iter()
            .filter_map(|h| records.get(&h.id).map(|r| (r.clone(), h.score)))
            .collect()
    }

    /// Register records, all or none. An id already registered with the same text is
    /// [`Registered::Existing`]: models it lacks are added, and a model whose entry
    /// `failed` is replaced by the new (registered) entry so that it is warmed up again.
    /// An id registered with another text refuses the whole call.
    pub async fn register(
        &self,
        records: Vec<KnowledgeRecord>,
    ) -> Result<Vec<Registered>, RegisterError> {
        let _w = self.write.lock().await;
        let mut seen = std::collections::HashSet::new();
        for r in &records {
            if !seen.insert(r.id.as_str()) {
                return Err(RegisterError::Duplicate(r.id.clone()));
            }
        }
        let mut out = Vec::with_capacity(records.len());
        let mut changed: Vec<KnowledgeRecord> = Vec::new();
        for new in records {
            match self.get(&new.id) {
                None => {
                    changed.push(new.clone());
                    out.push(Registered::Created(new));
                }
                Some(old) if old.text != new.text => {
                    return Err(RegisterError::Conflict(new.id));
                }
                Some(mut old) => {
                    let mut dirty = false;
                    for (model, entry) in new.models {
                        let replace = match old.models.get(&model) {
                            None => true,
                            Some(e) => e.status == BlockStatus::Failed,
                        };
                        if replace {
                            old.models.insert(model, entry);
                            dirty = true;
                        }
                    }
                    if dirty {
                        changed.push(old.clone());
                    }
                    out.push(Registered::Existing(old));
                }
            }
        }
        let max = self.max_blocks.load(Ordering::Relaxed);
        let adding = out
            .iter()
            .filter(|o| matches!(o, Registered::Created(_)))
            .count();
        let have = self.len();
        if max > 0 && adding > 0 && have + adding > max {
            return Err(RegisterError::Full { have, adding, max });
        }
        let refs: Vec<&KnowledgeRecord> = changed.iter().collect();
        self.backend.put(&refs).await?;
        for r in changed {
            self.publish(r);
        }
        Ok(out)
    }

    /// Change a record and write it through. `None` if the id is unknown. When the
    /// backend fails, the change is kept in memory (and written with the next change)
    /// and the error is returned.
    pub async fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut KnowledgeRecord),
    ) -> Result<Option<KnowledgeRecord>, RegistryError> {
        let _w = self.write.lock().await;
        let Some(mut r) = self.get(id) else {
            return Ok(None);
        };
        let before = r.clone();
        f(&mut r);
        // a no-op update keeps the version (snapshot readers would refetch for nothing)
        if r != before {
            self.publish(r.clone());
        }
        self.backend.put(&[&r]).await?;
        Ok(Some(r))
    }

    /// Remove a record (from the backend first). `None` if the id is unknown.
    pub async fn remove(&self, id: &str) -> Result<Option<KnowledgeRecord>, RegistryError> {
        let _w = self.write.lock().await;
        if !self.contains(id) {
            return Ok(None);
        }
        self.backend.delete(id).await?;
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        let removed = records.remove(id);
        self.update_refs(removed.as_ref(), None);
        lock(&self.digests).remove(id);
        self.counter.fetch_add(1, Ordering::AcqRel);
        Ok(removed)
    }
}

/// Oldest first, ties by id.
fn sort_records(v: &mut [KnowledgeRecord]) {
    v.sort_by(|a, b| {
        a.created_at
            .total_cmp(&b.created_at)
            .then_with(|| a.id.cmp(&b.id))
    });
}

#[cfg(test)]
mod tests {
    use cacheroute_decisions::prompt::ChatTemplate;

    use super::*;

    fn record(id: &str, text: &str, status: BlockStatus) -> KnowledgeRecord {
        let mut models = BTreeMap::new();
        models.insert(
            "m".to_string(),
            ModelEntry {
                status,
                error: None,
                template: ChatTemplate::Llama3,
                tokens: 16,
                chunks: 1,
                chunk_size: 16,
                padding: 3,
                bytes: 16 * 1024,
                world_size: 1,
                content: format!("content {text}"),
                keys: vec![format!("k-{id}")],
                resident: vec![],
                updated_at: 1.0,
            },
        );
        KnowledgeRecord {
            id: id.into(),
            title: Some(format!("title {id}")),
            text: text.into(),
            tags: vec!["t".into()],
            meta: None,
            created_at: 1.0,
            models,
        }
    }

    #[tokio::test]
    async fn register_update_remove_and_reload() {
        let url = "memory://registry-unit-test";
        let reg = Registry::open(url, "x:").await.unwrap();
        let out = reg
            .register(vec![
                record("a", "Paris is in France", BlockStatus::Registered),
                record("b", "Berlin is in Germany", BlockStatus::Failed),
            ])
            .await
            .unwrap();
        assert!(matches!(out[0], Registered::Created(_)));
        assert_eq!(reg.len(), 2);
        // same text: existing; a failed model entry is replaced
        let out = reg
            .register(vec![record(
                "b",
                "Berlin is in Germany",
                BlockStatus::Registered,
            )])
            .await
            .unwrap();
        match &out[0] {
            Registered::Existing(r) => assert_eq!(r.models["m"].status, BlockStatus::Registered),
            other => panic!("{other:?}"),
        }
        // another text under a used id: refused entirely, nothing written
        let e = reg
            .register(vec![
                record("c", "new", BlockStatus::Registered),
                record("a", "different", BlockStatus::Registered),
            ])
            .await
            .unwrap_err();
        assert!(
            matches!(e, RegisterError::Conflict(ref id) if id == "a"),
            "{e}"
        );
        assert!(!reg.contains("c"));
        let e = reg
            .register(vec![
                record("d", "x", BlockStatus::Registered),
                record("d", "x", BlockStatus::Registered),
            ])
            .await
            .unwrap_err();
        assert!(matches!(e, RegisterError::Duplicate(_)));
        reg.update("a", |r| {
            r.models.get_mut("m").unwrap().status = BlockStatus::KvReady
        })
        .await
        .unwrap()
        .unwrap();
        assert!(reg.update("zz", |_| {}).await.unwrap().is_none());
        assert_eq!(reg.search("france", 5)[0].0.id, "a");
        // a second registry on the same URL sees everything
        let again = Registry::open(url, "x:").await.unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(
            again.get("a").unwrap().models["m"].status,
            BlockStatus::KvReady
        );
        assert_eq!(again.search("germany", 5)[0].0.id, "b");
        assert!(again.remove("a").await.unwrap().is_some());
        assert!(again.remove("a").await.unwrap().is_none());
        assert!(again.search("france", 5).is_empty());
        assert_eq!(Registry::open(url, "x:").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn version_follows_changes() {
        let url = "memory://registry-version-test";
        let reg = Registry::open(url, "x:").await.unwrap();
        let v0 = reg.version();
        let (epoch, counter) = v0.split_once('-').unwrap();
        assert_eq!(epoch.len(), 8);
        assert!(epoch.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(counter, "0");
        reg.register(vec![record("a", "alpha", BlockStatus::Registered)])
            .await
            .unwrap();
        let v1 = reg.version();
        assert_ne!(v1, v0);
        // the same registration again and an update that changes nothing: same version
        reg.register(vec![record("a", "alpha", BlockStatus::Registered)])
            .await
            .unwrap();
        reg.update("a", |_| {}).await.unwrap().unwrap();
        assert_eq!(reg.version(), v1);
        reg.update("a", |r| {
            r.models.get_mut("m").unwrap().resident.push("t".into())
        })
        .await
        .unwrap()
        .unwrap();
        let v2 = reg.version();
        assert_ne!(v2, v1);
        let (sv, records) = reg.snapshot();
        assert_eq!(sv, v2);
        assert_eq!(records[0].models["m"].resident, ["t"]);
        reg.remove("a").await.unwrap().unwrap();
        assert_ne!(reg.version(), v2);
        assert!(reg.remove("a").await.unwrap().is_none());
        // another instance on the same data starts another epoch
        let again = Registry::open(url, "x:").await.unwrap();
        assert_ne!(again.version().split_once('-').unwrap().0, epoch);
    }

    #[test]
    fn json_view_and_redaction() {
        let r = record("a", "text", BlockStatus::KvReady);
        let v = r.to_json(Detail::default());
        assert_eq!(v["models"]["m"]["status"], "kv_ready");
        assert_eq!(v["text"], "text");
        assert!(v["models"]["m"].get("content").is_none());
        let v = r.to_json(Detail {
            content: true,
            keys: true,
            omit_text: true,
        });
        assert!(v.get("text").is_none());
        assert_eq!(v["models"]["m"]["keys"][0], "k-a");
        assert_eq!(v["models"]["m"]["content"], "content text");
        assert_eq!(
            redact_url("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:1/"), "redis://host:1/");
    }
}
