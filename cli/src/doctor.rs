//! `cacheroute doctor`: will an engine's LMCache keys match the KDN's?
//!
//! A KV injection only helps when the chunk keys the KDN writes are the keys
//! the engine's LMCache looks up; any difference (model string, world size,
//! dtype, chunk size, hash seed, key scheme, hash algorithm) silently turns
//! every injection into a miss. The doctor reads the engine's LMCache YAML, its
//! `/v1/models` (and `/metrics` where reachable) and the KDN's `/v1/models`
//! (or flags), prints one line per check, and exits non-zero on a mismatch.

use anyhow::{bail, Context, Result};
use cacheroute_kdn::keys::{hash_seed_digest, KeyScheme};
use clap::Args;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The engine's LMCache YAML (what LMCACHE_CONFIG_FILE points at).
    #[arg(long, value_name = "FILE")]
    pub lmcache_config: PathBuf,
    /// The engine's base URL (vLLM's OpenAI server, e.g. http://127.0.0.1:8000).
    #[arg(long, value_name = "URL")]
    pub engine: String,
    /// The served model to check (default: the engine's first).
    #[arg(long)]
    pub model: Option<String>,
    /// The KDN's base URL: its scheme is read from GET /v1/models.
    #[arg(long, value_name = "URL")]
    pub kdn: Option<String>,
    /// The KDN side without a KDN (or overriding it): vLLM --model string in its keys.
    #[arg(long)]
    pub kdn_lmcache_model: Option<String>,
    /// KDN key scheme (e.g. lmcache-0.3.15).
    #[arg(long)]
    pub kdn_scheme: Option<String>,
    #[arg(long)]
    pub kdn_chunk_size: Option<u64>,
    #[arg(long)]
    pub kdn_dtype: Option<String>,
    #[arg(long)]
    pub kdn_world_size: Option<u64>,
    /// The KDN's hash_seed (its config's), when it is not read from the KDN.
    #[arg(long)]
    pub kdn_hash_seed: Option<String>,
    /// The engine's PYTHONHASHSEED (default: this environment's PYTHONHASHSEED).
    #[arg(long, env = "PYTHONHASHSEED")]
    pub engine_hash_seed: Option<String>,
    /// The engine's tensor × pipeline parallel size.
    #[arg(long)]
    pub engine_world_size: Option<u64>,
    /// The engine's KV dtype as LMCache keys name it (bfloat16, float16, …).
    #[arg(long)]
    pub engine_dtype: Option<String>,
    /// The engine's LMCache release (e.g. 0.3.15).
    #[arg(long)]
    pub lmcache_version: Option<String>,
}

/// One side's key settings; `None`: not known.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Side {
    pub model: Option<String>,
    pub scheme: Option<String>,
    pub chunk_size: Option<u64>,
    pub dtype: Option<String>,
    pub world_size: Option<u64>,
    pub hash_seed_digest: Option<String>,
}

/// What the engine's LMCache YAML says (LMCache's defaults where it is silent).
#[derive(Debug, Clone, PartialEq)]
pub struct LmCacheYaml {
    pub chunk_size: u64,
    pub save_unfull_chunk: bool,
    pub hash_algorithm: String,
    pub remote_url: Option<String>,
    pub remote_serde: String,
}

impl LmCacheYaml {
    pub fn parse(text: &str) -> Result<LmCacheYaml> {
        let v: serde_yaml::Value = serde_yaml::from_str(text).context("not YAML")?;
        let map = v
            .as_mapping()
            .context("the LMCache config is not a YAML mapping")?;
        let get = |k: &str| map.get(serde_yaml::Value::from(k));
        let chunk_size = match get("chunk_size") {
            None => 256,
            Some(c) => c
                .as_u64()
                .filter(|&n| n > 0)
                .context("chunk_size: expected a positive integer")?,
        };
        let save_unfull_chunk = match get("save_unfull_chunk") {
            None => false,
            Some(b) => b
                .as_bool()
                .context("save_unfull_chunk: expected true or false")?,
        };
        let text_of = |k: &str| get(k).and_then(|v| v.as_str()).map(str::to_string);
        Ok(LmCacheYaml {
            chunk_size,
            save_unfull_chunk,
            hash_algorithm: text_of("pre_caching_hash_algorithm")
                .unwrap_or_else(|| "builtin".into()),
            remote_url: text_of("remote_url"),
            remote_serde: text_of("remote_serde").unwrap_or_else(|| "naive".into()),
        })
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Mismatch,
    /// One side is not known: not checked.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Mismatch => "FAIL",
            Verdict::Unknown => "skip",
        };
        write!(f, "[{tag}] {}: {}", self.name, self.detail)
    }
}

fn compare<T: PartialEq + std::fmt::Display>(
    name: &'static str,
    engine: Option<T>,
    kdn: Option<T>,
    hint: &str,
) -> Check {
    let (verdict, detail) = match (&engine, &kdn) {
        (Some(e), Some(k)) if e == k => (Verdict::Ok, format!("engine {e} = KDN {k}")),
        (Some(e), Some(k)) => (Verdict::Mismatch, format!("engine {e} ≠ KDN {k}")),
        (None, Some(k)) => (
            Verdict::Unknown,
            format!("engine's unknown ({hint}); KDN {k}"),
        ),
        (Some(e), None) => (Verdict::Unknown, format!("engine {e}; KDN's unknown")),
        (None, None) => (Verdict::Unknown, "unknown on both sides".to_string()),
    };
    Check {
        name,
        verdict,
        detail,
    }
}

/// dtype names as LMCache keys spell them.
fn canonical_dtype(d: &str) -> String {
    match d.trim().to_ascii_lowercase().as_str() {
        "bf16" | "torch.bfloat16" => "bfloat16".into(),
        "fp16" | "half" | "float16" | "torch.float16" => "half".into(),
        "fp32" | "float32" | "torch.float32" => "float".into(),
        other => other.into(),
    }
}

/// Every check, engine against KDN; the YAML's own requirements too.
pub fn checks(yaml: &LmCacheYaml, engine: &Side, kdn: &Side) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(compare(
        "model",
        engine.model.as_deref().map(|m| format!("{m:?}")),
        kdn.model.as_deref().map(|m| format!("{m:?}")),
        "its /v1/models gave no root",
    ));
    // The engine's chunk size is the YAML's; a running sim also says its own.
    let mut chunk = compare(
        "chunk size",
        Some(yaml.chunk_size),
        kdn.chunk_size,
        "LMCache YAML",
    );
    if let Some(running) = engine.chunk_size.filter(|&c| c != yaml.chunk_size) {
        chunk.verdict = Verdict::Mismatch;
        chunk.detail = format!(
            "the engine runs chunk_size {running}, not its YAML's {}",
            yaml.chunk_size
        );
    }
    out.push(chunk);
    out.push(compare(
        "world size",
        engine.world_size,
        kdn.world_size,
        "give --engine-world-size",
    ));
    out.push(compare(
        "dtype",
        engine.dtype.as_deref().map(canonical_dtype),
        kdn.dtype.as_deref().map(canonical_dtype),
        "give --engine-dtype",
    ));
    let mut seed = compare(
        "hash seed",
        engine.hash_seed_digest.clone(),
        kdn.hash_seed_digest.clone(),
        "give --engine-hash-seed or export PYTHONHASHSEED as the engine has it",
    );
    seed.detail = format!("{} (digests of PYTHONHASHSEED)", seed.detail);
    out.push(seed);
    let scheme_of = |s: &Option<String>| {
        s.as_deref().map(|v| match v.parse::<KeyScheme>() {
            Ok(k) => k.name().to_string(),
            Err(_) => format!("unsupported {v}"),
        })
    };
    out.push(compare(
        "scheme version",
        scheme_of(&engine.scheme),
        scheme_of(&kdn.scheme),
        "give --lmcache-version",
    ));
    out.push(Check {
        name: "hash algorithm",
        verdict: if yaml.hash_algorithm == "sha256_cbor" {
            Verdict::Ok
        } else {
            Verdict::Mismatch
        },
        detail: match yaml.hash_algorithm.as_str() {
            "sha256_cbor" => "pre_caching_hash_algorithm sha256_cbor".into(),
            other => format!(
                "pre_caching_hash_algorithm {other}: only sha256_cbor gives keys the KDN can \
                 compute; set it in the YAML"
            ),
        },
    });
    let remote = match (&yaml.remote_url, yaml.remote_serde.as_str()) {
        (None, _) => (
            Verdict::Mismatch,
            "no remote_url: the engine never reads the store the KDN injects into".to_string(),
        ),
        (Some(u), "naive") => (Verdict::Ok, format!("remote_url {u}, remote_serde naive")),
        (Some(u), serde) => (
            Verdict::Mismatch,
            format!("remote_url {u} with remote_serde {serde}: the KDN copies naive blobs only"),
        ),
    };
    out.push(Check {
        name: "remote store",
        verdict: remote.0,
        detail: remote.1,
    });
    out.push(Check {
        name: "save_unfull_chunk",
        verdict: Verdict::Ok,
        detail: format!(
            "{} (full chunks key the same either way; a trailing partial chunk is never injected)",
            yaml.save_unfull_chunk
        ),
    });
    out
}

/// `name{a="x",b="y"} 1` lines of `family` in a Prometheus text exposition:
/// the labels of the first.
fn info_labels(text: &str, family: &str) -> Option<HashMap<String, String>> {
    let line = text
        .lines()
        .find(|l| l.starts_with(family) && l[family.len()..].starts_with('{'))?;
    let body = &line[family.len() + 1..line.rfind('}')?];
    let mut out = HashMap::new();
    let mut rest = body;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => {
                    end = Some(eq + 2 + i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key, value);
        match end {
            Some(e) => rest = &rest[e..],
            None => break,
        }
    }
    Some(out)
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value> {
    let resp = http
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !resp.status().is_success() {
        bail!("GET {url}: HTTP {}", resp.status());
    }
    resp.json()
        .await
        .with_context(|| format!("GET {url}: not JSON"))
}

fn find_model<'a>(list: &'a Value, id: Option<&str>) -> Option<&'a Value> {
    let data = list.get("data")?.as_array()?;
    match id {
        Some(id) => data
            .iter()
            .find(|m| m.get("id").and_then(Value::as_str) == Some(id)),
        None => data.first(),
    }
}

/// The engine's side: its model card, its `/metrics` (a sim's LMCache info; vLLM's
/// cache dtype), then the flags, which win.
async fn engine_side(
    http: &reqwest::Client,
    args: &DoctorArgs,
) -> Result<(String, Side, Vec<String>)> {
    let base = args.engine.trim_end_matches('/');
    let mut notes = Vec::new();
    let models = get_json(http, &format!("{base}/v1/models")).await?;
    let card = find_model(&models, args.model.as_deref()).with_context(|| match &args.model {
        Some(m) => format!("the engine at {base} does not serve {m}"),
        None => format!("the engine at {base} lists no model"),
    })?;
    let served = card
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut side = Side {
        model: card.get("root").and_then(Value::as_str).map(str::to_string),
        ..Side::default()
    };
    match http.get(format!("{base}/metrics")).send().await {
        Ok(r) if r.status().is_success() => {
            let text = r.text().await.unwrap_or_default();
            if let Some(info) = info_labels(&text, "cacheroute_sim_lmcache_info") {
                let num = |k: &str| info.get(k).and_then(|v| v.parse().ok());
                side.scheme = info.get("scheme").cloned();
                side.chunk_size = num("chunk_size");
                side.dtype = info.get("dtype").cloned();
                side.world_size = num("world_size");
                side.hash_seed_digest = info
                    .get("hash_seed_digest")
                    .cloned()
                    .filter(|s| !s.is_empty());
                if let Some(m) = info.get("model") {
                    side.model = Some(m.clone());
                }
            } else if let Some(info) = info_labels(&text, "vllm:cache_config_info") {
                side.dtype = info
                    .get("cache_dtype")
                    .filter(|d| d.as_str() != "auto")
                    .cloned();
            }
        }
        _ => notes.push(format!(
            "{base}/metrics not reachable: settings from flags only"
        )),
    }
    if let Some(s) = &args.engine_hash_seed {
        side.hash_seed_digest = Some(hash_seed_digest(s));
    }
    if let Some(w) = args.engine_world_size {
        side.world_size = Some(w);
    }
    if let Some(d) = &args.engine_dtype {
        side.dtype = Some(d.clone());
    }
    if let Some(v) = &args.lmcache_version {
        side.scheme = Some(v.clone());
    }
    Ok((served, side, notes))
}

/// The KDN's side for `served`: its `/v1/models` entry, then the flags.
async fn kdn_side(http: &reqwest::Client, args: &DoctorArgs, served: &str) -> Result<Side> {
    let mut side = Side::default();
    if let Some(base) = &args.kdn {
        let base = base.trim_end_matches('/');
        let list = get_json(http, &format!("{base}/v1/models")).await?;
        let m = find_model(&list, Some(served))
            .with_context(|| format!("the KDN at {base} has no model named {served}"))?;
        let text = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
        side = Side {
            model: text("lmcache_model"),
            scheme: text("scheme"),
            chunk_size: m.get("chunk_size").and_then(Value::as_u64),
            dtype: text("dtype"),
            world_size: m.get("world_size").and_then(Value::as_u64),
            hash_seed_digest: text("hash_seed_digest"),
        };
    }
    if let Some(v) = &args.kdn_lmcache_model {
        side.model = Some(v.clone());
    }
    if let Some(v) = &args.kdn_scheme {
        side.scheme = Some(v.clone());
    }
    if let Some(v) = args.kdn_chunk_size {
        side.chunk_size = Some(v);
    }
    if let Some(v) = &args.kdn_dtype {
        side.dtype = Some(v.clone());
    }
    if let Some(v) = args.kdn_world_size {
        side.world_size = Some(v);
    }
    if let Some(v) = &args.kdn_hash_seed {
        side.hash_seed_digest = Some(hash_seed_digest(v));
    }
    Ok(side)
}

/// Run the checks and print them; `Ok(false)` on a mismatch.
pub async fn run(args: DoctorArgs) -> Result<bool> {
    if args.kdn.is_none() && args.kdn_lmcache_model.is_none() && args.kdn_scheme.is_none() {
        bail!("give --kdn URL, or the KDN's settings as --kdn-* flags");
    }
    let text = std::fs::read_to_string(&args.lmcache_config)
        .with_context(|| format!("reading {}", args.lmcache_config.display()))?;
    let yaml =
        LmCacheYaml::parse(&text).with_context(|| format!("{}", args.lmcache_config.display()))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let (served, engine, notes) = engine_side(&http, &args).await?;
    let kdn = kdn_side(&http, &args, &served).await?;
    println!("model {served} at {}:", args.engine.trim_end_matches('/'));
    for n in notes {
        println!("  note: {n}");
    }
    let all = checks(&yaml, &engine, &kdn);
    for c in &all {
        println!("{c}");
    }
    let bad = all
        .iter()
        .filter(|c| c.verdict == Verdict::Mismatch)
        .count();
    if bad == 0 {
        println!("keys will match");
    } else {
        println!("{bad} mismatch(es): every KV injection for this engine would miss");
    }
    Ok(bad == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side() -> Side {
        Side {
            model: Some("meta-llama/Meta-Llama-3-8B-Instruct".into()),
            scheme: Some("lmcache-0.3.15".into()),
            chunk_size: Some(256),
            dtype: Some("bfloat16".into()),
            world_size: Some(1),
            hash_seed_digest: Some(hash_seed_digest("0")),
        }
    }

    fn yaml() -> LmCacheYaml {
        LmCacheYaml::parse(
            "chunk_size: 256\nremote_url: redis://r:6379\npre_caching_hash_algorithm: sha256_cbor\n",
        )
        .unwrap()
    }

    #[test]
    fn matching_sides_pass_every_check() {
        let all = checks(&yaml(), &side(), &side());
        assert!(all.iter().all(|c| c.verdict == Verdict::Ok), "{all:?}");
    }

    #[test]
    fn each_difference_is_one_failed_line() {
        let mut kdn = side();
        kdn.world_size = Some(8);
        kdn.dtype = Some("fp8_e4m3fn".into());
        kdn.hash_seed_digest = Some(hash_seed_digest("1"));
        let all = checks(&yaml(), &side(), &kdn);
        let failed: Vec<&str> = all
            .iter()
            .filter(|c| c.verdict == Verdict::Mismatch)
            .map(|c| c.name)
            .collect();
        assert_eq!(failed, ["world size", "dtype", "hash seed"]);
        // 0.3.13 and 0.3.15 key alike; 0.5 does not.
        let mut kdn = side();
        kdn.scheme = Some("0.3.13".into());
        assert!(checks(&yaml(), &side(), &kdn)
            .iter()
            .all(|c| c.verdict == Verdict::Ok));
        kdn.scheme = Some("lmcache-0.5".into());
        assert!(checks(&yaml(), &side(), &kdn)
            .iter()
            .any(|c| c.name == "scheme version" && c.verdict == Verdict::Mismatch));
    }

    #[test]
    fn the_yaml_defaults_and_requirements() {
        let y = LmCacheYaml::parse("local_cpu: true\n").unwrap();
        assert_eq!(y.chunk_size, 256);
        assert_eq!(y.hash_algorithm, "builtin");
        let all = checks(&y, &side(), &side());
        let failed: Vec<&str> = all
            .iter()
            .filter(|c| c.verdict == Verdict::Mismatch)
            .map(|c| c.name)
            .collect();
        assert_eq!(failed, ["hash algorithm", "remote store"]);
        assert!(LmCacheYaml::parse("chunk_size: -3\n").is_err());
        assert!(LmCacheYaml::parse("- a list\n").is_err());
    }

    #[test]
    fn unknown_engine_settings_are_skipped_not_failed() {
        let engine = Side {
            model: side().model,
            ..Side::default()
        };
        let all = checks(&yaml(), &engine, &side());
        assert!(
            all.iter().all(|c| c.verdict != Verdict::Mismatch),
            "{all:?}"
        );
        assert!(all.iter().any(|c| c.verdict == Verdict::Unknown));
    }

    #[test]
    fn info_labels_are_read_from_prometheus_text() {
        let text = "# HELP x\nfoo_info{a=\"1\",b=\"x\\\"y\"} 1\nfoo_total 3\n";
        let l = info_labels(text, "foo_info").unwrap();
        assert_eq!(l["a"], "1");
        assert_eq!(l["b"], "x\"y");
        assert!(info_labels(text, "bar_info").is_none());
    }
}
