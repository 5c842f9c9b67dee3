//! `[upstream]` defaults, `[[pools]]` and their instances, and instance base URLs.

use anyhow::{bail, Context, Result};
use cacheroute_decisions::balance::BalancePolicy;
use cacheroute_decisions::injection::{InjectionStrategy, ReleasePolicy};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamDefaults {
    pub policy: BalancePolicy,
    pub connect_timeout_ms: u64,
    pub read_timeout_ms: u64,
    /// Longest wait for the engine's response header after the request was
    /// sent (a hung engine); `read_timeout_ms` bounds each read after it.
    /// Unset: `read_timeout_ms`, at most DEFAULT_FIRST_BYTE_TIMEOUT_MS.
    pub first_byte_timeout_ms: Option<u64>,
    pub max_retries: usize,
    pub health_check_interval_ms: u64,
    pub health_path: String,
    pub health_consecutive_success: usize,
    pub health_consecutive_failure: usize,
    pub max_inflight: u64,
    pub queue_size: u64,
    pub queue_timeout_ms: u64,
}

impl Default for UpstreamDefaults {
    fn default() -> Self {
        UpstreamDefaults {
            policy: BalancePolicy::LeastInflight,
            connect_timeout_ms: 2_000,
            read_timeout_ms: 600_000,
            first_byte_timeout_ms: None,
            max_retries: 2,
            health_check_interval_ms: 2_000,
            health_path: "/health".into(),
            health_consecutive_success: 1,
            health_consecutive_failure: 1,
            max_inflight: 0,
            queue_size: 1024,
            queue_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// Retrieve knowledge for every request this pool could serve, not only
    /// `"RAG": true` ones.
    #[serde(default)]
    pub rag_always: bool,
    /// The KDN injection target (its configured name) of this pool's instances'
    /// LMCache stores; default: the pool's name. An instance may override it.
    #[serde(default)]
    pub kv_target: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub policy: Option<BalancePolicy>,
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub read_timeout_ms: Option<u64>,
    #[serde(default)]
    pub first_byte_timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_retries: Option<usize>,
    /// Requests in flight per instance (like vLLM's `max_num_seqs`); 0 = unbounded.
    #[serde(default)]
    pub max_inflight: Option<u64>,
    /// Requests that may wait for a slot per instance; beyond it: 429.
    #[serde(default)]
    pub queue_size: Option<u64>,
    /// Longest wait for a slot; past it: 429.
    #[serde(default)]
    pub queue_timeout_ms: Option<u64>,
    /// Overrides of `[proxy]` for this pool.
    #[serde(default)]
    pub injection: Option<InjectionStrategy>,
    #[serde(default)]
    pub release: Option<ReleasePolicy>,
    #[serde(default)]
    pub kv_deadline_ms: Option<u64>,
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub instances: Vec<InstanceConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: i64,
    /// Overrides of the pool's timeouts for this instance.
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub read_timeout_ms: Option<u64>,
    #[serde(default)]
    pub first_byte_timeout_ms: Option<u64>,
    /// The KDN injection target of this instance's store (overrides the pool's).
    #[serde(default)]
    pub kv_target: Option<String>,
    /// Overrides the pool's `max_inflight` for this instance.
    #[serde(default)]
    pub max_inflight: Option<u64>,
}

impl InstanceConfig {
    pub fn new(url: &str) -> Self {
        InstanceConfig {
            url: url.to_string(),
            weight: 1,
            connect_timeout_ms: None,
            read_timeout_ms: None,
            first_byte_timeout_ms: None,
            kv_target: None,
            max_inflight: None,
        }
    }
}

fn default_weight() -> i64 {
    1
}
/// Per-pool settings after applying the `[upstream]` defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub policy: BalancePolicy,
    pub connect_timeout_ms: u64,
    pub read_timeout_ms: u64,
    /// Explicitly set (pool, then `[upstream]`); see [`PoolSettings::first_byte_ms`].
    pub first_byte_timeout_ms: Option<u64>,
    pub max_retries: usize,
    pub max_inflight: u64,
    pub queue_size: u64,
    pub queue_timeout_ms: u64,
}

impl PoolConfig {
    pub fn settings(&self, d: &UpstreamDefaults) -> PoolSettings {
        PoolSettings {
            policy: self.policy.unwrap_or(d.policy),
            connect_timeout_ms: self.connect_timeout_ms.unwrap_or(d.connect_timeout_ms),
            read_timeout_ms: self.read_timeout_ms.unwrap_or(d.read_timeout_ms),
            first_byte_timeout_ms: self.first_byte_timeout_ms.or(d.first_byte_timeout_ms),
            max_retries: self.max_retries.unwrap_or(d.max_retries),
            max_inflight: self.max_inflight.unwrap_or(d.max_inflight),
            queue_size: self.queue_size.unwrap_or(d.queue_size),
            queue_timeout_ms: self.queue_timeout_ms.unwrap_or(d.queue_timeout_ms),
        }
    }
}

/// The first-byte deadline when none is set: a hung engine is given up on
/// after two minutes even though a stream may pause for `read_timeout_ms`.
/// (A non-streamed generation longer than this needs `first_byte_timeout_ms`.)
pub const DEFAULT_FIRST_BYTE_TIMEOUT_MS: u64 = 120_000;

impl PoolSettings {
    /// The first-byte deadline of an instance of this pool: its own setting,
    /// the pool's, `[upstream]`'s, else its read timeout capped at
    /// DEFAULT_FIRST_BYTE_TIMEOUT_MS.
    pub fn first_byte_ms(&self, instance: Option<u64>, read_timeout_ms: u64) -> u64 {
        instance
            .or(self.first_byte_timeout_ms)
            .unwrap_or(read_timeout_ms.min(DEFAULT_FIRST_BYTE_TIMEOUT_MS))
    }
}

/// A parsed `http://host:port` base URL of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceUrl {
    /// Normalised form, `http://host:port`, used as the instance's identity.
    pub base: String,
    pub host: String,
    pub port: u16,
}

impl InstanceUrl {
    pub fn parse(url: &str) -> Result<InstanceUrl> {
        let rest = url.strip_prefix("http://").with_context(|| {
            format!(
                "instance url `{url}` must start with http:// (TLS to instances is not supported)"
            )
        })?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            bail!("instance url `{url}` must be a base URL like http://host:port, without a path");
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port: u16 = p
                    .parse()
                    .with_context(|| format!("instance url `{url}` has an invalid port `{p}`"))?;
                (h.to_string(), port)
            }
            _ => (authority.to_string(), 80),
        };
        if host.is_empty() {
            bail!("instance url `{url}` has no host");
        }
        if port == 0 {
            bail!("instance url `{url}` has port 0");
        }
        Ok(InstanceUrl {
            base: format!("http://{host}:{port}"),
            host,
            port,
        })
    }
}
