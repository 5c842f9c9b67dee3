//! Registry persistence: the [`RegistryBackend`] trait and its Redis (one hash, one
//! field per block) and in-process (named, shared maps) implementations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::KnowledgeRecord;

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
