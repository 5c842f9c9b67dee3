//! `[gateway]`: listeners, role, filter chain, tokens, limits; `[api_keys]` and
//! `[rate_limits]`, read by the API-key and rate-limit filters.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

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
