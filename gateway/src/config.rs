//! The gateway's TOML configuration: schema, defaults and validation.
//!
//! `conf/cacheroute.example.toml` documents every key. Validation here is
//! complete: a file that passes `Config::parse` can be swapped in without any
//! further check failing later.

use anyhow::{bail, Context, Result};
use cacheroute_decisions::balance::BalancePolicy;
use cacheroute_decisions::injection::{InjectionStrategy, ReleasePolicy};
use cacheroute_decisions::prompt::ChatTemplate;
use cacheroute_decisions::scheduler::SchedulerConfig;
use cacheroute_lmcache::tokenizer::TokenizerChoice;
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ApiKeysSection {
    /// Key → tenant.
    pub keys: std::collections::BTreeMap<String, String>,
    /// A TOML file of more `"key" = "tenant"` lines, read again on every reload.
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    /// Default limits of every tenant (0: unlimited).
    pub requests_per_minute: u64,
    pub prompt_tokens_per_minute: u64,
    /// Limits of named tenants, overriding the defaults.
    pub tenants: std::collections::BTreeMap<String, TenantLimits>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub prompt_tokens_per_minute: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// How knowledge is injected: text, kv, iws (the original's rule) or adaptive.
    pub injection: InjectionStrategy,
    /// KV-mode requests admitted before their KV is resident: ordered, text_bypass, wait.
    pub release: ReleasePolicy,
    /// Longest a KV-mode request waits for its KV once it could go; then text.
    pub kv_deadline_ms: u64,
    /// Limit of one injection job the gateway asks a KDN for.
    pub inject_timeout_ms: u64,
    /// GPU profile of the instances: a shipped profile's short name (`h100-llama3-8b`,
    /// `h100x8-llama3-70b-tp8`, `rtx5090x8-llama3-70b`, `h100-llama3-70b-8layers`) or a
    /// JSON file as in conf/profiles/; "" = `h100-llama3-8b`.
    pub profile: String,
    /// Chat template family of the served models; a block registered for another
    /// template goes as text (counted as a prefix mismatch).
    pub template: ChatTemplate,
    /// Per served model name, a template other than `template`.
    pub templates: std::collections::BTreeMap<String, ChatTemplate>,
    /// The models' tokenizer, to check that a rendered prefix has the registered token
    /// count: "auto" (or ""; the default) = the embedded exact Llama-3 tokenizer for
    /// models whose name looks like Llama-3 and the approximation for others, as the
    /// KDN and sim do by default; "approx"; or the path of a tokenizer.json.
    pub tokenizer: TokenizerChoice,
    /// Also send the KV handle in the body as `kv_transfer_params`.
    pub kv_transfer_params: bool,
    /// Round-trip time of a KDN → instance link, ms (for the predictions).
    pub link_rtt_ms: f64,
    /// Bandwidth from an instance's LMCache store to its GPU host, Gbit/s, paid by every
    /// KV load from a remote store (`sim --kv-store-gbps`); 0: local or not counted.
    pub store_gbps: f64,
    /// Adaptive also charges a mode the step time it adds to the requests prefilling
    /// beside it on the instance (off by default; see the README).
    pub weigh_others: bool,
    /// The engines' LMCache stores the KV of prefixes they compute (LMCache's
    /// default): after a text-mode request the knowledge counts as resident there.
    pub engine_stores_prefix: bool,
}

impl ProxySection {
    /// The chat template family of `model`.
    pub fn template_of(&self, model: &str) -> ChatTemplate {
        self.templates.get(model).copied().unwrap_or(self.template)
    }
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            injection: InjectionStrategy::Adaptive,
            release: ReleasePolicy::Ordered,
            kv_deadline_ms: 5_000,
            inject_timeout_ms: 60_000,
            profile: String::new(),
            template: ChatTemplate::Llama3,
            templates: Default::default(),
            tokenizer: TokenizerChoice::Auto,
            kv_transfer_params: false,
            link_rtt_ms: 0.5,
            store_gbps: 0.0,
            weigh_others: false,
            engine_stores_prefix: true,
        }
    }
}

/// What a gateway does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Both filters in one process: choose the pool, then the instance.
    #[default]
    All,
    /// Only the scheduler filter: pools are gateways with `role = "proxy"`, and the
    /// decision travels to them in `x-cacheroute-*` headers.
    Scheduler,
    /// Only the proxy filter: trusts the pool and knowledge an upstream scheduler put
    /// in the headers (and schedules itself when they are absent).
    Proxy,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Scheduler => "scheduler",
            Role::Proxy => "proxy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnowledgeSection {
    /// How often each KDN's registry (versioned: unchanged costs a 304) and load, and
    /// each agent's load, are pulled.
    pub sync_interval_ms: u64,
    /// Timeout of one pull.
    pub sync_timeout_ms: u64,
    /// Seconds a registered member lives without a heartbeat, when it does not say.
    pub member_ttl_s: f64,
    /// Most members (KDNs and agents) registered at once; more are refused (429).
    pub max_members: usize,
    /// Optional OpenAI-compatible embeddings endpoint (vLLM, TEI): base URL. When set,
    /// retrieval ranks blocks by cosine similarity of embeddings instead of BM25.
    pub embeddings_url: String,
    /// Model name sent to the embeddings endpoint.
    pub embeddings_model: String,
    /// Bearer token for the KDNs' write paths (the gateway asks them to inject);
    /// empty: `CACHEROUTE_KDN_TOKEN` from the environment, else none.
    pub kdn_token: String,
}

impl Default for KnowledgeSection {
    fn default() -> Self {
        KnowledgeSection {
            sync_interval_ms: 1_000,
            sync_timeout_ms: 2_000,
            member_ttl_s: 10.0,
            max_members: 256,
            embeddings_url: String::new(),
            embeddings_model: String::new(),
            kdn_token: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdnConfig {
    /// Base URL of the KDN API.
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    pub listen: SocketAddr,
    pub control: SocketAddr,
    pub threads: usize,
    pub max_body_bytes: usize,
    pub control_token: String,
    /// Shared by the gateways of a multi-tier deployment: a scheduler sends it, a proxy
    /// honours `x-cacheroute-*` decision headers only with it (empty: never; the
    /// environment's `CACHEROUTE_PEER_TOKEN` fills it when the file does not).
    pub peer_token: String,
    pub watch_config: bool,
    pub role: Role,
    /// The request filters, in order; empty: the role's preset
    /// (see `pipeline::preset`).
    pub filters: Vec<String>,
    /// Gateway hops a request may take (scheduler → proxy …) before it is refused as
    /// a loop (508).
    pub max_hops: u32,
    /// Scheduling decisions kept for `GET /debug/strategy`.
    pub decision_history: usize,
    /// Append one JSON line per decision to this file ("-": stdout; "": off).
    pub log_decisions: String,
    /// Longest time from a request's first byte to the end of its header; past
    /// it the connection is answered 408 and closed (slow-header clients).
    pub header_timeout_ms: u64,
    /// Longest time to read a request's whole body; past it: 408 and close.
    pub body_timeout_ms: u64,
    /// Largest request header (request line included) answered; larger: 431.
    pub max_header_bytes: usize,
    /// Longest request target (path and query) answered; longer: 414.
    pub max_uri_bytes: usize,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            listen: "0.0.0.0:7001".parse().expect("literal address"),
            control: "127.0.0.1:7002".parse().expect("literal address"),
            threads: 2,
            max_body_bytes: 32 * 1024 * 1024,
            control_token: String::new(),
            peer_token: String::new(),
            watch_config: true,
            role: Role::All,
            filters: Vec::new(),
            max_hops: 4,
            decision_history: 256,
            log_decisions: String::new(),
            header_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            max_header_bytes: 64 * 1024,
            max_uri_bytes: 8 * 1024,
        }
    }
}

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

    const EXAMPLE: &str = include_str!("../../conf/cacheroute.example.toml");

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
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
        }
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
