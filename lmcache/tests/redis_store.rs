//! RedisStore against real `redis-server` processes started by the tests.
//!
//! `redis-server` must be on PATH (or named by `CACHEROUTE_REDIS_SERVER`):
//! without it these tests fail, they do not skip.

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cacheroute_lmcache::keys::{
    chunk_keys, redis_kv_bytes_key, redis_metadata_key, KeyParams, KeyScheme, RemoteMetadata,
};
use cacheroute_lmcache::store::{
    copy_chunks, copy_chunks_with, Chunk, CopyOptions, IoStats, KvStore, MemoryStore, RedisStore,
    RedisStoreConfig, StoreError,
};

use cacheroute_lmcache::local_redis::LocalRedis as RedisServer;

fn fast_fail() -> RedisStoreConfig {
    RedisStoreConfig {
        connection_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(10),
        reconnect_retries: 1,
    }
}

/// Real LMCache keys for an `n_tokens`-token prompt, chunk 8.
fn lmcache_keys(n_tokens: u32) -> Vec<String> {
    let p = KeyParams {
        hash_seed: Some("0".into()),
        chunk_size: 8,
        ..KeyParams::new(KeyScheme::Lmcache0_3_13, "meta-llama/Llama-3.1-8B-Instruct")
    };
    let tokens: Vec<u32> = (0..n_tokens).map(|i| (i * 7919 + 13) % 128000).collect();
    chunk_keys(&p, &tokens)
        .unwrap()
        .into_iter()
        .map(|k| k.key)
        .collect()
}

fn chunk(i: usize, len: usize) -> Chunk {
    let meta = RemoteMetadata::kv_2ltd("bfloat16", 1, 8, len / 32).unwrap();
    Chunk {
        kv_bytes: Bytes::from((0..len).map(|j| (i * 31 + j) as u8).collect::<Vec<_>>()),
        metadata: Bytes::copy_from_slice(&meta.to_bytes()),
    }
}

async fn fill(store: &dyn KvStore, keys: &[String], len: usize) {
    let items: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), chunk(i, len)))
        .collect();
    store.put_chunks(&items).await.unwrap();
}

async fn raw_exists(url: &str, name: &str) -> bool {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let n: i64 = redis::cmd("EXISTS")
        .arg(name)
        .query_async(&mut c)
        .await
        .unwrap();
    n > 0
}

async fn raw_del(url: &str, name: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(name)
        .query_async(&mut c)
        .await
        .unwrap();
}

#[tokio::test]
async fn put_get_exists_delete() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let keys = lmcache_keys(16);
    assert!(!store.exists(&keys[0]).await.unwrap());
    assert_eq!(store.get_chunk(&keys[0]).await.unwrap(), None);

    let c = chunk(0, 4096);
    store.put_chunk(&keys[0], &c).await.unwrap();
    // LMCache's layout: two plain strings, no separator.
    assert!(raw_exists(&server.url(), &format!("{}kv_bytes", keys[0])).await);
    assert!(raw_exists(&server.url(), &format!("{}metadata", keys[0])).await);
    assert!(store.exists(&keys[0]).await.unwrap());
    assert_eq!(store.get_chunk(&keys[0]).await.unwrap(), Some(c.clone()));
    let got = store.get_chunks(&keys).await.unwrap();
    assert_eq!(got, vec![Some(c.clone()), None]);

    assert_eq!(
        store.io_stats(),
        IoStats {
            chunks_read: 2,
            bytes_read: 2 * c.size(),
            chunks_written: 1,
            bytes_written: c.size(),
        }
    );
    assert!(store.delete_chunk(&keys[0]).await.unwrap());
    assert!(!store.exists(&keys[0]).await.unwrap());
    assert!(!store.delete_chunk(&keys[0]).await.unwrap());
}

#[tokio::test]
async fn prefix_rule_with_missing_metadata() {
    let server = RedisServer::start();
    let url = server.url();
    let store = RedisStore::connect(&url).await.unwrap();
    let keys = lmcache_keys(64);
    assert_eq!(keys.len(), 8);
    assert_eq!(store.longest_present_prefix(&keys).await.unwrap(), 0);
    fill(&store, &keys, 1024).await;
    assert_eq!(store.longest_present_prefix(&keys).await.unwrap(), 8);
    assert_eq!(store.longest_present_prefix(&[]).await.unwrap(), 0);

    // kv_bytes gone, metadata still there: LMCache counts the chunk as present.
    raw_del(&url, &redis_kv_bytes_key(&keys[1])).await;
    assert_eq!(store.longest_present_prefix(&keys).await.unwrap(), 8);
    assert_eq!(store.get_chunk(&keys[1]).await.unwrap(), None);

    // metadata gone: the prefix stops there although later chunks exist.
    raw_del(&url, &redis_metadata_key(&keys[5])).await;
    assert_eq!(store.longest_present_prefix(&keys).await.unwrap(), 5);
    assert!(store.exists(&keys[6]).await.unwrap());
    raw_del(&url, &redis_metadata_key(&keys[0])).await;
    assert_eq!(store.longest_present_prefix(&keys).await.unwrap(), 0);
}

#[tokio::test]
async fn copy_between_two_redis_servers() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let src = RedisStore::connect(&a.url()).await.unwrap();
    let dst = RedisStore::connect(&b.url()).await.unwrap();
    let keys = lmcache_keys(64);
    // Big-ish values (4 MiB) to exercise pipelined bulk transfers.
    fill(&src, &keys, 4 << 20).await;
    assert_eq!(dst.longest_present_prefix(&keys).await.unwrap(), 0);

    let opts = CopyOptions {
        batch_chunks: 3,
        ..Default::default()
    };
    let report = copy_chunks_with(&src, &dst, &keys, &opts).await.unwrap();
    assert_eq!(report.chunks, 8);
    assert_eq!(report.bytes, 8 * ((4 << 20) + 28));
    assert!(report.bytes_per_sec() > 0.0);
    assert_eq!(dst.longest_present_prefix(&keys).await.unwrap(), 8);
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            dst.get_chunk(k).await.unwrap(),
            Some(chunk(i, 4 << 20)),
            "chunk {i}"
        );
    }
    assert_eq!(dst.io_stats().bytes_written, report.bytes);

    // Memory <-> Redis works the same.
    let mem = MemoryStore::new();
    let r = copy_chunks(&dst, &mem, &keys).await.unwrap();
    assert_eq!(r.chunks, 8);
    assert_eq!(mem.bytes_stored(), report.bytes);
}

#[tokio::test]
async fn copy_stops_at_missing_source_chunk() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let src = RedisStore::connect(&a.url()).await.unwrap();
    let dst = RedisStore::connect(&b.url()).await.unwrap();
    let keys = lmcache_keys(64);
    fill(&src, &keys[..6], 2048).await;
    let e = copy_chunks(&src, &dst, &keys).await.unwrap_err();
    assert_eq!(e.copied_chunks, 6);
    assert_eq!(e.total_chunks, 8);
    assert!(matches!(&e.source, StoreError::MissingChunk { key } if *key == keys[6]));
    assert!(e.to_string().contains("missing from the source"), "{e}");
    assert_eq!(dst.longest_present_prefix(&keys).await.unwrap(), 6);
    assert!(!raw_exists(&b.url(), &redis_kv_bytes_key(&keys[6])).await);
}

/// Wraps a destination store and kills its Redis after the first batch lands.
struct KillAfterFirstPut {
    inner: RedisStore,
    server: Mutex<Option<RedisServer>>,
    puts: AtomicUsize,
}

#[async_trait]
impl KvStore for KillAfterFirstPut {
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key).await
    }
    async fn longest_present_prefix(&self, keys: &[String]) -> Result<usize, StoreError> {
        self.inner.longest_present_prefix(keys).await
    }
    async fn get_chunks(&self, keys: &[String]) -> Result<Vec<Option<Chunk>>, StoreError> {
        self.inner.get_chunks(keys).await
    }
    async fn put_chunks(&self, chunks: &[(String, Chunk)]) -> Result<(), StoreError> {
        let r = self.inner.put_chunks(chunks).await;
        if self.puts.fetch_add(1, Ordering::SeqCst) == 0 {
            if let Some(mut s) = self.server.lock().unwrap().take() {
                s.kill();
            }
        }
        r
    }
    async fn delete_chunk(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.delete_chunk(key).await
    }
    fn io_stats(&self) -> IoStats {
        self.inner.io_stats()
    }
}

#[tokio::test]
async fn killed_redis_mid_copy_is_an_error() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let src = RedisStore::connect(&a.url()).await.unwrap();
    let keys = lmcache_keys(64);
    fill(&src, &keys, 64 << 10).await;
    let dst = KillAfterFirstPut {
        inner: RedisStore::connect_with(&b.url(), fast_fail())
            .await
            .unwrap(),
        server: Mutex::new(Some(b)),
        puts: AtomicUsize::new(0),
    };
    let started = Instant::now();
    let opts = CopyOptions {
        batch_chunks: 2,
        ..Default::default()
    };
    let e = copy_chunks_with(&src, &dst, &keys, &opts)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(e.copied_chunks, 2, "{e}");
    assert_eq!(e.total_chunks, 8);
    assert!(matches!(e.source, StoreError::Redis(_)), "{e}");

    // A killed source fails the same way.
    let src_dead = Arc::new(
        RedisStore::connect_with(&a.url(), fast_fail())
            .await
            .unwrap(),
    );
    drop(a);
    let e = copy_chunks(&*src_dead, &MemoryStore::new(), &keys)
        .await
        .unwrap_err();
    assert_eq!(e.copied_chunks, 0);
    assert!(matches!(e.source, StoreError::Redis(_)), "{e}");
}

#[tokio::test]
async fn connect_to_nothing_fails() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let r = RedisStore::connect_with(&format!("redis://127.0.0.1:{port}/"), fast_fail()).await;
    assert!(r.is_err());
    assert!(started.elapsed() < Duration::from_secs(20));
}
