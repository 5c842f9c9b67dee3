//! KDN: LMCache key scheme, KV stores, knowledge registry and injection.
//!
//! * [`keys`]: LMCache chunk keys per LMCache release ([`keys::chunk_keys`]).
//! * [`cbor`]: the canonical CBOR subset behind vLLM's `sha256_cbor`.
//! * [`store`]: KV chunk stores in LMCache's Redis layout and chunk copying.
//! * [`tokenizer`]: the tokenizer shared with `sim` (tokenizer.json or the approximation).
//! * [`layout`]: a knowledge block's padded, chunk-aligned prefix for one model.
//! * [`registry`]: knowledge records, persisted in Redis; [`bm25`]: search.
//! * [`inject`]: injection jobs (dedup, bounded workers, queue, link shaping).
//! * [`service`], [`server`]: the KDN (`cacheroute kdn`), [`server::spawn_kdn`].
//! * [`membership`]: registration with CacheRoute gateways (heartbeats).
//! * [`config`]: the configuration (`conf/kdn.example.toml`).
//! * [`cli`]: `cacheroute kv ...`; [`client_cli`]: `cacheroute knowledge ...`.

pub mod auth;
pub mod bm25;
pub mod cbor;
pub mod cli;
pub mod client_cli;
pub mod config;
pub mod inject;
pub mod keys;
pub mod layout;
pub mod limits;
pub mod local_redis;
pub mod membership;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod service;
pub mod store;
pub mod tokenizer;

pub use server::{run_kdn, spawn_kdn, KdnArgs, KdnHandle, TOKEN_ENV};
