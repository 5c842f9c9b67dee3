//! Key schemes (the LMCache releases whose key rules are reproduced), hash algorithms,
//! and LMCache's dtype names per scheme.

use std::fmt;
use std::str::FromStr;

use super::KeyError;

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
    pub(super) fn extra_keys_is_empty_tuple(self) -> bool {
        !matches!(self, KeyScheme::Lmcache0_3_13)
    }

    /// Whether digests are folded to `u64` before chaining and rendering.
    pub(super) fn folds_to_u64(self) -> bool {
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

    pub(super) fn check(&self) -> Result<(), KeyError> {
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
