//! KDN: LMCache key scheme, KV stores, knowledge registry and injection.
//!
//! * [`keys`]: LMCache chunk keys per LMCache release ([`keys::chunk_keys`]).
//! * [`cbor`]: the canonical CBOR subset behind vLLM's `sha256_cbor`.
//! * [`store`]: KV chunk stores in LMCache's Redis layout and chunk copying.
//! * [`cli`]: `cacheroute kv ...` subcommands.

pub mod cbor;
pub mod cli;
pub mod keys;
pub mod store;
pub mod tokenizer;
