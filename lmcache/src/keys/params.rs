//! The parameters that name a deployment's keys ([`KeyParams`]) and their validation,
//! and what the chain produces: chunk hashes and keys.

use std::fmt;

use super::{
    lmcache_dtype_name, redis_kv_bytes_key, redis_metadata_key, HashAlgorithm, KeyError, KeyScheme,
};

/// A short fingerprint of a `PYTHONHASHSEED` string: what a KDN or sim shows in
/// place of the seed (open reads need not reveal it), and what `cacheroute doctor`
/// compares.
pub fn hash_seed_digest(seed: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("cacheroute-hash-seed:{seed}").as_bytes());
    hex::encode(&d[..8])
}

/// Everything that determines a chunk's key, as configured on the vLLM +
/// LMCache instance that will read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParams {
    /// LMCache release family.
    pub scheme: KeyScheme,
    /// LMCache `pre_caching_hash_algorithm`; must be `sha256_cbor`.
    pub hash_algorithm: HashAlgorithm,
    /// vLLM's `--model` argument exactly as given (HF id or path), not the
    /// served model name.
    pub model: String,
    /// Tensor-parallel × pipeline-parallel size.
    pub world_size: u32,
    /// This rank (0-based).
    pub worker_id: u32,
    /// LMCache `chunk_size` (default 256).
    pub chunk_size: usize,
    /// KV cache dtype (see [`lmcache_dtype_name`]).
    pub dtype: String,
    /// The exact `PYTHONHASHSEED` string of every vLLM process. `None` (unset)
    /// is refused: the chain seed would be random.
    pub hash_seed: Option<String>,
    /// LMCache `save_unfull_chunk` (default false since 0.3.11): whether a
    /// trailing partial chunk gets a key.
    pub save_unfull_chunk: bool,
}

impl KeyParams {
    /// Parameters with LMCache's defaults: sha256_cbor, world size 1, worker 0,
    /// chunk 256, bfloat16, save_unfull_chunk false, hash seed unset (set it).
    pub fn new(scheme: KeyScheme, model: impl Into<String>) -> Self {
        Self {
            scheme,
            hash_algorithm: HashAlgorithm::Sha256Cbor,
            model: model.into(),
            world_size: 1,
            worker_id: 0,
            chunk_size: 256,
            dtype: "bfloat16".to_string(),
            hash_seed: None,
            save_unfull_chunk: false,
        }
    }

    /// Check everything; return the chain seed and the dtype name for keys.
    pub(super) fn validate(&self) -> Result<(&str, &'static str), KeyError> {
        self.hash_algorithm.check()?;
        let seed = self.hash_seed.as_deref().ok_or(KeyError::HashSeedUnset)?;
        if self.chunk_size == 0 {
            return Err(KeyError::InvalidParams(
                "chunk_size must be at least 1".into(),
            ));
        }
        if self.world_size == 0 {
            return Err(KeyError::InvalidParams(
                "world_size must be at least 1".into(),
            ));
        }
        if self.worker_id >= self.world_size {
            return Err(KeyError::InvalidParams(format!(
                "worker_id {} is not a rank of world_size {}",
                self.worker_id, self.world_size
            )));
        }
        if self.model.is_empty() {
            return Err(KeyError::InvalidParams(
                "model is empty; use vLLM's --model argument exactly".into(),
            ));
        }
        if self.model.contains('@') {
            return Err(KeyError::InvalidParams(format!(
                "model {:?} contains '@', the key field separator; LMCache cannot parse such \
                 keys back (CacheEngineKey.from_string), serve the model from a path without '@'",
                self.model
            )));
        }
        let dtype = lmcache_dtype_name(self.scheme, &self.dtype)?;
        Ok((seed, dtype))
    }
}

/// A chunk hash as LMCache holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkHash {
    /// 32-byte SHA-256 digest (0.3.13 – 0.4.5); rendered as 64 lowercase hex.
    Digest([u8; 32]),
    /// Digest folded to its first 8 bytes, big-endian (0.4.6+); rendered as
    /// lowercase hex without padding (Python `f"{h:x}"`).
    Folded(u64),
}

impl ChunkHash {
    /// The HASH field of the key string.
    pub fn to_hex(&self) -> String {
        match self {
            ChunkHash::Digest(d) => hex::encode(d),
            ChunkHash::Folded(n) => format!("{n:x}"),
        }
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One chunk of a token sequence and its LMCache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    /// `model@world_size@worker_id@HASH@dtype` (no `kv_bytes`/`metadata`).
    pub key: String,
    /// First token index of the chunk.
    pub start: usize,
    /// One past the last token index.
    pub end: usize,
    /// The chain hash after this chunk.
    pub hash: ChunkHash,
}

impl ChunkKey {
    pub fn num_tokens(&self) -> usize {
        self.end - self.start
    }

    /// `<key>kv_bytes`.
    pub fn redis_kv_bytes_key(&self) -> String {
        redis_kv_bytes_key(&self.key)
    }

    /// `<key>metadata`.
    pub fn redis_metadata_key(&self) -> String {
        redis_metadata_key(&self.key)
    }
}
