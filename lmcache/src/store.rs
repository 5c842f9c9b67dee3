//! KV chunk stores with LMCache's Redis layout, and chunk copying between them.
//!
//! A chunk (one LMCache key, i.e. one chunk of one rank) is two entries:
//! `<key>kv_bytes` (the raw KV tensor) and `<key>metadata` (the 28-byte
//! [`RemoteMetadata`](crate::keys::RemoteMetadata) header). LMCache treats a
//! chunk as present iff `<key>metadata` exists, so writers put `kv_bytes`
//! first and `metadata` last, and a half-written chunk is never seen.
//!
//! * [`RedisStore`]: a real Redis (what LMCache's `redis://` connector reads),
//!   one multiplexed connection, pipelined batches.
//! * [`MemoryStore`]: in-process, for demos and simulators; clones share data.
//! * [`copy_chunks`]: copy chunks between any two stores in pipelined batches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::keys::{redis_kv_bytes_key, redis_metadata_key};

/// One chunk's two values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chunk {
    /// The `<key>kv_bytes` value.
    pub kv_bytes: Bytes,
    /// The `<key>metadata` value.
    pub metadata: Bytes,
}

impl Chunk {
    /// Total bytes of both values.
    pub fn size(&self) -> u64 {
        (self.kv_bytes.len() + self.metadata.len()) as u64
    }
}

/// Errors of a store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "chunk {key:?} is missing from the source store (no `metadata` entry, or \
         `metadata` without `kv_bytes`)"
    )]
    MissingChunk { key: String },
    #[error("{0}")]
    Config(String),
    /// A store URL this crate cannot open.
    #[error(
        "unsupported store URL `{0}`: use redis://host:port[/db] (also rediss://, unix://) \
         or memory://NAME"
    )]
    UnsupportedUrl(String),
    /// The store answered something that does not fit the request.
    #[error("unexpected answer from the store: {0}")]
    Protocol(String),
}

/// Bytes and chunks moved through a store handle since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    pub chunks_read: u64,
    /// Bytes of `kv_bytes` + `metadata` values returned by reads.
    pub bytes_read: u64,
    pub chunks_written: u64,
    /// Bytes of `kv_bytes` + `metadata` values written.
    pub bytes_written: u64,
}

#[derive(Debug, Default)]
struct Counters {
    chunks_read: AtomicU64,
    bytes_read: AtomicU64,
    chunks_written: AtomicU64,
    bytes_written: AtomicU64,
}

impl Counters {
    fn read<'a>(&self, chunks: impl IntoIterator<Item = &'a Chunk>) {
        for c in chunks {
            self.chunks_read.fetch_add(1, Ordering::Relaxed);
            self.bytes_read.fetch_add(c.size(), Ordering::Relaxed);
        }
    }

    fn written<'a>(&self, chunks: impl IntoIterator<Item = &'a Chunk>) {
        for c in chunks {
            self.chunks_written.fetch_add(1, Ordering::Relaxed);
            self.bytes_written.fetch_add(c.size(), Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> IoStats {
        IoStats {
            chunks_read: self.chunks_read.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            chunks_written: self.chunks_written.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}

/// A store of LMCache KV chunks, addressed by LMCache key strings (without
/// the `kv_bytes` / `metadata` suffix).
#[async_trait]
pub trait KvStore: Send + Sync {
    /// LMCache's existence test: `EXISTS <key>metadata`.
    async fn exists(&self, key: &str) -> Result<bool, StoreError>;

    /// How many of `keys`, from the first, are present (LMCache's lookup rule:
    /// chunk i counts iff `<key_i>metadata` exists; the prefix stops at the
    /// first missing chunk; later hits are useless).
    async fn longest_present_prefix(&self, keys: &[String]) -> Result<usize, StoreError>;

    /// Per key, whether **both** halves (`<key>metadata` and `<key>kv_bytes`) exist:
    /// stricter than [`exists`](Self::exists), for a reader that must count a
    /// half-evicted chunk as a miss (the sim's LMCache lookup). The default reads the
    /// chunks; stores override it with a presence check that moves no KV bytes.
    async fn chunks_present(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        Ok(self
            .get_chunks(keys)
            .await?
            .iter()
            .map(Option::is_some)
            .collect())
    }

    /// Both values of a chunk; `None` if `metadata` or `kv_bytes` is missing.
    async fn get_chunk(&self, key: &str) -> Result<Option<Chunk>, StoreError> {
        let mut v = self.get_chunks(&[key.to_string()]).await?;
        Ok(v.pop().flatten())
    }

    /// [`get_chunk`](Self::get_chunk) for many keys, in order.
    async fn get_chunks(&self, keys: &[String]) -> Result<Vec<Option<Chunk>>, StoreError>;

    /// Write `kv_bytes`, then `metadata`.
    async fn put_chunk(&self, key: &str, chunk: &Chunk) -> Result<(), StoreError> {
        self.put_chunks(&[(key.to_string(), chunk.clone())]).await
    }

    /// [`put_chunk`](Self::put_chunk) for many chunks, in order; each chunk's
    /// `metadata` is written after its `kv_bytes`.
    async fn put_chunks(&self, chunks: &[(String, Chunk)]) -> Result<(), StoreError>;

    /// Remove a chunk (`metadata` first, so it disappears atomically for
    /// readers). Returns whether anything was there.
    async fn delete_chunk(&self, key: &str) -> Result<bool, StoreError>;

    /// [`delete_chunk`](Self::delete_chunk) for many keys (one round trip where the
    /// store allows); returns how many had something to delete.
    async fn delete_chunks(&self, keys: &[String]) -> Result<usize, StoreError> {
        let mut n = 0;
        for k in keys {
            n += usize::from(self.delete_chunk(k).await?);
        }
        Ok(n)
    }

    /// Bytes and chunks read and written through this handle.
    fn io_stats(&self) -> IoStats;
}

#[async_trait]
impl<T: KvStore + ?Sized> KvStore for Arc<T> {
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        (**self).exists(key).await
    }
    async fn longest_present_prefix(&self, keys: &[String]) -> Result<usize, StoreError> {
        (**self).longest_present_prefix(keys).await
    }
    async fn chunks_present(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        (**self).chunks_present(keys).await
    }
    async fn get_chunk(&self, key: &str) -> Result<Option<Chunk>, StoreError> {
        (**self).get_chunk(key).await
    }
    async fn get_chunks(&self, keys: &[String]) -> Result<Vec<Option<Chunk>>, StoreError> {
        (**self).get_chunks(keys).await
    }
    async fn put_chunk(&self, key: &str, chunk: &Chunk) -> Result<(), StoreError> {
        (**self).put_chunk(key, chunk).await
    }
    async fn put_chunks(&self, chunks: &[(String, Chunk)]) -> Result<(), StoreError> {
        (**self).put_chunks(chunks).await
    }
    async fn delete_chunk(&self, key: &str) -> Result<bool, StoreError> {
        (**self).delete_chunk(key).await
    }
    async fn delete_chunks(&self, keys: &[String]) -> Result<usize, StoreError> {
        (**self).delete_chunks(keys).await
    }
    fn io_stats(&self) -> IoStats {
        (**self).io_stats()
    }
}

// ---------------------------------------------------------------------------
// Redis

/// Connection settings for [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    /// Limit for each connection attempt.
    pub connection_timeout: Duration,
    /// Limit for each command or pipeline (must cover a whole batch of large
    /// values on the slowest link).
    pub response_timeout: Duration,
    /// Reconnection attempts after the connection drops, before an operation
    /// fails (exponential backoff from 100 ms).
    pub reconnect_retries: usize,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            connection_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(120),
            reconnect_retries: 3,
        }
    }
}

/// A Redis holding chunks in LMCache's `redis://` layout. Cloning shares the
/// connection and the counters.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    url: String,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .finish()
    }
}

impl RedisStore {
    /// Connect to `redis://host:port[/db]` (also `rediss://`, `unix://`).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, RedisStoreConfig::default()).await
    }

    pub async fn connect_with(url: &str, cfg: RedisStoreConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let mgr_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(cfg.connection_timeout)
            .set_response_timeout(cfg.response_timeout)
            .set_number_of_retries(cfg.reconnect_retries)
            .set_max_delay(2_000);
        let conn = ConnectionManager::new_with_config(client, mgr_cfg).await?;
        Ok(Self {
            conn,
            url: url.to_string(),
            counters: Arc::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying connection, for commands this trait does not cover.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

#[async_trait]
impl KvStore for RedisStore {
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("EXISTS")
            .arg(redis_metadata_key(key))
            .query_async(&mut conn)
            .await?;
        Ok(n > 0)
    }

    async fn longest_present_prefix(&self, keys: &[String]) -> Result<usize, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("EXISTS").arg(redis_metadata_key(k));
        }
        let mut conn = self.conn.clone();
        let found: Vec<i64> = pipe.query_async(&mut conn).await?;
        Ok(found.iter().take_while(|&&n| n > 0).count())
    }

    async fn chunks_present(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // both halves of every key in one pipelined round trip
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("EXISTS").arg(redis_metadata_key(k));
            pipe.cmd("EXISTS").arg(redis_kv_bytes_key(k));
        }
        let mut conn = self.conn.clone();
        let found: Vec<i64> = pipe.query_async(&mut conn).await?;
        if found.len() != 2 * keys.len() {
            return Err(StoreError::Protocol(format!(
                "presence check: {} answers for {} keys",
                found.len(),
                keys.len()
            )));
        }
        Ok(found.chunks(2).map(|p| p[0] > 0 && p[1] > 0).collect())
    }

    async fn get_chunks(&self, keys: &[String]) -> Result<Vec<Option<Chunk>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // metadata before kv_bytes, like LMCache: a visible metadata entry
        // implies kv_bytes was written before it.
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GET").arg(redis_metadata_key(k));
            pipe.cmd("GET").arg(redis_kv_bytes_key(k));
        }
        let mut conn = self.conn.clone();
        let values: Vec<Option<Bytes>> = pipe.query_async(&mut conn).await?;
        let mut out = Vec::with_capacity(keys.len());
        let mut it = values.into_iter();
        while let (Some(meta), Some(kv)) = (it.next(), it.next()) {
            out.push(match (meta, kv) {
                (Some(metadata), Some(kv_bytes)) => Some(Chunk { kv_bytes, metadata }),
                _ => None,
            });
        }
        self.counters.read(out.iter().flatten());
        Ok(out)
    }

    async fn put_chunks(&self, chunks: &[(String, Chunk)]) -> Result<(), StoreError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (k, c) in chunks {
            pipe.cmd("SET")
                .arg(redis_kv_bytes_key(k))
                .arg(c.kv_bytes.as_ref())
                .ignore();
            pipe.cmd("SET")
                .arg(redis_metadata_key(k))
                .arg(c.metadata.as_ref())
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        self.counters.written(chunks.iter().map(|(_, c)| c));
        Ok(())
    }

    async fn delete_chunk(&self, key: &str) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(redis_metadata_key(key));
        pipe.cmd("DEL").arg(redis_kv_bytes_key(key));
        let mut conn = self.conn.clone();
        let (a, b): (i64, i64) = pipe.query_async(&mut conn).await?;
        Ok(a + b > 0)
    }

    async fn delete_chunks(&self, keys: &[String]) -> Result<usize, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        // metadata first in each DEL, as delete_chunk does; one pipeline for the block
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("DEL")
                .arg(redis_metadata_key(k))
                .arg(redis_kv_bytes_key(k));
        }
        let mut conn = self.conn.clone();
        let counts: Vec<i64> = pipe.query_async(&mut conn).await?;
        Ok(counts.into_iter().filter(|&c| c > 0).count())
    }

    fn io_stats(&self) -> IoStats {
        self.counters.snapshot()
    }
}

// ---------------------------------------------------------------------------
// Memory

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

// ---------------------------------------------------------------------------
// Copy

/// How [`copy_chunks_with`] batches and paces a copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Chunks per pipelined read and write. The next batch is read while the
    /// current one is written, so up to two batches are held in memory
    /// (2 × 4 × 80 MiB for Llama-3-70B chunks by default).
    pub batch_chunks: usize,
    /// Pace the copy to at most this many bytes per second (None: as fast as
    /// the stores go). Used to emulate a slower link.
    pub max_bytes_per_sec: Option<u64>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            batch_chunks: 4,
            max_bytes_per_sec: None,
        }
    }
}

/// What a finished copy moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyReport {
    pub chunks: usize,
    /// `kv_bytes` + `metadata` bytes written to the destination.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl CopyReport {
    /// Achieved bytes per second (0 for an empty copy).
    pub fn bytes_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s
        } else {
            0.0
        }
    }
}

/// A copy that stopped part-way. The first `copied_chunks` keys are complete
/// in the destination; no later chunk is visible there.
#[derive(Debug, thiserror::Error)]
#[error(
    "copy stopped after {copied_chunks} of {total_chunks} chunks ({copied_bytes} bytes): {source}"
)]
pub struct CopyError {
    pub copied_chunks: usize,
    pub copied_bytes: u64,
    pub total_chunks: usize,
    #[source]
    pub source: StoreError,
}

/// Copy `keys` from `src` to `dst` in order with default [`CopyOptions`].
pub async fn copy_chunks(
    src: &dyn KvStore,
    dst: &dyn KvStore,
    keys: &[String],
) -> Result<CopyReport, CopyError> {
    copy_chunks_with(src, dst, keys, &CopyOptions::default()).await
}

/// Copy `keys` from `src` to `dst` in order, `kv_bytes` before `metadata` for
/// every chunk, in pipelined batches (reading batch n+1 while writing batch n).
/// Stops at the first chunk missing from `src` or the first store error.
pub async fn copy_chunks_with(
    src: &dyn KvStore,
    dst: &dyn KvStore,
    keys: &[String],
    opts: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    let batches: Vec<&[String]> = keys.chunks(opts.batch_chunks.max(1)).collect();
    let mut report = CopyReport::default();
    let fail = |report: &CopyReport, source: StoreError| CopyError {
        copied_chunks: report.chunks,
        copied_bytes: report.bytes,
        total_chunks: keys.len(),
        source,
    };
    let mut prefetched: Option<Result<Vec<Option<Chunk>>, StoreError>> = None;
    for (i, batch) in batches.iter().enumerate() {
        let got = match prefetched.take() {
            Some(r) => r,
            None => src.get_chunks(batch).await,
        };
        let got = got.map_err(|e| fail(&report, e))?;
        // Write the leading complete chunks of the batch, then report the
        // first missing one.
        let mut items = Vec::with_capacity(batch.len());
        let mut missing = None;
        for (key, chunk) in batch.iter().zip(got) {
            match chunk {
                Some(c) => items.push((key.clone(), c)),
                None => {
                    missing = Some(key.clone());
                    break;
                }
            }
        }
        let batch_bytes: u64 = items.iter().map(|(_, c)| c.size()).sum();
        let write = dst.put_chunks(&items);
        match batches.get(i + 1) {
            Some(next) if missing.is_none() => {
                let (w, r) = tokio::join!(write, src.get_chunks(next));
                w.map_err(|e| fail(&report, e))?;
                prefetched = Some(r);
            }
            _ => write.await.map_err(|e| fail(&report, e))?,
        }
        report.chunks += items.len();
        report.bytes += batch_bytes;
        if let Some(key) = missing {
            return Err(fail(&report, StoreError::MissingChunk { key }));
        }
        if let Some(rate) = opts.max_bytes_per_sec.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(report.bytes as f64 / rate as f64);
            let spent = started.elapsed();
            if due > spent {
                tokio::time::sleep(due - spent).await;
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8, len: usize) -> Chunk {
        Chunk {
            kv_bytes: Bytes::from(vec![i; len]),
            metadata: Bytes::from(vec![i; 28]),
        }
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m@1@0@{i:x}@bfloat16")).collect()
    }

    #[tokio::test]
    async fn put_get_delete_and_accounting() {
        let s = MemoryStore::new();
        let k = keys(3);
        assert!(!s.exists(&k[0]).await.unwrap());
        assert_eq!(s.get_chunk(&k[0]).await.unwrap(), None);
        s.put_chunk(&k[0], &chunk(1, 100)).await.unwrap();
        assert!(s.exists(&k[0]).await.unwrap());
        assert_eq!(s.get_chunk(&k[0]).await.unwrap(), Some(chunk(1, 100)));
        assert_eq!(s.bytes_stored(), 128);
        assert_eq!(s.chunk_count(), 1);
        assert_eq!(
            s.raw_get("m@1@0@0@bfloat16kv_bytes").unwrap().len(),
            100,
            "redis layout"
        );
        let stats = s.io_stats();
        assert_eq!((stats.chunks_written, stats.bytes_written), (1, 128));
        assert_eq!((stats.chunks_read, stats.bytes_read), (1, 128));
        assert!(s.delete_chunk(&k[0]).await.unwrap());
        assert!(!s.delete_chunk(&k[0]).await.unwrap());
        assert_eq!(s.bytes_stored(), 0);
    }

    #[tokio::test]
    async fn prefix_rule_uses_metadata_only() {
        let s = MemoryStore::new();
        let k = keys(5);
        let items: Vec<_> = k.iter().map(|k| (k.clone(), chunk(7, 10))).collect();
        s.put_chunks(&items).await.unwrap();
        assert_eq!(s.longest_present_prefix(&k).await.unwrap(), 5);
        assert_eq!(s.longest_present_prefix(&[]).await.unwrap(), 0);
        // kv_bytes evicted: LMCache still counts the chunk (it only checks metadata)
        s.raw_delete(&redis_kv_bytes_key(&k[1]));
        assert_eq!(s.longest_present_prefix(&k).await.unwrap(), 5);
        assert_eq!(s.get_chunk(&k[1]).await.unwrap(), None);
        // metadata missing: the prefix stops there, later hits do not count
        s.raw_delete(&redis_metadata_key(&k[2]));
        assert_eq!(s.longest_present_prefix(&k).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn clones_share_data() {
        let a = MemoryStore::new();
        let b = a.clone();
        let shared: Arc<dyn KvStore> = Arc::new(a.clone());
        shared.put_chunk("x", &chunk(1, 4)).await.unwrap();
        assert!(b.exists("x").await.unwrap());
        assert_eq!(a.io_stats().chunks_written, 1);
    }

    #[tokio::test]
    async fn copy_between_memory_stores() {
        let (src, dst) = (MemoryStore::new(), MemoryStore::new());
        let k = keys(7);
        for (i, key) in k.iter().enumerate() {
            src.put_chunk(key, &chunk(i as u8, 1000)).await.unwrap();
        }
        let opts = CopyOptions {
            batch_chunks: 3,
            ..Default::default()
        };
        let r = copy_chunks_with(&src, &dst, &k, &opts).await.unwrap();
        assert_eq!(r.chunks, 7);
        assert_eq!(r.bytes, 7 * 1028);
        assert_eq!(dst.longest_present_prefix(&k).await.unwrap(), 7);
        for (i, key) in k.iter().enumerate() {
            assert_eq!(
                dst.get_chunk(key).await.unwrap(),
                Some(chunk(i as u8, 1000))
            );
        }
        let empty = copy_chunks(&src, &dst, &[]).await.unwrap();
        assert_eq!((empty.chunks, empty.bytes), (0, 0));
    }

    #[tokio::test]
    async fn copy_stops_at_missing_chunk() {
        let (src, dst) = (MemoryStore::new(), MemoryStore::new());
        let k = keys(6);
        for key in &k {
            src.put_chunk(key, &chunk(1, 10)).await.unwrap();
        }
        src.raw_delete(&redis_kv_bytes_key(&k[4])); // half chunk counts as missing
        let opts = CopyOptions {
            batch_chunks: 3,
            ..Default::default()
        };
        let e = copy_chunks_with(&src, &dst, &k, &opts).await.unwrap_err();
        assert_eq!(e.copied_chunks, 4);
        assert_eq!(e.total_chunks, 6);
        assert!(matches!(&e.source, StoreError::MissingChunk { key } if *key == k[4]));
        assert!(e.to_string().contains("after 4 of 6 chunks"), "{e}");
        assert_eq!(dst.longest_present_prefix(&k).await.unwrap(), 4);
        assert_eq!(dst.chunk_count(), 4);
    }

    #[tokio::test]
    async fn copy_is_paced() {
        let (src, dst) = (MemoryStore::new(), MemoryStore::new());
        let k = keys(4);
        for key in &k {
            src.put_chunk(key, &chunk(1, 9972)).await.unwrap(); // 10 000 B each
        }
        let opts = CopyOptions {
            batch_chunks: 1,
            max_bytes_per_sec: Some(200_000),
        };
        let r = copy_chunks_with(&src, &dst, &k, &opts).await.unwrap();
        assert!(r.elapsed >= Duration::from_millis(190), "{:?}", r.elapsed);
        assert!(r.bytes_per_sec() <= 210_000.0);
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

/// Whether `url` names a store kind [`open_store`] opens (by its scheme only).
pub fn is_store_url(url: &str) -> bool {
    ["redis://", "rediss://", "unix://", "memory://"]
        .iter()
        .any(|p| url.starts_with(p))
}

/// Check a store URL without connecting: a supported scheme, a `memory://` name, a
/// Redis URL that parses. What [`open_store`] would refuse before trying the network.
pub fn check_store_url(url: &str) -> Result<(), StoreError> {
    if let Some(name) = url.strip_prefix("memory://") {
        if name.is_empty() {
            return Err(StoreError::Config(format!("{url}: memory:// needs a name")));
        }
        return Ok(());
    }
    if !is_store_url(url) {
        return Err(StoreError::UnsupportedUrl(url.to_string()));
    }
    redis::Client::open(url)?;
    Ok(())
}

/// Open a store by URL: `redis://host:port[/db]` (also `rediss://`, `unix://`)
/// or `memory://NAME` (an in-process store shared by every user of that name).
pub async fn open_store(url: &str) -> Result<Arc<dyn KvStore>, StoreError> {
    if let Some(name) = url.strip_prefix("memory://") {
        return Ok(Arc::new(named_memory_store(name)));
    }
    if is_store_url(url) {
        return Ok(Arc::new(RedisStore::connect(url).await?));
    }
    Err(StoreError::UnsupportedUrl(url.to_string()))
}

#[cfg(test)]
mod open_store_tests {
    use super::*;

    #[tokio::test]
    async fn memory_urls_share_by_name() {
        let a = open_store("memory://shared-test").await.unwrap();
        let b = open_store("memory://shared-test").await.unwrap();
        let c = open_store("memory://other-test").await.unwrap();
        let chunk = Chunk {
            kv_bytes: Bytes::from_static(b"kv"),
            metadata: Bytes::from_static(b"md"),
        };
        a.put_chunk("k", &chunk).await.unwrap();
        assert!(b.exists("k").await.unwrap());
        assert!(!c.exists("k").await.unwrap());
        assert!(matches!(
            open_store("s3://x").await,
            Err(StoreError::UnsupportedUrl(_))
        ));
        assert!(check_store_url("memory://").is_err());
        assert!(check_store_url("redis://127.0.0.1:1/0").is_ok());
        assert!(check_store_url("s3://x").is_err());
        // a store is freed with its last handle: reopening the name gives an empty one
        assert!(named_memory_stores().contains(&"other-test".to_string()));
        drop(c);
        assert!(!named_memory_stores().contains(&"other-test".to_string()));
        drop((a, b));
        let again = open_store("memory://shared-test").await.unwrap();
        assert!(!again.exists("k").await.unwrap());
    }
}
