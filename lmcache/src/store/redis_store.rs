//! [`RedisStore`]: chunks in a real Redis, the layout LMCache's `redis://` connector
//! reads, over one multiplexed connection with pipelined batches.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Chunk, Counters, IoStats, KvStore, StoreError};
use crate::keys::{redis_kv_bytes_key, redis_metadata_key};

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
            return Err(StoreError::PresenceAnswers {
                answers: found.len(),
                keys: keys.len(),
            });
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
