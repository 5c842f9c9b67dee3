//! The hash chain: the seed hash (`NONE_HASH`), chunk spans, the chained chunk hashes
//! and the keys they render to, for one rank or all ranks.

use sha2::{Digest, Sha256};

use super::{ChunkHash, ChunkKey, KeyError, KeyParams, KeyScheme};
use crate::cbor::Encoder;

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn fold(d: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

/// `NONE_HASH`, the chain seed: `sha256_cbor(<hash seed string>)`, folded for
/// `lmcache-0.5`.
pub fn none_hash(params: &KeyParams) -> Result<ChunkHash, KeyError> {
    let (seed, _) = params.validate()?;
    Ok(seed_hash(params.scheme, seed))
}

fn seed_hash(scheme: KeyScheme, seed: &str) -> ChunkHash {
    let mut enc = Encoder::new();
    enc.text(seed);
    let d = sha256(enc.as_bytes());
    if scheme.folds_to_u64() {
        ChunkHash::Folded(fold(&d))
    } else {
        ChunkHash::Digest(d)
    }
}

/// Token spans `[start, end)` LMCache keys for a sequence of `len` tokens.
pub fn chunk_spans(len: usize, chunk_size: usize, save_unfull_chunk: bool) -> Vec<(usize, usize)> {
    assert!(chunk_size > 0, "chunk_size must be at least 1");
    let end = if save_unfull_chunk {
        len
    } else {
        len - len % chunk_size
    };
    (0..end)
        .step_by(chunk_size)
        .map(|s| (s, (s + chunk_size).min(len)))
        .collect()
}

/// The chain hashes of every chunk, with their spans.
fn chain(params: &KeyParams, seed: &str, tokens: &[u32]) -> Vec<(usize, usize, ChunkHash)> {
    let scheme = params.scheme;
    let spans = chunk_spans(tokens.len(), params.chunk_size, params.save_unfull_chunk);
    let mut prev = seed_hash(scheme, seed);
    let mut enc = Encoder::with_capacity(64 + 5 * params.chunk_size.min(1 << 16));
    let mut out = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        enc.clear();
        enc.array_header(3);
        match &prev {
            ChunkHash::Digest(d) => enc.bytes(d),
            ChunkHash::Folded(n) => enc.uint(*n),
        };
        enc.uint_array(tokens[start..end].iter().copied());
        if scheme.extra_keys_is_empty_tuple() {
            enc.array_header(0);
        } else {
            enc.null();
        }
        let d = sha256(enc.as_bytes());
        prev = if scheme.folds_to_u64() {
            ChunkHash::Folded(fold(&d))
        } else {
            ChunkHash::Digest(d)
        };
        out.push((start, end, prev));
    }
    out
}

fn render(model: &str, world_size: u32, worker_id: u32, hash: &ChunkHash, dtype: &str) -> String {
    format!("{model}@{world_size}@{worker_id}@{}@{dtype}", hash.to_hex())
}

/// LMCache's key for every chunk of `tokens` (the prompt's token ids from token
/// 0, BOS included), for rank `params.worker_id`.
///
/// An empty sequence has no chunks; a trailing partial chunk has a key only
/// with `save_unfull_chunk`.
pub fn chunk_keys(params: &KeyParams, tokens: &[u32]) -> Result<Vec<ChunkKey>, KeyError> {
    let (seed, dtype) = params.validate()?;
    Ok(chain(params, seed, tokens)
        .into_iter()
        .map(|(start, end, hash)| ChunkKey {
            key: render(
                &params.model,
                params.world_size,
                params.worker_id,
                &hash,
                dtype,
            ),
            start,
            end,
            hash,
        })
        .collect())
}

/// Keys for every rank `0..world_size` (`result[rank][chunk]`), ignoring
/// `params.worker_id`. With tensor/pipeline parallelism every rank stores its
/// own slice of each chunk under its own key; a chunk is usable only when all
/// ranks' entries are present.
pub fn chunk_keys_all_ranks(
    params: &KeyParams,
    tokens: &[u32],
) -> Result<Vec<Vec<ChunkKey>>, KeyError> {
    let mut p = params.clone();
    p.worker_id = 0;
    let (seed, dtype) = p.validate()?;
    let hashes = chain(&p, seed, tokens);
    Ok((0..p.world_size)
        .map(|rank| {
            hashes
                .iter()
                .map(|(start, end, hash)| ChunkKey {
                    key: render(&p.model, p.world_size, rank, hash, dtype),
                    start: *start,
                    end: *end,
                    hash: *hash,
                })
                .collect()
        })
        .collect())
}
