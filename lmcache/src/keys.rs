//! LMCache chunk keys: which Redis entries hold the KV cache of a token prefix.
//!
//! LMCache (vLLM's KV connector) splits a prompt's token ids into chunks of
//! `chunk_size` tokens and names each chunk by a hash chained over the whole
//! prefix up to and including it. Any process that knows the token ids and the
//! deployment's settings can therefore compute the keys, check a store for them
//! and copy them. This module reproduces LMCache's rules exactly, for the
//! releases listed in [`KeyScheme`], with vLLM 0.13's `sha256_cbor` hash:
//!
//! * `NONE_HASH = sha256(cbor(<PYTHONHASHSEED string>))`, the chain seed;
//! * `h_i = sha256(cbor((h_{i-1}, (tokens of chunk i…), EXTRA)))`, where
//!   `EXTRA` is `None` up to 0.3.15 and `()` from 0.4.1;
//! * from 0.4.6 every digest is folded to its first 8 bytes read big-endian
//!   (a `u64`), and that integer is what the next link hashes;
//! * key = `model@world_size@worker_id@HASH@dtype`, HASH being the digest's 64
//!   lowercase hex digits, or the folded integer in hex without padding.
//!
//! What cannot be reproduced is refused with an error that says what to
//! configure; see [`KeyError`]. Test vectors produced by LMCache's own code
//! live in `lmcache/tests/data/`.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::cbor::Encoder;

/// Redis (`redis://`, `rediss://`, `unix://`, sentinel and cluster URLs): the
/// entry with a chunk's raw KV bytes is `<key>kv_bytes`.
pub const REDIS_KV_BYTES_SUFFIX: &str = "kv_bytes";
/// Redis: the entry with a chunk's 28-byte [`RemoteMetadata`] is
/// `<key>metadata`. LMCache treats a chunk as present iff this entry exists.
pub const REDIS_METADATA_SUFFIX: &str = "metadata";

/// `<key>kv_bytes`, the Redis name of a chunk's KV bytes (no separator).
pub fn redis_kv_bytes_key(key: &str) -> String {
    format!("{key}{REDIS_KV_BYTES_SUFFIX}")
}

/// `<key>metadata`, the Redis name of a chunk's metadata header (no separator).
pub fn redis_metadata_key(key: &str) -> String {
    format!("{key}{REDIS_METADATA_SUFFIX}")
}

// ---------------------------------------------------------------------------
// Errors

/// Why keys cannot be computed (or would not match what LMCache writes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "key scheme {scheme:?} is not supported: {reason}. Supported: lmcache-0.3.13 \
         (LMCache 0.3.13-0.3.15), lmcache-0.4 (0.4.1-0.4.5), lmcache-0.5 (0.4.6-0.5.6), \
         or an exact release such as lmcache-0.3.15"
    )]
    UnsupportedScheme { scheme: String, reason: String },

    #[error(
        "the hash seed is unset: without PYTHONHASHSEED, vLLM seeds LMCache's hash chain \
         with 32 random bytes per process, so no other process (nor a restart) can \
         reproduce the keys; set PYTHONHASHSEED for vLLM (every process) and pass the \
         same string with --hash-seed"
    )]
    HashSeedUnset,

    #[error(
        "hash seed {0:?} is not a PYTHONHASHSEED value: Python refuses to start unless it \
         is \"random\" or a decimal integer in [0, 4294967295]; give the exact string \
         exported to vLLM (e.g. 0)"
    )]
    HashSeedInvalid(String),

    #[error("pre_caching_hash_algorithm {name:?} cannot be reproduced: {why}; set pre_caching_hash_algorithm: sha256_cbor in the LMCache config and use the same here")]
    UnsupportedHashAlgorithm { name: String, why: String },

    #[error("dtype {dtype:?} is not a KV dtype name that {scheme} writes into keys ({hint}); valid: {valid}")]
    UnknownDtype {
        dtype: String,
        scheme: KeyScheme,
        hint: String,
        valid: String,
    },

    #[error("invalid key parameters: {0}")]
    InvalidParams(String),
}

/// Check a hash seed the way CPython checks `PYTHONHASHSEED`: vLLM seeds LMCache's
/// chain with `sha256_cbor(<the PYTHONHASHSEED string>)`, and Python only starts with
/// `random` (which here means unset: refused) or a decimal integer in `[0, 4294967295]`.
/// The string is used as given (`"00"` and `"0"` are different seeds).
pub fn check_hash_seed(seed: &str) -> Result<(), KeyError> {
    if seed.is_empty() || seed == "random" {
        return Err(KeyError::HashSeedUnset);
    }
    let in_range = seed.bytes().all(|b| b.is_ascii_digit())
        && seed.parse::<u64>().is_ok_and(|n| n <= u32::MAX as u64);
    if !in_range {
        return Err(KeyError::HashSeedInvalid(seed.to_string()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Schemes

/// A family of LMCache releases that name chunks identically.
///
/// Parse with `"lmcache-0.3.13"`, `"lmcache-0.4"`, `"lmcache-0.5"` or an exact
/// release (`"lmcache-0.4.7"`, with or without the `lmcache-` prefix), which
/// maps to its family. Releases ≤ 0.3.12 are refused (see
/// [`KeyError::UnsupportedScheme`]); unreleased or unverified versions too.
///
/// Note the family boundaries, verified by running every release's own code:
/// the 64-bit folding that `lmcache-0.5` stands for first shipped in **0.4.6**,
/// so 0.4.6 and 0.4.7 belong to `lmcache-0.5`, not `lmcache-0.4`. Prefer
/// giving the exact release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyScheme {
    /// LMCache 0.3.13, 0.3.14, 0.3.15: extra keys `None`, 32-byte digests
    /// chained as bytes, 64-hex-digit keys.
    Lmcache0_3_13,
    /// LMCache 0.4.1 – 0.4.5: extra keys `()`, otherwise as 0.3.13.
    Lmcache0_4,
    /// LMCache 0.4.6 – 0.5.6: extra keys `()`, digests folded to `u64` (first 8
    /// bytes big-endian), chained as CBOR ints, keys in unpadded hex.
    Lmcache0_5,
}

impl KeyScheme {
    pub const ALL: [KeyScheme; 3] = [
        KeyScheme::Lmcache0_3_13,
        KeyScheme::Lmcache0_4,
        KeyScheme::Lmcache0_5,
    ];

    /// The canonical name, e.g. `lmcache-0.3.13`.
    pub fn name(self) -> &'static str {
        match self {
            KeyScheme::Lmcache0_3_13 => "lmcache-0.3.13",
            KeyScheme::Lmcache0_4 => "lmcache-0.4",
            KeyScheme::Lmcache0_5 => "lmcache-0.5",
        }
    }

    /// The LMCache releases this scheme was verified against.
    pub fn releases(self) -> &'static str {
        match self {
            KeyScheme::Lmcache0_3_13 => "0.3.13-0.3.15",
            KeyScheme::Lmcache0_4 => "0.4.1-0.4.5",
            KeyScheme::Lmcache0_5 => "0.4.6-0.5.6",
        }
    }

    /// Third element of every hashed tuple: `None` (0.3.x) or `()` (0.4+).
    fn extra_keys_is_empty_tuple(self) -> bool {
        !matches!(self, KeyScheme::Lmcache0_3_13)
    }

    /// Whether digests are folded to `u64` before chaining and rendering.
    fn folds_to_u64(self) -> bool {
        matches!(self, KeyScheme::Lmcache0_5)
    }

    /// The scheme of one exact LMCache release (`major.minor.patch`).
    fn of_release(v: (u32, u32, u32), text: &str) -> Result<KeyScheme, KeyError> {
        let unsupported = |reason: &str| KeyError::UnsupportedScheme {
            scheme: text.to_string(),
            reason: reason.to_string(),
        };
        match v {
            (0, 3, 13..=15) => Ok(KeyScheme::Lmcache0_3_13),
            (0, 4, 1..=5) => Ok(KeyScheme::Lmcache0_4),
            (0, 4, 6..=7) | (0, 5, 0..=6) => Ok(KeyScheme::Lmcache0_5),
            (0, 0..=2, _) | (0, 3, 0..=12) => Err(unsupported(
                "LMCache <= 0.3.12 cannot write sha256_cbor keys (CacheEngineKey.to_string \
                 raises TypeError on byte digests, fixed in 0.3.13) and its default builtin \
                 hash is CPython's hash(); upgrade LMCache to >= 0.3.13 (0.3.15 recommended) \
                 with pre_caching_hash_algorithm: sha256_cbor",
            )),
            _ => Err(unsupported(
                "this LMCache release has not been checked against vectors from its own \
                 code; generate vectors with kdn/tests/gen and add it, or pin a verified \
                 release",
            )),
        }
    }
}

impl fmt::Display for KeyScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyScheme {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let lower = text.to_ascii_lowercase();
        let version = lower.strip_prefix("lmcache-").unwrap_or(&lower);
        match version {
            "0.3.13" => return Ok(KeyScheme::Lmcache0_3_13),
            "0.4" => return Ok(KeyScheme::Lmcache0_4),
            "0.5" => return Ok(KeyScheme::Lmcache0_5),
            _ => {}
        }
        let bad = |reason: &str| KeyError::UnsupportedScheme {
            scheme: text.to_string(),
            reason: reason.to_string(),
        };
        // `0.3.10.post2` and the like: post releases only exist <= 0.3.10.
        let core = version.split(".post").next().unwrap_or(version);
        let parts: Vec<u32> = core
            .split('.')
            .map(|p| p.parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad("not an LMCache version"))?;
        match parts.as_slice() {
            [major, minor, patch] => KeyScheme::of_release((*major, *minor, *patch), text),
            [0, 3] => Err(bad(
                "0.3.x is ambiguous (the key format changed at 0.3.13); give the exact release",
            )),
            [major, minor] => KeyScheme::of_release((*major, *minor, u32::MAX), text),
            _ => Err(bad("not an LMCache version")),
        }
    }
}

// ---------------------------------------------------------------------------
// Hash algorithm

/// LMCache's `pre_caching_hash_algorithm`. Only `sha256_cbor` is reproducible.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashAlgorithm {
    /// vLLM's `sha256_cbor`: SHA-256 over canonical CBOR. Supported.
    Sha256Cbor,
    /// Python's `hash()` (LMCache's default `builtin`, and its fallback for
    /// names vLLM does not know). Refused.
    Builtin,
    /// Any other vLLM hash (`sha256` (pickle), `xxhash`, `xxhash_cbor`). Refused.
    Other(String),
}

impl HashAlgorithm {
    pub fn name(&self) -> &str {
        match self {
            HashAlgorithm::Sha256Cbor => "sha256_cbor",
            HashAlgorithm::Builtin => "builtin",
            HashAlgorithm::Other(s) => s,
        }
    }

    fn check(&self) -> Result<(), KeyError> {
        let why = match self {
            HashAlgorithm::Sha256Cbor => return Ok(()),
            HashAlgorithm::Builtin => {
                "LMCache then uses Python's builtin hash(), which depends on the CPython \
                 version (hash(None) is per-process before 3.12) and on SipHash keyed by \
                 PYTHONHASHSEED"
            }
            HashAlgorithm::Other(name) if name == "sha256" => {
                "vLLM's sha256 hashes a Python pickle, which needs byte-exact pickle \
                 protocol 5"
            }
            HashAlgorithm::Other(name) if name == "xxhash" || name == "xxhash_cbor" => {
                "xxhash keys are not implemented or verified here"
            }
            HashAlgorithm::Other(_) => {
                "LMCache does not know this name and silently falls back to Python's \
                 builtin hash()"
            }
        };
        Err(KeyError::UnsupportedHashAlgorithm {
            name: self.name().to_string(),
            why: why.to_string(),
        })
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgorithm {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim() {
            "sha256_cbor" => HashAlgorithm::Sha256Cbor,
            "builtin" => HashAlgorithm::Builtin,
            other => HashAlgorithm::Other(other.to_string()),
        })
    }
}

// ---------------------------------------------------------------------------
// Dtype names

/// Names every supported scheme writes (LMCache's `TORCH_DTYPE_TO_STR_DTYPE`).
const COMMON_DTYPES: [&str; 10] = [
    "half", "bfloat16", "float", "double", "int8", "uint8", "int16", "int32", "int64", "bool",
];
/// FP8 names from LMCache 0.3.14 on.
const FP8_DTYPES_NEW: [&str; 4] = ["fp8_e4m3fn", "fp8_e4m3fnuz", "fp8_e5m2", "fp8_e5m2fnuz"];
/// FP8 names in LMCache 0.3.13 (both e4m3 variants wrote `fp8_e4m3`).
const FP8_DTYPES_0_3_13: [&str; 2] = ["fp8_e4m3", "fp8_e5m2"];

/// The dtype name LMCache writes into keys, from an LMCache or torch name
/// (`float16`/`fp16` → `half`, `bf16` → `bfloat16`, `float32` → `float`,
/// `float64` → `double`, an optional `torch.` prefix is ignored).
///
/// FP8 names are not translated: LMCache 0.3.13 writes `fp8_e4m3`/`fp8_e5m2`,
/// 0.3.14 and later `fp8_e4m3fn`, `fp8_e4m3fnuz`, `fp8_e5m2`, `fp8_e5m2fnuz`.
/// Within `lmcache-0.3.13` both spellings are accepted: pass the one your
/// exact release writes.
pub fn lmcache_dtype_name(scheme: KeyScheme, dtype: &str) -> Result<&'static str, KeyError> {
    let d = dtype.trim();
    let d = d.strip_prefix("torch.").unwrap_or(d);
    let alias = match d {
        "float16" | "fp16" => "half",
        "bf16" => "bfloat16",
        "float32" | "fp32" => "float",
        "float64" => "double",
        other => other,
    };
    let mut valid: Vec<&'static str> = COMMON_DTYPES.to_vec();
    if scheme == KeyScheme::Lmcache0_3_13 {
        valid.extend(FP8_DTYPES_0_3_13);
        valid.extend(
            FP8_DTYPES_NEW
                .iter()
                .filter(|n| !FP8_DTYPES_0_3_13.contains(n)),
        );
    } else {
        valid.extend(FP8_DTYPES_NEW);
    }
    match alias.strip_prefix("float8_") {
        // torch.float8_* → the 0.3.14+ name; ambiguous inside lmcache-0.3.13.
        Some(rest) if scheme != KeyScheme::Lmcache0_3_13 => {
            let name = format!("fp8_{rest}");
            if let Some(n) = FP8_DTYPES_NEW.iter().find(|n| **n == name) {
                return Ok(n);
            }
        }
        Some(_) => {}
        None => {
            if let Some(n) = valid.iter().find(|n| **n == alias) {
                return Ok(n);
            }
        }
    }
    let hint = if d == "fp8" || d == "fp8_e4m3" || d.starts_with("float8") {
        match scheme {
            KeyScheme::Lmcache0_3_13 => {
                "FP8 names differ inside this scheme: 0.3.13 writes fp8_e4m3/fp8_e5m2, \
                 0.3.14+ writes fp8_e4m3fn/fp8_e4m3fnuz/fp8_e5m2/fp8_e5m2fnuz; give the exact one"
            }
            _ => "vLLM's fp8 KV cache is float8_e4m3fn on CUDA (fp8_e4m3fn) and float8_e4m3fnuz on ROCm (fp8_e4m3fnuz)",
        }
    } else {
        "use the KV cache dtype of the vLLM instance, e.g. bfloat16 for a bf16 model with --kv-cache-dtype auto"
    };
    Err(KeyError::UnknownDtype {
        dtype: dtype.to_string(),
        scheme,
        hint: hint.to_string(),
        valid: valid.join(", "),
    })
}

// ---------------------------------------------------------------------------
// Parameters and results

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
    fn validate(&self) -> Result<(&str, &'static str), KeyError> {
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

// ---------------------------------------------------------------------------
// Hashing

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

// ---------------------------------------------------------------------------
// Redis value header

/// LMCache's `MemoryFormat` numbers, as stored in [`RemoteMetadata::fmt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum MemoryFormat {
    Undefined = 0,
    /// `[2, layers, tokens, heads × head_dim]`: what naive serde stores for
    /// ordinary (non-MLA, non-layerwise) models.
    Kv2Ltd = 1,
    KvT2d = 2,
    Kv2Td = 3,
    Binary = 4,
    /// cachegen-serialised values.
    BinaryBuffer = 5,
    KvMlaFmt = 6,
}

/// LMCache's `DTYPE_TO_INT` code for a key dtype name (`None` if LMCache has
/// no code for it and cannot write a header for such a tensor).
pub fn metadata_dtype_code(dtype: &str) -> Option<i32> {
    Some(match dtype {
        "half" => 2, // torch.half is torch.float16; the writer emits 2
        "bfloat16" => 3,
        "float" => 4,
        "double" => 5,
        "uint8" => 6,
        "fp8_e4m3fn" | "fp8_e4m3" => 7,
        "fp8_e5m2" => 8,
        _ => return None,
    })
}

/// Bytes per element of a key dtype name.
pub fn dtype_itemsize(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "half" | "bfloat16" | "int16" => 2,
        "float" | "int32" => 4,
        "double" | "int64" => 8,
        "int8" | "uint8" | "bool" => 1,
        d if d.starts_with("fp8_") => 1,
        _ => return None,
    })
}

/// Length of the metadata header for one KV-cache group.
pub const METADATA_LEN: usize = 28;

/// LMCache's `RemoteMetadata`, the `<key>metadata` value: seven little-endian
/// int32 (`length, fmt, dtype, shape[0..4]`), 28 bytes for one KV-cache group
/// (0.3.12+ appends `dtype, shape` per extra group; readers ignore trailing
/// bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteMetadata {
    /// Byte length of the `<key>kv_bytes` value.
    pub length: i32,
    /// [`MemoryFormat`] number.
    pub fmt: i32,
    /// [`metadata_dtype_code`].
    pub dtype: i32,
    pub shape: [i32; 4],
}

impl RemoteMetadata {
    /// Header of a naive-serde KV chunk: format KV_2LTD, shape
    /// `[2, num_layers, num_tokens, hidden_per_rank]` where `hidden_per_rank` =
    /// KV heads on this rank × head dim.
    pub fn kv_2ltd(
        dtype: &str,
        num_layers: usize,
        num_tokens: usize,
        hidden_per_rank: usize,
    ) -> Result<Self, KeyError> {
        let code = metadata_dtype_code(dtype).ok_or_else(|| {
            KeyError::InvalidParams(format!("LMCache has no metadata code for dtype {dtype:?}"))
        })?;
        let item = dtype_itemsize(dtype).unwrap_or(1);
        let too_big = || KeyError::InvalidParams("chunk too large for an int32 length".into());
        let length = [2, num_layers, num_tokens, hidden_per_rank, item]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x))
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(too_big)?;
        let dim = |x: usize| i32::try_from(x).map_err(|_| too_big());
        Ok(Self {
            length,
            fmt: MemoryFormat::Kv2Ltd as i32,
            dtype: code,
            shape: [2, dim(num_layers)?, dim(num_tokens)?, dim(hidden_per_rank)?],
        })
    }

    pub fn to_bytes(&self) -> [u8; METADATA_LEN] {
        let mut out = [0u8; METADATA_LEN];
        let fields = [
            self.length,
            self.fmt,
            self.dtype,
            self.shape[0],
            self.shape[1],
            self.shape[2],
            self.shape[3],
        ];
        for (i, v) in fields.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parse the first 28 bytes (the first KV-cache group); `None` if shorter.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < METADATA_LEN {
            return None;
        }
        let f = |i: usize| i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
        Some(Self {
            length: f(0),
            fmt: f(1),
            dtype: f(2),
            shape: [f(3), f(4), f(5), f(6)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_seeds_like_python() {
        for ok in ["0", "42", "00", "4294967295"] {
            check_hash_seed(ok).unwrap();
        }
        for bad in ["", "random", "-1", "4294967296", "abc", " 1", "1.0"] {
            assert!(check_hash_seed(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_hash_seed("random"), Err(KeyError::HashSeedUnset));
        assert!(check_hash_seed("-1")
            .unwrap_err()
            .to_string()
            .contains("PYTHONHASHSEED"));
    }

    fn params(scheme: KeyScheme, seed: &str, chunk: usize, unfull: bool) -> KeyParams {
        KeyParams {
            hash_seed: Some(seed.to_string()),
            chunk_size: chunk,
            save_unfull_chunk: unfull,
            ..KeyParams::new(scheme, "llama3-70b")
        }
    }

    const TINY9: [u32; 9] = [128000, 1, 2, 3, 300, 70000, 128255, 9, 10];

    #[test]
    fn scheme_names_round_trip() {
        for s in KeyScheme::ALL {
            assert_eq!(s.name().parse::<KeyScheme>().unwrap(), s);
            assert_eq!(s.to_string(), s.name());
        }
    }

    #[test]
    fn exact_releases_map_to_families() {
        let cases = [
            ("lmcache-0.3.13", KeyScheme::Lmcache0_3_13),
            ("lmcache-0.3.14", KeyScheme::Lmcache0_3_13),
            ("0.3.15", KeyScheme::Lmcache0_3_13),
            ("lmcache-0.4.1", KeyScheme::Lmcache0_4),
            ("lmcache-0.4.5", KeyScheme::Lmcache0_4),
            ("lmcache-0.4.6", KeyScheme::Lmcache0_5),
            ("LMCache-0.4.7", KeyScheme::Lmcache0_5),
            ("lmcache-0.5.0", KeyScheme::Lmcache0_5),
            ("lmcache-0.5.6", KeyScheme::Lmcache0_5),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<KeyScheme>().unwrap(), want, "{s}");
        }
    }

    #[test]
    fn old_and_unknown_schemes_refused() {
        for s in [
            "lmcache-0.3.12",
            "lmcache-0.3.10.post2",
            "lmcache-0.3.9",
            "lmcache-0.2.1",
        ] {
            let e = s.parse::<KeyScheme>().unwrap_err();
            assert!(e.to_string().contains(">= 0.3.13"), "{s}: {e}");
        }
        for s in [
            "lmcache-0.5.7",
            "lmcache-0.6",
            "lmcache-1.0.0",
            "lmcache-0.4.0",
            "x",
        ] {
            assert!(s.parse::<KeyScheme>().is_err(), "{s}");
        }
        let e = "lmcache-0.3".parse::<KeyScheme>().unwrap_err();
        assert!(e.to_string().contains("ambiguous"), "{e}");
    }

    #[test]
    fn none_hash_per_scheme() {
        let p = params(KeyScheme::Lmcache0_3_13, "0", 4, false);
        assert_eq!(
            none_hash(&p).unwrap().to_hex(),
            "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e"
        );
        let p = params(KeyScheme::Lmcache0_5, "0", 4, false);
        assert_eq!(
            none_hash(&p).unwrap(),
            ChunkHash::Folded(5625442194607170974)
        );
        let p = params(KeyScheme::Lmcache0_5, "42", 4, false);
        assert_eq!(
            none_hash(&p).unwrap(),
            ChunkHash::Folded(11504140684455330398)
        );
    }

    #[test]
    fn worked_example_tiny9() {
        let keys = chunk_keys(&params(KeyScheme::Lmcache0_3_13, "0", 4, false), &TINY9).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[0].key,
            "llama3-70b@1@0@4215b2bef0fcba33d8e5b97cf3ef48ccf17e19e8f54fa865883ca067b17829fb@bfloat16"
        );
        assert_eq!((keys[1].start, keys[1].end), (4, 8));
        let keys = chunk_keys(&params(KeyScheme::Lmcache0_5, "0", 4, true), &TINY9).unwrap();
        let hashes: Vec<_> = keys.iter().map(|k| k.hash.to_hex()).collect();
        assert_eq!(
            hashes,
            ["9088bb0c494b4952", "1820b0cfce36a5be", "db6875ad6774cd88"]
        );
        assert_eq!((keys[2].start, keys[2].end), (8, 9));
    }

    #[test]
    fn spans() {
        assert!(chunk_spans(0, 4, true).is_empty());
        assert!(chunk_spans(3, 4, false).is_empty());
        assert_eq!(chunk_spans(3, 4, true), [(0, 3)]);
        assert_eq!(chunk_spans(8, 4, false), [(0, 4), (4, 8)]);
        assert_eq!(chunk_spans(9, 4, true), [(0, 4), (4, 8), (8, 9)]);
    }

    #[test]
    fn refusals() {
        let mut p = params(KeyScheme::Lmcache0_3_13, "0", 4, false);
        p.hash_seed = None;
        let e = chunk_keys(&p, &TINY9).unwrap_err();
        assert_eq!(e, KeyError::HashSeedUnset);
        assert!(e.to_string().contains("set PYTHONHASHSEED for vLLM"));
        assert!(e.to_string().contains("--hash-seed"));

        let mut p = params(KeyScheme::Lmcache0_3_13, "0", 4, false);
        p.hash_algorithm = "builtin".parse().unwrap();
        let e = chunk_keys(&p, &TINY9).unwrap_err();
        assert!(
            e.to_string()
                .contains("pre_caching_hash_algorithm: sha256_cbor"),
            "{e}"
        );
        for name in ["sha256", "xxhash_cbor", "nonsense"] {
            p.hash_algorithm = name.parse().unwrap();
            assert!(chunk_keys(&p, &TINY9).is_err());
        }

        let mut p = params(KeyScheme::Lmcache0_4, "0", 4, false);
        p.worker_id = 1;
        assert!(matches!(
            chunk_keys(&p, &TINY9),
            Err(KeyError::InvalidParams(_))
        ));
        p.worker_id = 0;
        p.chunk_size = 0;
        assert!(matches!(
            chunk_keys(&p, &TINY9),
            Err(KeyError::InvalidParams(_))
        ));
        p.chunk_size = 4;
        p.model = "a@b".into();
        assert!(matches!(
            chunk_keys(&p, &TINY9),
            Err(KeyError::InvalidParams(_))
        ));
    }

    #[test]
    fn dtype_names() {
        use KeyScheme::*;
        assert_eq!(
            lmcache_dtype_name(Lmcache0_4, "bfloat16").unwrap(),
            "bfloat16"
        );
        assert_eq!(
            lmcache_dtype_name(Lmcache0_4, "torch.float16").unwrap(),
            "half"
        );
        assert_eq!(lmcache_dtype_name(Lmcache0_4, "fp16").unwrap(), "half");
        assert_eq!(lmcache_dtype_name(Lmcache0_4, "float32").unwrap(), "float");
        assert_eq!(
            lmcache_dtype_name(Lmcache0_5, "float8_e4m3fn").unwrap(),
            "fp8_e4m3fn"
        );
        assert_eq!(
            lmcache_dtype_name(Lmcache0_5, "fp8_e5m2fnuz").unwrap(),
            "fp8_e5m2fnuz"
        );
        assert!(lmcache_dtype_name(Lmcache0_5, "fp8_e4m3").is_err());
        assert!(lmcache_dtype_name(Lmcache0_5, "fp8").is_err());
        assert_eq!(
            lmcache_dtype_name(Lmcache0_3_13, "fp8_e4m3").unwrap(),
            "fp8_e4m3"
        );
        assert_eq!(
            lmcache_dtype_name(Lmcache0_3_13, "fp8_e4m3fn").unwrap(),
            "fp8_e4m3fn"
        );
        let e = lmcache_dtype_name(Lmcache0_3_13, "float8_e4m3fn").unwrap_err();
        assert!(e.to_string().contains("give the exact one"), "{e}");
        assert!(lmcache_dtype_name(Lmcache0_3_13, "bogus").is_err());
    }

    #[test]
    fn all_ranks_share_hashes() {
        let mut p = params(KeyScheme::Lmcache0_5, "42", 4, true);
        p.world_size = 2;
        let ranks = chunk_keys_all_ranks(&p, &TINY9).unwrap();
        assert_eq!(ranks.len(), 2);
        for (a, b) in ranks[0].iter().zip(&ranks[1]) {
            assert_eq!(a.hash, b.hash);
            assert!(a.key.starts_with("llama3-70b@2@0@"));
            assert!(b.key.starts_with("llama3-70b@2@1@"));
        }
        p.worker_id = 1;
        assert_eq!(chunk_keys(&p, &TINY9).unwrap(), ranks[1]);
    }

    #[test]
    fn redis_names() {
        assert_eq!(
            redis_kv_bytes_key("m@1@0@ab@bfloat16"),
            "m@1@0@ab@bfloat16kv_bytes"
        );
        assert_eq!(
            redis_metadata_key("m@1@0@ab@bfloat16"),
            "m@1@0@ab@bfloat16metadata"
        );
    }

    #[test]
    fn metadata_header_matches_lmcache_bytes() {
        // LMCache's packing of a full 70B chunk, TP=1, bf16 (docs/lmcache-keys.md, "Values").
        let m = RemoteMetadata::kv_2ltd("bfloat16", 80, 256, 1024).unwrap();
        assert_eq!(m.length, 83_886_080);
        assert_eq!(
            hex::encode(m.to_bytes()),
            "00000005010000000300000002000000500000000001000000040000"
        );
        assert_eq!(RemoteMetadata::from_bytes(&m.to_bytes()), Some(m));
        let mut longer = m.to_bytes().to_vec();
        longer.extend_from_slice(&[9; 20]);
        assert_eq!(RemoteMetadata::from_bytes(&longer), Some(m));
        assert_eq!(RemoteMetadata::from_bytes(&longer[..27]), None);
        assert!(RemoteMetadata::kv_2ltd("int64", 1, 1, 1).is_err());
        assert!(RemoteMetadata::kv_2ltd("bfloat16", 80, 256, 1 << 20).is_err());
        assert_eq!(
            RemoteMetadata::kv_2ltd("half", 32, 4, 1024).unwrap().dtype,
            2
        );
    }
}
