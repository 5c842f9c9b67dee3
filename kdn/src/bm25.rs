//! BM25 search over knowledge blocks: the index lives in `cacheroute-decisions`
//! ([`cacheroute_decisions::bm25`]) so that the KDN's search endpoint and the gateway's
//! retrieval score the same way; this module re-exports it.

pub use cacheroute_decisions::bm25::{terms, Bm25Index, Hit, B, K1};
