//! CacheRoute's gateway as a library: the Pingora server, its request filters
//! ([`pipeline`]), instance pickers ([`pickers`]), configuration and hot reload.
//! The `cacheroute` binary (crate `cli/`) is a thin CLI over it; [`Gateway::builder`]
//! runs a gateway with filters of one's own. It depends on neither the KDN server nor
//! the sim: the tokenizer comes from `cacheroute-lmcache`, bearer tokens from
//! `cacheroute-auth`.

pub mod admission;
pub mod background;
pub mod builder;
pub mod config;
pub mod conn;
pub mod control;
pub mod decisions;
pub mod dispatch;
pub mod fleet;
pub mod forward;
pub mod headers;
pub mod idle_pool;
pub mod knowledge;
pub mod kv_inject;
pub mod kv_plan;
pub mod members;
pub mod metrics;
pub mod models;
pub mod pickers;
pub mod pipeline;
pub mod pull;
pub mod reload;
pub mod retrieval;
pub mod routes;
pub mod server;
pub mod service;
pub mod state;
pub mod sync;
pub mod ui;

pub use builder::{Gateway, GatewayBuilder};
/// What a filter reads and answers with, re-exported so that a filter crate needs
/// no direct dependency on Pingora or the decision crate.
pub use cacheroute_decisions::openai::{ApiError, CompletionBody};
pub use pingora::http::{RequestHeader, ResponseHeader};
pub use pipeline::{
    Attempt, Client, Done, Flow, Incoming, Phases, Reply, RequestCtx, RequestFilter, Stop, World,
};
