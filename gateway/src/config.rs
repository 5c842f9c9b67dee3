//! The gateway's TOML configuration: schema, defaults and validation.
//!
//! `conf/cacheroute.example.toml` documents every key. Validation here is
//! complete: a file that passes `Config::parse` can be swapped in without any
//! further check failing later.

use anyhow::{bail, Context, Result};
use cacheroute_filters::balance::BalancePolicy;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub upstream: UpstreamDefaults,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    pub listen: SocketAddr,
    pub control: SocketAddr,
    pub threads: usize,
    pub max_body_bytes: usize,
    pub control_token: String,
    pub watch_config: bool,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            listen: "0.0.0.0:7001".parse().expect("literal address"),
            control: "127.0.0.1:7002".parse().expect("literal address"),
            threads: 2,
            max_body_bytes: 32 * 1024 * 1024,
            control_token: String::new(),
            watch_config: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamDefaults {
    pub policy: BalancePolicy,
    pub connect_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub max_retries: usize,
    pub health_check_interval_ms: u64,
    pub health_path: String,
    pub health_consecutive_success: usize,
    pub health_consecutive_failure: usize,
}

impl Default for UpstreamDefaults {
    fn default() -> Self {
        UpstreamDefaults {
            policy: BalancePolicy::LeastInflight,
            connect_timeout_ms: 2_000,
            read_timeout_ms: 600_000,
            max_retries: 2,
            health_check_interval_ms: 2_000,
            health_path: "/health".into(),
            health_consecutive_success: 1,
            health_consecutive_failure: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub policy: Option<BalancePolicy>,
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub read_timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_retries: Option<usize>,
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
    pub max_retries: usize,
}

impl PoolConfig {
    pub fn settings(&self, d: &UpstreamDefaults) -> PoolSettings {
        PoolSettings {
            policy: self.policy.unwrap_or(d.policy),
            connect_timeout_ms: self.connect_timeout_ms.unwrap_or(d.connect_timeout_ms),
            read_timeout_ms: self.read_timeout_ms.unwrap_or(d.read_timeout_ms),
            max_retries: self.max_retries.unwrap_or(d.max_retries),
        }
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

impl Config {
    /// Parse and fully validate a TOML document.
    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).context("invalid TOML")?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let g = &self.gateway;
        if g.threads == 0 {
            bail!("gateway.threads must be at least 1");
        }
        if g.max_body_bytes == 0 {
            bail!("gateway.max_body_bytes must be at least 1");
        }
        let u = &self.upstream;
        if u.health_check_interval_ms == 0 {
            bail!("upstream.health_check_interval_ms must be at least 1");
        }
        if !u.health_path.starts_with('/') {
            bail!("upstream.health_path must start with '/'");
        }
        if u.health_consecutive_success == 0 || u.health_consecutive_failure == 0 {
            bail!("upstream.health_consecutive_success/failure must be at least 1");
        }
        if self.pools.is_empty() {
            bail!("at least one [[pools]] entry is required");
        }
        let mut names = HashSet::new();
        for pool in &self.pools {
            if pool.name.trim().is_empty() {
                bail!("every pool needs a non-empty name");
            }
            if !names.insert(pool.name.as_str()) {
                bail!("pool name `{}` is used twice", pool.name);
            }
            if pool.instances.is_empty() {
                bail!("pool `{}` has no instances", pool.name);
            }
            let s = pool.settings(u);
            if s.connect_timeout_ms == 0 || s.read_timeout_ms == 0 {
                bail!("pool `{}`: timeouts must be at least 1 ms", pool.name);
            }
            if pool.models.iter().any(|m| m.is_empty()) {
                bail!("pool `{}` lists an empty model name", pool.name);
            }
            let mut urls = HashSet::new();
            for inst in &pool.instances {
                let url = InstanceUrl::parse(&inst.url)
                    .with_context(|| format!("pool `{}`", pool.name))?;
                if !(1..=1_000_000).contains(&inst.weight) {
                    bail!(
                        "pool `{}`: instance {} has weight {}; weights are integers from 1 to 1000000",
                        pool.name,
                        inst.url,
                        inst.weight
                    );
                }
                if inst.connect_timeout_ms == Some(0) || inst.read_timeout_ms == Some(0) {
                    bail!(
                        "pool `{}`: instance {} has a timeout of 0 ms",
                        pool.name,
                        inst.url
                    );
                }
                if !urls.insert(url.base.clone()) {
                    bail!("pool `{}` lists instance {} twice", pool.name, url.base);
                }
            }
        }
        Ok(())
    }

    /// The configuration of drop-in mode: one pool over the given instance
    /// URLs, models discovered from each instance.
    pub fn drop_in(upstreams: &[String]) -> Result<Config> {
        let config = Config {
            pools: vec![PoolConfig {
                name: "default".into(),
                models: Vec::new(),
                policy: None,
                connect_timeout_ms: None,
                read_timeout_ms: None,
                max_retries: None,
                instances: upstreams
                    .iter()
                    .map(|u| InstanceConfig {
                        url: u.clone(),
                        weight: 1,
                        connect_timeout_ms: None,
                        read_timeout_ms: None,
                    })
                    .collect(),
            }],
            ..Config::default()
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../conf/cacheroute.example.toml");

    #[test]
    fn example_config_is_valid() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.pools[0].instances.len(), 2);
        assert_eq!(c.gateway, GatewaySection::default());
        assert_eq!(c.upstream, UpstreamDefaults::default());
    }

    #[test]
    fn url_parsing() {
        let u = InstanceUrl::parse("http://127.0.0.1:8000/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base.as_str()),
            ("127.0.0.1", 8000, "http://127.0.0.1:8000")
        );
        assert_eq!(InstanceUrl::parse("http://vllm-a").unwrap().port, 80);
        assert!(InstanceUrl::parse("https://x:1").is_err());
        assert!(InstanceUrl::parse("http://x:1/v1").is_err());
        assert!(InstanceUrl::parse("http://x:notaport").is_err());
    }

    #[test]
    fn invalid_configs_are_rejected_with_reasons() {
        let cases = [
            ("[[pools]]\nname='a'\n", "no instances"),
            ("[[pools]]\nname='a'\n[[pools.instances]]\nurl='http://h:1'\nweight=-1\n", "weight"),
            ("[[pools]]\nname='a'\npolicy='fastest'\n[[pools.instances]]\nurl='http://h:1'\n", "unknown variant"),
            ("[gateway]\nbogus=1\n", "unknown field"),
            ("", "at least one"),
            ("[[pools]]\nname='a'\n[[pools.instances]]\nurl='http://h:1'\n[[pools]]\nname='a'\n[[pools.instances]]\nurl='http://h:2'\n", "twice"),
            ("this is not toml", "invalid TOML"),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn pool_overrides_defaults() {
        let c = Config::parse(
            "[upstream]\nmax_retries=5\n[[pools]]\nname='a'\npolicy='round_robin'\nmax_retries=1\n[[pools.instances]]\nurl='http://h:1'\n",
        )
        .unwrap();
        let s = c.pools[0].settings(&c.upstream);
        assert_eq!((s.policy, s.max_retries), (BalancePolicy::RoundRobin, 1));
    }
}
