//! KDN: knowledge registry, warm-up and KV injection, over the LMCache crate's keys and stores.
//!
//! * [`keys`], [`cbor`], [`store`], [`tokenizer`], [`layout`], [`local_redis`]: the
//!   LMCache parts, from the `cacheroute-lmcache` crate (re-exported so that
//!   `cacheroute_kdn::keys::...` paths keep working).
//! * [`registry`]: knowledge records, persisted in Redis; [`bm25`]: search.
//! * [`inject`]: injection jobs (dedup, bounded workers, queue, link shaping).
//! * [`service`], [`server`]: the KDN (`cacheroute kdn`), [`server::spawn_kdn`].
//! * [`membership`]: registration with CacheRoute gateways (heartbeats).
//! * [`config`]: the configuration (`conf/kdn.example.toml`).
//! * [`cli`]: `cacheroute kv ...`; [`client_cli`]: `cacheroute knowledge ...`.

/// Bearer tokens, shared with the gateway (`crate::auth::...` paths keep working).
pub use cacheroute_auth as auth;
pub use cacheroute_lmcache::{cbor, keys, layout, local_redis, store, tokenizer};

pub mod bm25;
pub mod cli;
pub mod client_cli;
pub mod config;
pub mod inject;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod service;

pub use server::{run_kdn, spawn_kdn, KdnArgs, KdnHandle};
