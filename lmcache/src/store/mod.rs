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
//!
//! This module holds the chunk, the error, the I/O counters, the [`KvStore`] trait and
//! [`open_store`] by URL; `redis_store`, `memory` and `copy` hold the two stores and the
//! copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

mod copy;
mod memory;
mod redis_store;

pub use copy::{copy_chunks, copy_chunks_with, CopyError, CopyOptions, CopyReport};
pub use memory::{named_memory_store, named_memory_stores, MemoryStore};
pub use redis_store::{RedisStore, RedisStoreConfig};

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
    /// A `memory://` URL without a store name.
    #[error("{0}: memory:// needs a name")]
    UnnamedMemory(String),
    /// A store URL this crate cannot open.
    #[error(
        "unsupported store URL `{0}`: use redis://host:port[/db] (also rediss://, unix://) \
         or memory://NAME"
    )]
    UnsupportedUrl(String),
    /// A pipelined presence check got another number of answers than it asked for.
    #[error("unexpected answer from the store: presence check: {answers} answers for {keys} keys")]
    PresenceAnswers { answers: usize, keys: usize },
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
            return Err(StoreError::UnnamedMemory(url.to_string()));
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
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::keys::{redis_kv_bytes_key, redis_metadata_key};

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
