//! The knowledge registry: one record per knowledge block, persisted in Redis (or an
//! in-process map), cached in memory, with a BM25 index over title, tags and text.
//!
//! Redis layout: one hash, `<prefix>knowledge`, field = block id, value = the record's
//! JSON. Every write is a single `HSET` / `HDEL`, so a bulk registration is stored
//! entirely or not at all.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use cacheroute_decisions::prompt::ChatTemplate;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::bm25::Bm25Index;

/// Where a block stands for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockStatus {
    /// Laid out and keyed; its KV is not (known to be) in the KDN store yet.
    Registered,
    /// A producer is computing its KV.
    Warming,
    /// Every chunk key of the prefix is in the KDN store: it can be injected.
    KvReady,
    /// Warm-up failed (`error` says why); the block can still be used as text.
    Failed,
    /// Registered while the warm-up queue was full (`max_pending_warmups`): it is warmed
    /// up when the queue has room again; it can be used as text meanwhile.
    Deferred,
}

impl BlockStatus {
    pub const ALL: [BlockStatus; 5] = [
        BlockStatus::Registered,
        BlockStatus::Warming,
        BlockStatus::KvReady,
        BlockStatus::Failed,
        BlockStatus::Deferred,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BlockStatus::Registered => "registered",
            BlockStatus::Warming => "warming",
            BlockStatus::KvReady => "kv_ready",
            BlockStatus::Failed => "failed",
            BlockStatus::Deferred => "deferred",
        }
    }
}

/// A block's prefix and KV state for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub status: BlockStatus,
    /// Why the last warm-up failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The template the prefix was laid out for.
    pub template: ChatTemplate,
    /// Prefix tokens (template head + padded content): a multiple of `chunk_size`.
    pub tokens: usize,
    /// Chunks of the prefix (`tokens / chunk_size`).
    pub chunks: usize,
    pub chunk_size: usize,
    /// Padding units appended to the text.
    pub padding: usize,
    /// Logical KV bytes of the prefix (`tokens × kv_bytes_per_token`).
    pub bytes: u64,
    /// Ranks per chunk (one key each).
    pub world_size: u32,
    /// The exact content of the leading system message the gateway must send.
    pub content: String,
    /// LMCache keys, chunk-major (chunk 0 rank 0, chunk 0 rank 1, …).
    pub keys: Vec<String>,
    /// Injection targets (configured name, or store URL) that received the whole block.
    #[serde(default)]
    pub resident: Vec<String>,
    /// Unix seconds of the last change.
    pub updated_at: f64,
}

/// One knowledge block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Normalised text.
    pub text: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form client metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Value>,
    /// Unix seconds.
    pub created_at: f64,
    /// Per served model name.
    pub models: BTreeMap<String, ModelEntry>,
}

/// What a JSON view of a record includes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Detail {
    /// Each model's padded `content`.
    pub content: bool,
    /// Each model's chunk `keys`.
    pub keys: bool,
    /// The block's `text` (on by default in views made by [`KnowledgeRecord::to_json`]).
    pub omit_text: bool,
}

impl KnowledgeRecord {
    /// Text the search index sees.
    pub fn index_text(&self) -> String {
        cacheroute_decisions::bm25::document_text(self.title.as_deref(), &self.tags, &self.text)
    }

    /// Size of the text in bytes.
    pub fn text_bytes(&self) -> usize {
        self.text.len()
    }

    /// SHA-256 (hex) over everything a gateway copies as text: title, tags, text and each
    /// model's `content`. Status, residency and timestamps are left out, so the digest
    /// changes only when the bytes a gateway must fetch change.
    pub fn content_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        // length-prefixed fields, so that moving bytes between fields changes the digest
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(self.title.as_deref().unwrap_or("").as_bytes());
        field(&[u8::from(self.title.is_some())]);
        for t in &self.tags {
            field(t.as_bytes());
        }
        field(b"\0text");
        field(self.text.as_bytes());
        for (name, m) in &self.models {
            field(name.as_bytes());
            field(m.content.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Whether `other` has the same digest inputs (cheaper than hashing both).
    fn same_content(&self, other: &KnowledgeRecord) -> bool {
        self.title == other.title
            && self.tags == other.tags
            && self.text == other.text
            && self.models.len() == other.models.len()
            && self
                .models
                .iter()
                .zip(&other.models)
                .all(|((a, x), (b, y))| a == b && x.content == y.content)
    }

    /// The API view: `{"id","object","title","text","tags","created_at","models":{name:
    /// {status, error?, tokens, chunks, chunk_size, bytes, padding, world_size, resident,
    /// updated_at, content?, keys?}}}`.
    pub fn to_json(&self, detail: Detail) -> Value {
        let mut models = Map::new();
        for (name, m) in &self.models {
            let mut v = json!({
                "status": m.status,
                "template": m.template,
                "tokens": m.tokens,
                "chunks": m.chunks,
                "chunk_size": m.chunk_size,
                "bytes": m.bytes,
                "padding": m.padding,
                "world_size": m.world_size,
                "resident": m.resident,
                "updated_at": m.updated_at,
            });
            if let Some(e) = &m.error {
                v["error"] = json!(e);
            }
            if detail.content {
                v["content"] = json!(m.content);
            }
            if detail.keys {
                v["keys"] = json!(m.keys);
            }
            models.insert(name.clone(), v);
        }
        let mut v = json!({
            "id": self.id,
            "object": "knowledge",
            "title": self.title,
            "tags": self.tags,
            "text_bytes": self.text.len(),
            "created_at": self.created_at,
            "models": models,
        });
        if !detail.omit_text {
            v["text"] = json!(self.text);
        }
        if let Some(m) = &self.meta {
            v["meta"] = m.clone();
        }
        v
    }
}

/// A registry persistence failure.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {url}: {source}")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("registry {url}: record {id:?} is not valid JSON: {source}")]
    Corrupt {
        url: String,
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported registry URL {0:?}: use redis://host:port[/db] or memory://NAME")]
    BadUrl(String),
}

/// Where records are persisted.
#[async_trait]
pub trait RegistryBackend: Send + Sync {
    /// The URL, for messages (no password).
    fn describe(&self) -> String;
    /// Every stored record.
    async fn load_all(&self) -> Result<Vec<KnowledgeRecord>, RegistryError>;
    /// Store records, all or none.
    async fn put(&self, records: &[&KnowledgeRecord]) -> Result<(), RegistryError>;
    /// Remove a record.
    async fn delete(&self, id: &str) -> Result<(), RegistryError>;
}

/// Hide a password in a `scheme://user:password@host` URL.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((creds, host)) = rest.split_once('@') {
            if let Some((user, _)) = creds.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url.to_string()
}

/// Records in Redis, one hash.
pub struct RedisRegistry {
    conn: ConnectionManager,
    hash_key: String,
    url: String,
}

impl RedisRegistry {
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, RegistryError> {
        let err = |source| RegistryError::Redis {
            url: redact_url(url),
            source,
        };
        let client = redis::Client::open(url).map_err(err)?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(30))
            .set_number_of_retries(2)
            .set_max_delay(1_000);
        let conn = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(err)?;
        Ok(Self {
            conn,
            hash_key: format!("{prefix}knowledge"),
            url: redact_url(url),
        })
    }

    fn err(&self, source: redis::RedisError) -> RegistryError {
        RegistryError::Redis {
            url: self.url.clone(),
            source,
        }
    }
}

#[async_trait]
impl RegistryBackend for RedisRegistry {
    fn describe(&self) -> String {
        self.url.clone()
    }

    async fn load_all(&self) -> Result<Vec<KnowledgeRecord>, RegistryError> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&self.hash_key)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        all.into_iter()
            .map(|(id, v)| {
                serde_json::from_str(&v).map_err(|source| RegistryError::Corrupt {
                    url: self.url.clone(),
                    id,
                    source,
                })
            })
            .collect()
    }

    async fn put(&self, records: &[&KnowledgeRecord]) -> Result<(), RegistryError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&self.hash_key);
        for r in records {
            cmd.arg(&r.id)
                .arg(serde_json::to_string(r).expect("records serialise"));
        }
        let mut conn = self.conn.clone();
        cmd.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.err(e))
    }

    async fn delete(&self, id: &str) -> Result<(), RegistryError> {
        let mut conn = self.conn.clone();
        redis::cmd("HDEL")
            .arg(&self.hash_key)
            .arg(id)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.err(e))
    }
}

type MemoryMap = Arc<Mutex<HashMap<String, String>>>;

/// Records in a process-wide map named by `memory://NAME` (survives a KDN restart
/// inside the same process, not a process restart).
pub struct MemoryRegistry {
    name: String,
    map: MemoryMap,
}

impl MemoryRegistry {
    pub fn named(name: &str) -> Self {
        static MAPS: std::sync::OnceLock<Mutex<HashMap<String, MemoryMap>>> =
            std::sync::OnceLock::new();
        let mut maps = MAPS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let map = maps.entry(name.to_string()).or_default().clone();
        Self {
            name: name.to_string(),
            map,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl RegistryBackend for MemoryRegistry {
    fn describe(&self) -> String {
        format!("memory://{}", self.name)
    }

    async fn load_all(&self) -> Result<Vec<KnowledgeRecord>, RegistryError> {
        self.map()
            .iter()
            .map(|(id, v)| {
                serde_json::from_str(v).map_err(|source| RegistryError::Corrupt {
                    url: self.describe(),
                    id: id.clone(),
                    source,
                })
            })
            .collect()
    }

    async fn put(&self, records: &[&KnowledgeRecord]) -> Result<(), RegistryError> {
        let mut map = self.map();
        for r in records {
            map.insert(
                r.id.clone(),
                serde_json::to_string(r).expect("records serialise"),
            );
        }
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<(), RegistryError> {
        self.map().remove(id);
        Ok(())
    }
}

/// Open the registry backend for `url` (`redis://…` or `memory://NAME`).
pub async fn open_backend(
    url: &str,
    prefix: &str,
) -> Result<Arc<dyn RegistryBackend>, RegistryError> {
    if let Some(name) = url.strip_prefix("memory://") {
        return Ok(Arc::new(MemoryRegistry::named(name)));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://") {
        return Ok(Arc::new(RedisRegistry::connect(url, prefix).await?));
    }
    Err(RegistryError::BadUrl(url.to_string()))
}

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
