//! KDN configuration (`conf/kdn.example.toml` documents every key).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cacheroute_decisions::prompt::ChatTemplate;
use serde::{Deserialize, Serialize};

use crate::keys::{chunk_keys, HashAlgorithm, KeyParams, KeyScheme};
use crate::tokenizer::TokenizerChoice;

/// The whole KDN configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdnConfig {
    #[serde(default)]
    pub kdn: KdnSection,
    /// Models knowledge is registered for.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// Named injection targets (instance KV stores).
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
}

/// `[kdn]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KdnSection {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Where the knowledge registry lives: `redis://host:port[/db]` or `memory://NAME`
    /// (in-process; lost with the process).
    pub registry: String,
    /// Prefix of the registry's Redis keys.
    pub registry_prefix: String,
    /// The KDN's own KV block store (producers' LMCache writes here; injections read
    /// from here): `redis://…` or `memory://NAME`.
    pub store: String,
    /// Largest knowledge text accepted, in bytes (UTF-8, after normalisation).
    pub max_text_bytes: usize,
    /// Largest bulk (JSONL) registration body, in bytes.
    pub max_bulk_bytes: usize,
    /// Block transfers (block × model × target) copied at the same time.
    pub max_concurrent_injections: usize,
    /// Block transfers allowed to wait for a worker; more are refused (HTTP 503).
    pub max_queue: usize,
    /// Chunks (keys) per pipelined read / write batch of an injection.
    pub batch_chunks: usize,
    /// Warm-ups (producer prefills) running at the same time.
    pub max_concurrent_warmups: usize,
    /// Warm-ups waiting for a slot; more are `deferred` (warmed when there is room).
    pub max_pending_warmups: usize,
    /// Largest share of a producer's time warm-ups may take (0 < share ≤ 1): after a
    /// warm-up prefill of d seconds the producer gets d × (1 − share) / share seconds
    /// with no warm-up from this KDN.
    pub warmup_max_share: f64,
    /// Blocks registered per second, sustained (token bucket over register and bulk;
    /// past it: HTTP 429 with Retry-After). 0: no limit.
    pub max_registrations_per_s: f64,
    /// Blocks the registration bucket holds (the largest burst, and the largest bulk).
    pub registration_burst: usize,
    /// Most blocks the registry holds; registrations past it get HTTP 507. 0: no bound.
    pub max_blocks: usize,
    /// Limit for one warm-up request to a producer, in seconds.
    pub warmup_timeout_s: f64,
    /// After the producer answers, how long to wait for all chunk keys to appear in the
    /// KDN store, in seconds.
    pub warmup_verify_s: f64,
    /// Finished injection jobs kept for `GET /v1/inject/{job}`.
    pub job_history: usize,
    /// JSONL files registered at start-up (blocks already registered are skipped).
    pub preload: Vec<PathBuf>,
    /// This KDN's id in gateways and `/v1/knowledge/snapshot` (none: `kdn@<listen>`).
    pub id: Option<String>,
    /// Control-plane base URLs of the CacheRoute gateways to register with.
    pub gateways: Vec<String>,
    /// Bearer token sent to the gateways (empty: none).
    pub gateway_token: String,
    /// Bearer token every write (register, delete, warm, inject) must carry; reads stay
    /// open. Empty: none (only on a loopback listen address, unless `insecure`). The
    /// environment's `CACHEROUTE_KDN_TOKEN` fills it when the file does not.
    pub token: String,
    /// Serve writes without a token on a non-loopback address (never the default).
    pub insecure: bool,
    /// Let `POST /v1/inject` name a store URL instead of a configured `[[targets]]` name.
    /// Off by default: whoever can inject could otherwise write into any store.
    pub allow_url_targets: bool,
    /// The URL gateways use to reach this KDN (none: `http://<listen>`).
    pub advertise_url: Option<String>,
    /// Seconds between two registrations with each gateway (the entry lives 3×).
    pub heartbeat_s: f64,
}

impl KdnSection {
    /// The configured id, or `kdn@<listen>`.
    pub fn id_or_default(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("kdn@{}", self.listen))
    }

    /// The configured advertised URL, or `http://<listen>`.
    pub fn advertise_url_or_default(&self) -> String {
        self.advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}

impl Default for KdnSection {
    fn default() -> Self {
        KdnSection {
            listen: "127.0.0.1:9101".parse().expect("valid address"),
            registry: "redis://127.0.0.1:6379/0".into(),
            registry_prefix: "cacheroute:kdn:".into(),
            store: "redis://127.0.0.1:6379/0".into(),
            max_text_bytes: 1 << 20,
            max_bulk_bytes: 64 << 20,
            max_concurrent_injections: 4,
            max_queue: 256,
            batch_chunks: 4,
            max_concurrent_warmups: 2,
            max_pending_warmups: 256,
            warmup_max_share: 0.5,
            max_registrations_per_s: 100.0,
            registration_burst: 1000,
            max_blocks: 100_000,
            warmup_timeout_s: 600.0,
            warmup_verify_s: 10.0,
            job_history: 1000,
            preload: Vec::new(),
            id: None,
            gateways: Vec::new(),
            gateway_token: String::new(),
            token: String::new(),
            insecure: false,
            allow_url_targets: false,
            advertise_url: None,
            heartbeat_s: 2.0,
        }
    }
}

fn default_template() -> ChatTemplate {
    ChatTemplate::Llama3
}
fn default_vocab_size() -> u32 {
    128256
}
fn default_scheme() -> String {
    "lmcache-0.3.15".into()
}
fn default_chunk_size() -> usize {
    256
}
fn default_dtype() -> String {
    "bfloat16".into()
}
fn default_world_size() -> u32 {
    1
}
fn default_hash_algorithm() -> String {
    "sha256_cbor".into()
}

/// `[[models]]`: one served model, with everything that determines its prefix tokens and
/// LMCache keys. Every field must match the vLLM + LMCache instances that will read the KV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Served model name (what clients put in `"model"`).
    pub name: String,
    /// vLLM's `--model` argument exactly as given (the model field of LMCache keys).
    pub lmcache_model: String,
    /// Chat template family the prompt layout follows.
    #[serde(default = "default_template")]
    pub template: ChatTemplate,
    /// The model's tokenizer: `auto` (default: the embedded exact Llama-3 tokenizer when
    /// `name` or `lmcache_model` looks like Llama-3, else the deterministic approximation,
    /// as `cacheroute sim` does), `approx`, or the path of a HuggingFace `tokenizer.json`.
    #[serde(default)]
    pub tokenizer: TokenizerChoice,
    /// Vocabulary size of the approximation (ignored by exact tokenizers).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: u32,
    /// LMCache key scheme: an exact release (`lmcache-0.3.15`) or a family.
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// LMCache `pre_caching_hash_algorithm` (only `sha256_cbor` is reproducible).
    #[serde(default = "default_hash_algorithm")]
    pub hash_algorithm: String,
    /// LMCache `chunk_size`.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: usize,
    /// KV cache dtype as LMCache writes it into keys (`bfloat16`, `half`, …).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Tensor × pipeline parallel size of the instances (one key per rank per chunk).
    #[serde(default = "default_world_size")]
    pub world_size: u32,
    /// The exact `PYTHONHASHSEED` string of every vLLM process (required).
    pub hash_seed: String,
    /// Real KV size of one token, all ranks together (2 × layers × kv_heads × head_dim ×
    /// dtype bytes; 131072 for Llama-3-8B bf16). Sizes and link shaping use it, even when
    /// the stored blobs are scaled down.
    pub kv_bytes_per_token: u64,
    /// Base URL of the producer instance (vLLM + LMCache writing into the KDN store)
    /// that warms knowledge up; none: blocks stay text-only unless their KV is already
    /// in the store.
    #[serde(default)]
    pub producer: Option<String>,
}

impl ModelConfig {
    /// The LMCache key parameters (rank 0).
    pub fn key_params(&self) -> Result<KeyParams> {
        let scheme: KeyScheme = self
            .scheme
            .parse()
            .with_context(|| format!("model {}: scheme", self.name))?;
        let hash_algorithm: HashAlgorithm = self
            .hash_algorithm
            .parse()
            .unwrap_or_else(|never| match never {});
        Ok(KeyParams {
            scheme,
            hash_algorithm,
            model: self.lmcache_model.clone(),
            world_size: self.world_size,
            worker_id: 0,
            chunk_size: self.chunk_size,
            dtype: self.dtype.clone(),
            hash_seed: Some(self.hash_seed.clone()),
            save_unfull_chunk: false,
        })
    }

    /// Logical (real) KV bytes of one chunk key (one rank's share of one chunk).
    pub fn logical_bytes_per_key(&self) -> u64 {
        self.chunk_size as u64 * self.kv_bytes_per_token / self.world_size.max(1) as u64
    }
}

/// `[[targets]]`: a named injection target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Name used in inject requests (`"target": "<name>"`).
    pub name: String,
    /// The instance's LMCache store: `redis://…` or `memory://NAME`.
    pub store: String,
    /// Emulated link speed in Gb/s: injections into this target are paced by a token
    /// bucket on logical KV bytes (none: as fast as the stores go).
    #[serde(default)]
    pub link_gbps: Option<f64>,
}

/// Whether `url` names a store [`crate::store::open_store`] can open.
pub use cacheroute_lmcache::store::is_store_url;

impl KdnConfig {
    /// Parse TOML and [`validate`](Self::validate).
    pub fn from_toml(text: &str) -> Result<KdnConfig> {
        let cfg: KdnConfig = toml::from_str(text).context("parsing the KDN configuration")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a TOML file; relative `tokenizer` and `preload` paths are taken relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<KdnConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: KdnConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &PathBuf| {
            if p.is_relative() && !p.exists() {
                base.join(p)
            } else {
                p.clone()
            }
        };
        for m in &mut cfg.models {
            if let TokenizerChoice::File(p) = &m.tokenizer {
                m.tokenizer = TokenizerChoice::File(rel(p));
            }
        }
        cfg.kdn.preload = cfg.kdn.preload.iter().map(rel).collect();
        cfg.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    /// Check everything that can be checked without I/O.
    pub fn validate(&self) -> Result<()> {
        let k = &self.kdn;
        for (what, url) in [("registry", &k.registry), ("store", &k.store)] {
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://")
                || url.starts_with("memory://"))
            {
                bail!("[kdn] {what} = {url:?}: use redis://host:port[/db] or memory://NAME");
            }
        }
        if k.max_text_bytes == 0 {
            bail!("[kdn] max_text_bytes must be at least 1");
        }
        if k.max_concurrent_injections == 0 {
            bail!("[kdn] max_concurrent_injections must be at least 1");
        }
        if k.batch_chunks == 0 {
            bail!("[kdn] batch_chunks must be at least 1");
        }
        if k.max_concurrent_warmups == 0 {
            bail!("[kdn] max_concurrent_warmups must be at least 1");
        }
        if !(k.warmup_max_share > 0.0 && k.warmup_max_share <= 1.0) {
            bail!("[kdn] warmup_max_share must be in (0, 1] (1: no pause between warm-ups)");
        }
        if !(k.max_registrations_per_s.is_finite() && k.max_registrations_per_s >= 0.0) {
            bail!("[kdn] max_registrations_per_s must be a number ≥ 0 (0: no limit)");
        }
        if k.max_registrations_per_s > 0.0 && k.registration_burst == 0 {
            bail!("[kdn] registration_burst must be at least 1");
        }
        if !(k.warmup_timeout_s > 0.0 && k.warmup_verify_s >= 0.0) {
            bail!("[kdn] warmup_timeout_s must be positive and warmup_verify_s not negative");
        }
        if let Some(id) = &k.id {
            // it travels in URL paths and headers
            if id.is_empty() || id.len() > 200 || id.chars().any(|c| c.is_control() || c == '/') {
                bail!("[kdn] id {id:?}: must be 1-200 characters, without '/' or controls");
            }
        }
        let is_http = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        for g in &k.gateways {
            if !is_http(g) {
                bail!("[kdn] gateways: {g:?} must be an http:// or https:// URL");
            }
        }
        if let Some(u) = &k.advertise_url {
            if !is_http(u) {
                bail!("[kdn] advertise_url {u:?} must be an http:// or https:// URL");
            }
        }
        if !(k.heartbeat_s.is_finite() && k.heartbeat_s > 0.0) {
            bail!("[kdn] heartbeat_s must be a positive number of seconds");
        }
        let mut names = HashSet::new();
        for m in &self.models {
            if m.name.is_empty() {
                bail!("[[models]] name must not be empty");
            }
            if !names.insert(m.name.as_str()) {
                bail!("[[models]] name {:?} appears twice", m.name);
            }
            let params = m.key_params()?;
            // computes nothing for an empty prompt but checks every parameter
            chunk_keys(&params, &[]).with_context(|| format!("model {}", m.name))?;
            if m.kv_bytes_per_token == 0 {
                bail!("model {}: kv_bytes_per_token must be positive", m.name);
            }
            if let Some(p) = &m.producer {
                if !(p.starts_with("http://") || p.starts_with("https://")) {
                    bail!("model {}: producer {p:?} must be an http:// URL", m.name);
                }
            }
        }
        let mut tnames = HashSet::new();
        for t in &self.targets {
            if t.name.is_empty() || t.name.contains("://") {
                bail!(
                    "[[targets]] name {:?}: must be non-empty and not a URL",
                    t.name
                );
            }
            if !tnames.insert(t.name.as_str()) {
                bail!("[[targets]] name {:?} appears twice", t.name);
            }
            if !is_store_url(&t.store) {
                bail!(
                    "target {}: store {:?}: use redis://host:port[/db] or memory://NAME",
                    t.name,
                    t.store
                );
            }
            if let Some(g) = t.link_gbps {
                if !(g.is_finite() && g > 0.0) {
                    bail!("target {}: link_gbps must be a positive number", t.name);
                }
            }
        }
        Ok(())
    }

    /// The model named `name`.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../conf/kdn.example.toml");

    #[test]
    fn example_config_parses() {
        let cfg = KdnConfig::from_toml(EXAMPLE).unwrap();
        assert_eq!(cfg.kdn.listen.port(), 9101);
        assert!(!cfg.models.is_empty());
        assert!(!cfg.targets.is_empty());
    }

    #[test]
    fn defaults_and_errors() {
        let cfg = KdnConfig::from_toml("").unwrap();
        assert_eq!(cfg.kdn.max_text_bytes, 1 << 20);
        assert!(cfg.models.is_empty());
        assert_eq!(cfg.kdn.id_or_default(), "kdn@127.0.0.1:9101");
        assert_eq!(cfg.kdn.advertise_url_or_default(), "http://127.0.0.1:9101");
        assert!(cfg.kdn.gateways.is_empty());
        assert_eq!(cfg.kdn.heartbeat_s, 2.0);
        let model = r#"
[[models]]
name = "m"
lmcache_model = "meta-llama/Meta-Llama-3-8B-Instruct"
hash_seed = "0"
kv_bytes_per_token = 131072
"#;
        let cfg = KdnConfig::from_toml(model).unwrap();
        let m = cfg.model("m").unwrap();
        assert_eq!(m.chunk_size, 256);
        assert_eq!(m.template, ChatTemplate::Llama3);
        assert_eq!(m.logical_bytes_per_key(), 256 * 131072);
        for bad in [
            model.replace("\"0\"", "\"0\"\nscheme = \"lmcache-0.3.11\""),
            model.replace("kv_bytes_per_token = 131072", "kv_bytes_per_token = 0"),
            format!("{model}{model}"),
            format!("{model}\n[[targets]]\nname = \"t\"\nstore = \"http://x\"\n"),
            format!("{model}\n[[targets]]\nname = \"t\"\nstore = \"memory://t\"\nlink_gbps = 0\n"),
            "[kdn]\nstore = \"s3://x\"\n".to_string(),
            "[kdn]\nbogus = 1\n".to_string(),
            "[kdn]\ngateways = [\"127.0.0.1:9090\"]\n".to_string(),
            "[kdn]\nadvertise_url = \"kdn:9101\"\n".to_string(),
            "[kdn]\nheartbeat_s = 0\n".to_string(),
            "[kdn]\nid = \"a/b\"\n".to_string(),
        ] {
            assert!(KdnConfig::from_toml(&bad).is_err(), "{bad}");
        }
    }
}
