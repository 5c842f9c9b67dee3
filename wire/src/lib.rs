//! The wire contract between CacheRoute's components, defined once: every JSON payload
//! one component writes and another reads, and the `x-cacheroute-*` header names.
//!
//! Serde types only, no I/O, so that the writer and the reader compile against the same
//! definition and a renamed field is a compile error or a parse error, never a silent
//! zero. Rules kept throughout: a field the writer always sends is required (no
//! `#[serde(default)]`); a field that may be absent is an `Option` and says when it is
//! absent; unknown fields are ignored (a newer writer may add some).
//!
//! * [`kdn`]: the KDN's registry snapshot and contents, load, and injection jobs.
//! * [`agent`]: the instance agent's load report.
//! * [`members`]: `POST /v1/members` registrations on a gateway's control plane.
//! * [`kv_handle`]: the KV handle a gateway attaches to a KV-mode request.
//! * [`headers`]: the `x-cacheroute-*` header names and the id list encoding.
//! * [`error`]: the OpenAI-style error body every component answers with.
//!
//! The payloads are described for readers in `docs/architecture.md`.

pub mod agent;
pub mod error;
pub mod headers;
pub mod kdn;
pub mod kv_handle;
pub mod members;
