//! LMCache key vectors produced by LMCache's own code.
//!
//! * `data/lmcache_key_vectors.json`: from the research harness that ran LMCache's own
//!   code (provenance in `lmcache/README.md`, "Vectors"), covering 0.3.10 – 0.5.6,
//!   builtin and sha256_cbor.
//! * `data/lmcache_generated_vectors.json`: from `tests/gen/gen_lmcache_vectors.py`
//!   run over every LMCache wheel 0.3.13 – 0.5.6 (see lmcache/README.md).

use cacheroute_lmcache::keys::{
    chunk_keys, chunk_keys_all_ranks, none_hash, ChunkHash, HashAlgorithm, KeyError, KeyParams,
    KeyScheme,
};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn tokens(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("token array")
        .iter()
        .map(|t| u32::try_from(t.as_u64().expect("token id")).expect("u32 token"))
        .collect()
}

/// none_hash in the JSON: hex string of a digest, or an int.
fn expect_none_hash(v: &Value) -> ChunkHash {
    match v {
        Value::String(s) => {
            let mut d = [0u8; 32];
            hex::decode_to_slice(s, &mut d).unwrap();
            ChunkHash::Digest(d)
        }
        Value::Number(n) => ChunkHash::Folded(n.as_u64().unwrap()),
        other => panic!("none_hash {other}"),
    }
}

fn params(case: &Value, scheme: KeyScheme, save_unfull: bool) -> KeyParams {
    KeyParams {
        scheme,
        hash_algorithm: case["pre_caching_hash_algorithm"]
            .as_str()
            .unwrap_or("sha256_cbor")
            .parse()
            .unwrap(),
        model: case
            .get("model_name")
            .or(case.get("model"))
            .and_then(Value::as_str)
            .unwrap()
            .to_string(),
        world_size: case["world_size"].as_u64().unwrap() as u32,
        worker_id: case["worker_id"].as_u64().unwrap() as u32,
        chunk_size: case["chunk_size"].as_u64().unwrap() as usize,
        dtype: case
            .get("kv_dtype")
            .or(case.get("dtype"))
            .and_then(Value::as_str)
            .unwrap()
            .to_string(),
        hash_seed: Some(
            case.get("PYTHONHASHSEED")
                .or(case.get("hash_seed"))
                .and_then(Value::as_str)
                .unwrap()
                .to_string(),
        ),
        save_unfull_chunk: save_unfull,
    }
}

/// `"0.3.13-0.3.15"` → both ends; `"0.4.1"` → itself.
fn versions(range: &str) -> Vec<String> {
    range.split('-').map(|v| format!("lmcache-{v}")).collect()
}

#[test]
fn research_vectors() {
    let doc = load("lmcache_key_vectors.json");
    let seqs = &doc["tokens"];
    let (mut checked_keys, mut checked_errors) = (0, 0);
    for case in doc["cases"].as_array().unwrap() {
        let toks = tokens(&seqs[case["tokens"].as_str().unwrap()]);
        let expected = case["keys_with_save_unfull_chunk_true"].as_array().unwrap();
        let chunk_size = case["chunk_size"].as_u64().unwrap() as usize;
        for version in versions(case["lmcache_versions"].as_str().unwrap()) {
            let scheme = match version.parse::<KeyScheme>() {
                Ok(s) => s,
                Err(e) => {
                    // 0.3.10-0.3.12: keys with vLLM 0.13 are `vllm@...` (builtin)
                    // or a TypeError (sha256_cbor); both are refused here.
                    assert!(
                        matches!(e, KeyError::UnsupportedScheme { .. }),
                        "{version}: {e}"
                    );
                    assert!(
                        version.as_str() <= "lmcache-0.3.12",
                        "{version} refused: {e}"
                    );
                    checked_errors += 1;
                    continue;
                }
            };
            for save_unfull in [true, false] {
                let p = params(case, scheme, save_unfull);
                let got = chunk_keys(&p, &toks);
                if p.hash_algorithm != HashAlgorithm::Sha256Cbor {
                    let e = got.unwrap_err();
                    assert!(
                        e.to_string().contains("sha256_cbor"),
                        "{version}: builtin must be refused with a hint, got {e}"
                    );
                    checked_errors += 1;
                    continue;
                }
                let got = got.unwrap_or_else(|e| panic!("{version}: {e}"));
                let want: Vec<&Value> = expected
                    .iter()
                    .filter(|k| {
                        let len = k["end"].as_u64().unwrap() - k["start"].as_u64().unwrap();
                        save_unfull || len as usize == chunk_size
                    })
                    .collect();
                assert_eq!(got.len(), want.len(), "{version} {case}");
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.key, w["key"].as_str().unwrap(), "{version} {case}");
                    assert_eq!(g.start as u64, w["start"].as_u64().unwrap());
                    assert_eq!(g.end as u64, w["end"].as_u64().unwrap());
                    checked_keys += 1;
                }
                assert_eq!(none_hash(&p).unwrap(), expect_none_hash(&case["none_hash"]));
            }
        }
    }
    assert!(checked_keys >= 60, "only {checked_keys} keys checked");
    assert!(
        checked_errors >= 16,
        "only {checked_errors} refusals checked"
    );
}

#[test]
fn generated_vectors() {
    let doc = load("lmcache_generated_vectors.json");
    assert_eq!(doc["hash_algorithm"], "sha256_cbor");
    let seqs = &doc["sequences"];
    let cases = doc["cases"].as_array().unwrap();
    let groups = doc["groups"].as_array().unwrap();
    let mut schemes_seen = Vec::new();
    let mut checked = 0;
    for group in groups {
        let versions: Vec<String> = group["lmcache_versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| format!("lmcache-{}", v.as_str().unwrap()))
            .collect();
        let scheme: KeyScheme = versions[0].parse().unwrap();
        for v in &versions {
            assert_eq!(
                v.parse::<KeyScheme>().unwrap(),
                scheme,
                "{v} is in the group of {scheme}"
            );
        }
        assert!(
            !schemes_seen.contains(&scheme),
            "two groups map to {scheme}"
        );
        schemes_seen.push(scheme);

        let results = group["results"].as_array().unwrap();
        assert_eq!(results.len(), cases.len());
        for (case, result) in cases.iter().zip(results) {
            let toks = tokens(&seqs[case["tokens"].as_str().unwrap()]);
            let p = params(case, scheme, case["save_unfull_chunk"].as_bool().unwrap());
            let got = chunk_keys(&p, &toks).unwrap();
            let want = result["chunks"].as_array().unwrap();
            let got_view: Vec<(u64, u64, &str)> = got
                .iter()
                .map(|k| (k.start as u64, k.end as u64, k.key.as_str()))
                .collect();
            let want_view: Vec<(u64, u64, &str)> = want
                .iter()
                .map(|k| {
                    (
                        k["start"].as_u64().unwrap(),
                        k["end"].as_u64().unwrap(),
                        k["key"].as_str().unwrap(),
                    )
                })
                .collect();
            assert_eq!(got_view, want_view, "{scheme} case {case}");
            assert_eq!(
                none_hash(&p).unwrap(),
                expect_none_hash(&result["none_hash"])
            );
            // Every rank's keys share the hash; the requested rank matches.
            let ranks = chunk_keys_all_ranks(&p, &toks).unwrap();
            assert_eq!(ranks[p.worker_id as usize], got);
            checked += got.len();
        }
    }
    assert_eq!(
        schemes_seen.len(),
        KeyScheme::ALL.len(),
        "a scheme has no vectors"
    );
    assert!(checked >= 300, "only {checked} keys checked");
}

/// The generated file must exercise the edges the brief asks for.
#[test]
fn generated_vectors_cover_edges() {
    let doc = load("lmcache_generated_vectors.json");
    let cases = doc["cases"].as_array().unwrap();
    let has = |f: &dyn Fn(&Value) -> bool| cases.iter().any(f);
    for seq in ["empty", "one_token"] {
        for cs in [4, 256] {
            assert!(
                has(&|c| c["tokens"] == seq && c["chunk_size"] == cs),
                "{seq} {cs}"
            );
        }
    }
    for seed in ["0", "42", "12345"] {
        assert!(has(&|c| c["hash_seed"] == seed));
    }
    for unfull in [true, false] {
        assert!(has(&|c| c["save_unfull_chunk"] == unfull));
    }
    assert!(has(&|c| c["dtype"] == "half"));
    assert!(has(&|c| c["world_size"] == 2 && c["worker_id"] == 1));
    let all: Vec<u64> = doc["sequences"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|s| s.as_array().unwrap().iter().map(|t| t.as_u64().unwrap()))
        .collect();
    for edge in [23, 24, 255, 256, 65535, 65536, 128255] {
        assert!(all.contains(&edge), "token {edge} missing");
    }
}

#[test]
fn unset_seed_and_builtin_are_refused_for_every_scheme() {
    for scheme in KeyScheme::ALL {
        let mut p = KeyParams::new(scheme, "llama3-70b");
        let e = chunk_keys(&p, &[128000, 1, 2, 3]).unwrap_err();
        assert_eq!(e, KeyError::HashSeedUnset);
        p.hash_seed = Some("0".into());
        p.hash_algorithm = HashAlgorithm::Builtin;
        let e = chunk_keys(&p, &[128000, 1, 2, 3]).unwrap_err();
        assert!(e
            .to_string()
            .contains("set pre_caching_hash_algorithm: sha256_cbor"));
    }
}
