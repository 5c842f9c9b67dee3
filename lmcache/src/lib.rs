//! LMCache's side of CacheRoute: everything needed to name, find, read and write the KV
//! chunks an LMCache-enabled vLLM keeps in its remote store, shared by the KDN, the
//! instance agent and the sim so that all three agree byte for byte.
//!
//! * [`keys`]: LMCache chunk keys per LMCache release ([`keys::chunk_keys`]) and the
//!   `<key>metadata` header ([`keys::RemoteMetadata`]); the scheme is described in
//!   `docs/lmcache-keys.md`.
//! * [`cbor`]: the canonical CBOR subset behind vLLM's `sha256_cbor`.
//! * [`store`]: KV chunk stores in LMCache's Redis layout ([`store::KvStore`],
//!   Redis and in-memory) and chunk copying.
//! * [`tokenizer`]: prompt text to token ids (the embedded Llama-3 tokenizer, any
//!   `tokenizer.json`, or a deterministic approximation).
//! * [`layout`]: a knowledge block's padded, chunk-aligned prefix for one model.
//! * [`local_redis`]: a throwaway `redis-server` for tests and benchmarks.

pub mod cbor;
pub mod keys;
pub mod layout;
pub mod local_redis;
pub mod store;
pub mod tokenizer;
