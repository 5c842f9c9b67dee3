//! Helpers of the KDN integration tests: throwaway `redis-server`s, KDN configs, HTTP.
#![allow(dead_code)]

use std::time::Duration;

use cacheroute_kdn::config::{KdnConfig, ModelConfig, TargetConfig};
use serde_json::Value;

// not every test file starts a Redis
#[allow(unused_imports)]
pub use cacheroute_kdn::local_redis::LocalRedis as RedisServer;

pub const LMCACHE_MODEL: &str = "meta-llama/Meta-Llama-3-8B-Instruct";

/// A model as the sim serves it by default (llama3-8b, the exact Llama-3 tokenizer).
pub fn model(name: &str, chunk_size: usize, producer: Option<String>) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        lmcache_model: LMCACHE_MODEL.into(),
        template: Default::default(),
        tokenizer: Default::default(),
        vocab_size: 128256,
        scheme: "lmcache-0.3.15".into(),
        hash_algorithm: "sha256_cbor".into(),
        chunk_size,
        dtype: "bfloat16".into(),
        world_size: 1,
        hash_seed: "0".into(),
        kv_bytes_per_token: 131072,
        producer,
    }
}

pub fn target(name: &str, store: &str, link_gbps: Option<f64>) -> TargetConfig {
    TargetConfig {
        name: name.into(),
        store: store.into(),
        link_gbps,
    }
}

/// A KDN config on a free port.
pub fn config(registry: &str, store: &str) -> KdnConfig {
    let mut cfg = KdnConfig::default();
    cfg.kdn.listen = "127.0.0.1:0".parse().unwrap();
    cfg.kdn.registry = registry.into();
    cfg.kdn.store = store.into();
    cfg.kdn.warmup_timeout_s = 60.0;
    cfg.kdn.warmup_verify_s = 5.0;
    // the tests inject into throw-away memory:// stores by URL
    cfg.kdn.allow_url_targets = true;
    cfg
}

/// Deterministic English-like text of about `words` words.
pub fn knowledge_text(topic: &str, words: usize) -> String {
    const NOUNS: &[&str] = &[
        "river",
        "bridge",
        "library",
        "engine",
        "harbor",
        "garden",
        "market",
        "tower",
        "theorem",
        "protein",
        "glacier",
        "satellite",
        "orchestra",
        "province",
        "castle",
    ];
    const VERBS: &[&str] = &[
        "connects",
        "supports",
        "describes",
        "contains",
        "overlooks",
        "predates",
        "feeds",
        "measures",
        "shelters",
        "rivals",
    ];
    let mut s = format!("{topic}. ");
    let mut x: u64 = topic
        .bytes()
        .fold(7, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut n = 0;
    while n < words {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let a = NOUNS[(x >> 33) as usize % NOUNS.len()];
        let v = VERBS[(x >> 40) as usize % VERBS.len()];
        let b = NOUNS[(x >> 20) as usize % NOUNS.len()];
        let year = 1800 + (x >> 50) % 220;
        s.push_str(&format!("The {a} of {topic} {v} the {b} built in {year}. "));
        n += 9;
        if (x >> 13).is_multiple_of(7) {
            s.push_str("\n\n");
        }
    }
    s.trim().to_string()
}

/// An HTTP answer: status and JSON body.
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

pub async fn call(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer { status, body }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}
