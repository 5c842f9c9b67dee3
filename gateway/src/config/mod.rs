//! The gateway's TOML configuration: schema, defaults and validation.
//!
//! `conf/cacheroute.example.toml` documents every key. Validation here is
//! complete: a file that passes `Config::parse` can be swapped in without any
//! further check failing later.

//!
//! One module per part of the file: `gateway` (`[gateway]`, `[api_keys]`,
//! `[rate_limits]`, the role), `proxy` (`[proxy]`), `knowledge` (`[knowledge]`, the
//! KDNs), `upstream` (`[upstream]` defaults, `[[pools]]`, instances and their URLs).

mod gateway;
mod knowledge;
mod proxy;
mod upstream;

pub use gateway::{ApiKeysSection, GatewaySection, RateLimitSection, Role, TenantLimits};
pub use knowledge::{KdnConfig, KnowledgeSection};
pub use proxy::ProxySection;
pub use upstream::{
    InstanceConfig, InstanceUrl, PoolConfig, PoolSettings, UpstreamDefaults,
    DEFAULT_FIRST_BYTE_TIMEOUT_MS,
};

use anyhow::{bail, Context, Result};
use cacheroute_decisions::scheduler::SchedulerConfig;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub upstream: UpstreamDefaults,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// The scheduler filter's knobs (thresholds, weights, retrieval).
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// Knowledge sync from KDNs and membership.
    #[serde(default)]
    pub knowledge: KnowledgeSection,
    /// KDNs known from the file (more may register on the control plane).
    #[serde(default)]
    pub kdns: Vec<KdnConfig>,
    /// The proxy filter's defaults (pools may override them).
    #[serde(default)]
    pub proxy: ProxySection,
    /// Bearer keys and their tenants (the `api_keys` filter).
    #[serde(default)]
    pub api_keys: ApiKeysSection,
    /// Per-tenant request and prompt-token rates (the `rate_limit` filter).
    #[serde(default)]
    pub rate_limit: RateLimitSection,
    /// Client model name → served model name (the `model_alias` filter).
    #[serde(default)]
    pub model_aliases: std::collections::BTreeMap<String, String>,
}
/// Whether two listen addresses would take the same port: the same port (not 0) on the
/// same IP, or with either on the unspecified address (which covers every IP).
fn same_socket(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn validate_scheduler(s: &SchedulerConfig) -> Result<()> {
    let finite_nonneg = [
        ("retrieval_min_score", s.retrieval_min_score),
        ("kdn_queue_ms_overload_th", s.kdn_queue_ms_overload_th),
        ("pool_load_ratio_delta", s.pool_load_ratio_delta),
        ("default_link_cost", s.default_link_cost),
        ("w_history", s.w_history),
        ("w_link", s.w_link),
        ("w_load", s.w_load),
    ];
    for (name, v) in finite_nonneg {
        if !(v.is_finite() && v >= 0.0) {
            bail!("scheduler.{name} must be a finite number ≥ 0 (got {v})");
        }
    }
    if s.retrieval_top_k == 0 {
        bail!("scheduler.retrieval_top_k must be at least 1");
    }
    Ok(())
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
        if g.header_timeout_ms == 0 || g.body_timeout_ms == 0 {
            bail!("gateway.header_timeout_ms and gateway.body_timeout_ms must be at least 1");
        }
        if g.max_header_bytes < 1024 || g.max_uri_bytes < 64 {
            bail!("gateway.max_header_bytes must be at least 1024 and gateway.max_uri_bytes at least 64");
        }
        if same_socket(g.listen, g.control) {
            // Both listeners would bind (the sockets reuse the port) and the kernel would
            // share connections between them: control requests would reach the service
            // plane and get 404s.
            bail!(
                "gateway.listen ({}) and gateway.control ({}) must not share a port",
                g.listen,
                g.control
            );
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
        if g.max_hops == 0 {
            bail!("gateway.max_hops must be at least 1");
        }
        let k = &self.knowledge;
        if k.sync_interval_ms == 0 || k.sync_timeout_ms == 0 {
            bail!("knowledge.sync_interval_ms and sync_timeout_ms must be at least 1");
        }
        if !(k.member_ttl_s.is_finite() && k.member_ttl_s > 0.0) {
            bail!("knowledge.member_ttl_s must be a positive number of seconds");
        }
        if !k.embeddings_url.is_empty() && !k.embeddings_url.starts_with("http://") {
            bail!("knowledge.embeddings_url must be an http:// base URL");
        }
        validate_scheduler(&self.scheduler)?;
        let p = &self.proxy;
        if p.kv_deadline_ms == 0 || p.inject_timeout_ms == 0 {
            bail!("proxy.kv_deadline_ms and inject_timeout_ms must be at least 1");
        }
        if !(p.store_gbps.is_finite() && p.store_gbps >= 0.0) {
            bail!("proxy.store_gbps must be a finite number ≥ 0");
        }
        if !(p.link_rtt_ms.is_finite() && p.link_rtt_ms >= 0.0) {
            bail!("proxy.link_rtt_ms must be a finite number ≥ 0");
        }
        let mut kdn_urls = HashSet::new();
        for kdn in &self.kdns {
            if !(kdn.url.starts_with("http://") || kdn.url.starts_with("https://")) {
                bail!("kdn url `{}` must be an http:// base URL", kdn.url);
            }
            if !kdn_urls.insert(kdn.url.trim_end_matches('/')) {
                bail!("kdn {} is listed twice", kdn.url);
            }
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
            if s.connect_timeout_ms == 0
                || s.read_timeout_ms == 0
                || s.first_byte_timeout_ms == Some(0)
                || s.queue_timeout_ms == 0
            {
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
                if inst.connect_timeout_ms == Some(0)
                    || inst.read_timeout_ms == Some(0)
                    || inst.first_byte_timeout_ms == Some(0)
                {
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
                instances: upstreams.iter().map(|u| InstanceConfig::new(u)).collect(),
                ..PoolConfig::default()
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
    use cacheroute_decisions::balance::BalancePolicy;
    use cacheroute_decisions::prompt::ChatTemplate;
    use cacheroute_lmcache::tokenizer::TokenizerChoice;

    const EXAMPLE: &str = include_str!("../../../conf/cacheroute.example.toml");

    #[test]
    fn example_config_is_valid() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.pools[0].instances.len(), 2);
        assert_eq!(c.gateway, GatewaySection::default());
        assert_eq!(c.upstream, UpstreamDefaults::default());
    }

    #[test]
    fn proxy_tokenizer_is_auto_approx_or_a_file() {
        let pool = "[[pools]]\nname='a'\n[[pools.instances]]\nurl='http://h:1'\n";
        let parse = |proxy: &str| {
            Config::parse(&format!("{proxy}{pool}"))
                .unwrap()
                .proxy
                .tokenizer
        };
        assert_eq!(parse(""), TokenizerChoice::Auto);
        assert_eq!(parse("[proxy]\ntokenizer = ''\n"), TokenizerChoice::Auto);
        assert_eq!(
            parse("[proxy]\ntokenizer = 'auto'\n"),
            TokenizerChoice::Auto
        );
        assert_eq!(
            parse("[proxy]\ntokenizer = 'approx'\n"),
            TokenizerChoice::Approx
        );
        assert_eq!(
            parse("[proxy]\ntokenizer = '/m/tokenizer.json'\n"),
            TokenizerChoice::File("/m/tokenizer.json".into())
        );
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
            (
                "[gateway]\nlisten='127.0.0.1:8080'\ncontrol='127.0.0.1:8080'\n[[pools]]\nname='a'\n[[pools.instances]]\nurl='http://h:1'\n",
                "must not share a port",
            ),
            (
                "[gateway]\nlisten='0.0.0.0:8080'\ncontrol='127.0.0.1:8080'\n[[pools]]\nname='a'\n[[pools.instances]]\nurl='http://h:1'\n",
                "must not share a port",
            ),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn listen_and_control_may_differ_by_ip_or_port_only() {
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(same_socket(addr("127.0.0.1:80"), addr("127.0.0.1:80")));
        assert!(same_socket(addr("[::]:80"), addr("127.0.0.1:80")));
        assert!(!same_socket(addr("127.0.0.1:80"), addr("127.0.0.2:80")));
        assert!(!same_socket(addr("127.0.0.1:80"), addr("127.0.0.1:81")));
        // port 0: each listener gets its own port from the OS
        assert!(!same_socket(addr("127.0.0.1:0"), addr("127.0.0.1:0")));
    }

    #[test]
    fn templates_per_model() {
        let c = Config::parse(
            "[proxy]\ntemplate='chatml'\ntemplates={ base = 'plain' }\n[[pools]]\nname='a'\n[[pools.instances]]\nurl='http://h:1'\n",
        )
        .unwrap();
        assert_eq!(c.proxy.template_of("base"), ChatTemplate::Plain);
        assert_eq!(c.proxy.template_of("other"), ChatTemplate::Chatml);
        assert!(Config::parse(
            "[proxy]\ntemplates={ base = 'jinja' }\n[[pools]]\nname='a'\n[[pools.instances]]\nurl='http://h:1'\n"
        )
        .is_err());
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

    #[test]
    fn first_byte_timeout_falls_back_to_a_capped_read_timeout() {
        let pools = "[[pools]]\nname='a'\n[[pools.instances]]\nurl='http://h:1'\n";
        let c = Config::parse(pools).unwrap();
        let s = c.pools[0].settings(&c.upstream);
        // Unset: the read timeout (600 s by default), at most two minutes.
        assert_eq!(
            s.first_byte_ms(None, 600_000),
            DEFAULT_FIRST_BYTE_TIMEOUT_MS
        );
        assert_eq!(s.first_byte_ms(None, 500), 500);
        // Set: the instance's, else the pool's, else [upstream]'s.
        let c = Config::parse(&format!("[upstream]\nfirst_byte_timeout_ms=700\n{pools}")).unwrap();
        let s = c.pools[0].settings(&c.upstream);
        assert_eq!(s.first_byte_ms(None, 600_000), 700);
        assert_eq!(s.first_byte_ms(Some(900), 600_000), 900);
        assert!(Config::parse(&format!("[upstream]\nfirst_byte_timeout_ms=0\n{pools}")).is_err());
        assert!(Config::parse(&format!("[gateway]\nheader_timeout_ms=0\n{pools}")).is_err());
    }
}
