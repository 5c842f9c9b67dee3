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
//!
//! This module holds the Redis entry names and [`KeyError`]; `scheme` holds the key
//! schemes (LMCache releases), hash algorithms and dtype names, `params` the key
//! parameters and results, `chain` the hash chain that turns token ids into keys, and
//! `metadata` the header LMCache writes before a chunk's bytes in Redis.

mod chain;
mod metadata;
mod params;
mod scheme;

pub use chain::{chunk_keys, chunk_keys_all_ranks, chunk_spans, none_hash};
pub use metadata::{
    dtype_itemsize, metadata_dtype_code, MemoryFormat, RemoteMetadata, METADATA_LEN,
};
pub use params::{hash_seed_digest, ChunkHash, ChunkKey, KeyParams};
pub use scheme::{lmcache_dtype_name, HashAlgorithm, KeyScheme};

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
}
