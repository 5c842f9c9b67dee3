//! BM25 search over knowledge blocks: the index lives in `cacheroute-filters`
//! ([`cacheroute_filters::bm25`]) so that the KDN's search endpoint and the gateway's
//! retrieval score the same way; this module re-exports it.

pub use cacheroute_filters::bm25::{terms, Bm25Index, Hit, B, K1};
