//! The sim's caches over real HTTP: vLLM's GPU prefix cache (APC) with and without
//! `--kv-store`, its eviction in a tiny GPU and `--no-enable-prefix-caching`; LMCache's
//! lookup order (GPU, CPU tier, remote store) and what each tier costs; and a bounded
//! Redis (`maxmemory` + `allkeys-lru`) whose evictions are misses, never errors.
//!
//! The Redis test needs `redis-server` on PATH (or named by `CACHEROUTE_REDIS_SERVER`):
//! without it, it fails, it does not skip.

use cacheroute_lmcache::keys::KeyScheme;
use cacheroute_lmcache::keys::{chunk_keys, redis_kv_bytes_key, redis_metadata_key, KeyParams};
use cacheroute_lmcache::local_redis::LocalRedis;
use cacheroute_sim::{spawn, spawn_with_prefix_cache, PrefixCache, SimArgs, SimHandle};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};

fn args() -> SimArgs {
    SimArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        model: "m".into(),
        time_scale: 50.0,
        ..SimArgs::default()
    }
}

fn unique_store(tag: &str) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    format!(
        "memory://sim-cache-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

async fn sim(a: SimArgs) -> SimHandle {
    spawn(a).await.expect("sim starts")
}

/// `n` deterministic token ids, different for each `salt`.
fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(7919).wrapping_add(salt.wrapping_mul(104729))) % 128000)
        .collect()
}

struct Answer {
    body: Value,
    /// (gpu, cpu, remote) from the `x-sim-cached-*` headers.
    tiers: (u64, u64, u64),
    /// Simulated ms from being scheduled to the first token (None for streams).
    prefill_ms: Option<f64>,
}

impl Answer {
    fn cached(&self) -> u64 {
        self.body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    }
}

async fn ask(h: &SimHandle, ids: &[u32]) -> Answer {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", h.url()))
        .json(&json!({"model": "m", "prompt": ids, "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let num = |k: &str| -> Option<f64> { r.headers().get(k)?.to_str().ok()?.parse().ok() };
    let tier = |k: &str| num(k).unwrap_or_else(|| panic!("no {k} header")) as u64;
    let tiers = (
        tier("x-sim-cached-gpu"),
        tier("x-sim-cached-cpu"),
        tier("x-sim-cached-remote"),
    );
    let prefill_ms = num("x-sim-ttft-ms")
        .zip(num("x-sim-queue-ms"))
        .map(|(t, q)| t - q);
    let body: Value = r.json().await.unwrap();
    let a = Answer {
        body,
        tiers,
        prefill_ms,
    };
    assert_eq!(
        a.cached(),
        a.tiers.0 + a.tiers.1 + a.tiers.2,
        "usage = Σ tiers"
    );
    a
}

fn metric(h: &SimHandle, name: &str) -> f64 {
    let text = h.metrics_text();
    let prefix = format!("{name}{{model_name=\"{}\"}} ", h.model());
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        .parse()
        .unwrap()
}

fn tier_metric(h: &SimHandle, tier: &str) -> u64 {
    let text = h.metrics_text();
    let want = format!("tier=\"{tier}\"");
    text.lines()
        .filter(|l| l.starts_with("sim_cached_tokens_total{"))
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("no {tier} sample:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

async fn get_json(h: &SimHandle, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}{path}", h.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 0.01
}

#[tokio::test]
async fn a_repeated_prompt_is_a_gpu_hit_without_kv_store() {
    let h = sim(args()).await;
    let ids = prompt(1000, 1);
    let first = ask(&h, &ids).await;
    assert_eq!(first.tiers, (0, 0, 0));
    // the repeat: the prompt's 62 full blocks (992 tokens; the last token is computed)
    let second = ask(&h, &ids).await;
    assert_eq!(second.tiers, (992, 0, 0));
    assert_eq!(second.cached(), 992);
    // a GPU hit loads nothing: only the cached prefill of the 8 other tokens
    let cost = h.cost_model();
    assert!(close(first.prefill_ms.unwrap(), cost.prefill_ms(1000)));
    assert!(close(
        second.prefill_ms.unwrap(),
        cost.cached_prefill_ms(992, 8)
    ));
    // vLLM's metrics, the sim's per tier, and the GPU seconds spent on prefill
    assert_eq!(metric(&h, "vllm:prefix_cache_queries_total"), 2000.0);
    assert_eq!(metric(&h, "vllm:prefix_cache_hits_total"), 992.0);
    assert_eq!(metric(&h, "vllm:external_prefix_cache_queries_total"), 0.0);
    assert_eq!(tier_metric(&h, "gpu"), 992);
    assert_eq!(tier_metric(&h, "cpu") + tier_metric(&h, "remote"), 0);
    let prefill_s = (cost.prefill_ms(1000) + cost.cached_prefill_ms(992, 8)) / 1000.0;
    assert!((metric(&h, "sim_gpu_prefill_seconds_total") - prefill_s).abs() < 1e-9);
    // the debug views
    let last = get_json(&h, "/debug/last_request").await;
    assert_eq!(last["cached"], json!({"gpu": 992, "cpu": 0, "remote": 0}));
    let dbg = get_json(&h, "/debug/engine").await;
    assert_eq!(dbg["scheduler"]["enable_prefix_caching"], true);
    assert_eq!(dbg["stats"]["apc"]["cached_blocks"], 62);
    assert_eq!(dbg["stats"]["apc"]["used_blocks"], 0);
    assert_eq!(dbg["stats"]["cached_tokens"]["gpu"], 992);
    assert_eq!(dbg["lmcache"], Value::Null);
    // streamed: the head carries the split too
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", h.url()))
        .json(
            &json!({"model": "m", "prompt": ids, "max_tokens": 2, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-sim-cached-gpu"], "992");
    assert_eq!(r.headers()["x-sim-cached-remote"], "0");
    let text = r.text().await.unwrap();
    assert!(text.contains("\"cached_tokens\":992"), "{text}");
    h.stop().await;
}

#[tokio::test]
async fn a_tiny_gpu_evicts_the_prefix() {
    // 63 blocks: exactly one 1000-token request
    let h = sim(SimArgs {
        num_gpu_blocks: Some(63),
        ..args()
    })
    .await;
    let a = prompt(1000, 2);
    let b = prompt(1000, 3);
    assert_eq!(ask(&h, &a).await.tiers, (0, 0, 0));
    assert_eq!(ask(&h, &a).await.tiers, (992, 0, 0));
    // b needs every block: a's cached blocks are evicted
    assert_eq!(ask(&h, &b).await.tiers, (0, 0, 0));
    assert_eq!(ask(&h, &a).await.tiers, (0, 0, 0));
    let dbg = get_json(&h, "/debug/engine").await;
    assert!(
        dbg["stats"]["apc"]["evictions"].as_u64().unwrap() >= 62,
        "{dbg}"
    );
    assert_eq!(metric(&h, "vllm:prefix_cache_hits_total"), 992.0);
    h.stop().await;
}

#[tokio::test]
async fn no_enable_prefix_caching_gives_zero() {
    let h = sim(SimArgs {
        no_enable_prefix_caching: true,
        ..args()
    })
    .await;
    let ids = prompt(1000, 4);
    ask(&h, &ids).await;
    let again = ask(&h, &ids).await;
    assert_eq!((again.cached(), again.tiers), (0, (0, 0, 0)));
    assert!(close(
        again.prefill_ms.unwrap(),
        h.cost_model().prefill_ms(1000)
    ));
    // vLLM does not count prefix-cache queries with caching off
    assert_eq!(metric(&h, "vllm:prefix_cache_queries_total"), 0.0);
    let dbg = get_json(&h, "/debug/engine").await;
    assert_eq!(dbg["scheduler"]["enable_prefix_caching"], false);
    assert_eq!(dbg["stats"]["apc"]["cached_blocks"], 0);
    h.stop().await;
}

#[tokio::test]
async fn lookup_order_and_tier_costs() {
    let store = unique_store("order");
    let with_store = |a: SimArgs| SimArgs {
        kv_store: Some(store.clone()),
        ..a
    };
    let writer = sim(with_store(args())).await;
    let ids = prompt(1000, 5); // 3 full 256-token chunks: LMCache holds 768 tokens
    assert_eq!(ask(&writer, &ids).await.tiers, (0, 0, 0));
    // the GPU holds more than LMCache's whole chunks: all of it from the GPU
    assert_eq!(ask(&writer, &ids).await.tiers, (992, 0, 0));

    // another instance on the same store, without APC: remote first, then its CPU tier
    let reader = sim(with_store(SimArgs {
        no_enable_prefix_caching: true,
        ..args()
    }))
    .await;
    let cost = reader.cost_model().clone();
    let bytes = cost.kv_bytes(768);
    let remote = ask(&reader, &ids).await;
    assert_eq!(remote.tiers, (0, 0, 768));
    let link_ms = bytes as f64 / (25e9 / 8.0) * 1000.0;
    let want = cost.cached_prefill_ms(768, 232) + cost.h2d_ms(bytes) + link_ms;
    assert!(
        close(remote.prefill_ms.unwrap(), want),
        "{remote:?}",
        remote = remote.prefill_ms
    );
    let cpu = ask(&reader, &ids).await;
    assert_eq!(
        cpu.tiers,
        (0, 768, 0),
        "promoted to the CPU tier when loaded"
    );
    let want = cost.cached_prefill_ms(768, 232) + cost.h2d_ms(bytes);
    assert!(close(cpu.prefill_ms.unwrap(), want));
    assert_eq!(
        metric(&reader, "vllm:external_prefix_cache_hits_total"),
        1536.0
    );
    assert_eq!(
        metric(&reader, "vllm:external_prefix_cache_queries_total"),
        2000.0
    );
    assert_eq!(metric(&reader, "sim_lmcache_chunks_loaded_total"), 6.0);
    assert_eq!(
        (tier_metric(&reader, "remote"), tier_metric(&reader, "cpu")),
        (768, 768)
    );
    let dbg = get_json(&reader, "/debug/engine").await;
    let local = &dbg["lmcache"]["local_cpu"];
    assert_eq!(local["chunks"], 3);
    assert_eq!(local["used_bytes"], 3 * 33_554_432u64);
    assert_eq!(local["capacity_bytes"], 5u64 << 30);
    assert_eq!(dbg["lmcache"]["kv_store_gbps"], 25.0);

    // a free link (--kv-store-gbps 0) and no CPU tier: a remote hit costs only the copy
    let free = sim(with_store(SimArgs {
        no_enable_prefix_caching: true,
        kv_store_gbps: 0.0,
        lmcache_local_cpu_size: 0.0,
        ..args()
    }))
    .await;
    for _ in 0..2 {
        let r = ask(&free, &ids).await;
        assert_eq!(r.tiers, (0, 0, 768), "nothing is kept on the CPU");
        let want = cost.cached_prefill_ms(768, 232) + cost.h2d_ms(bytes);
        assert!(close(r.prefill_ms.unwrap(), want));
    }
    assert_eq!(
        get_json(&free, "/debug/engine").await["lmcache"]["local_cpu"]["chunks"],
        0
    );
    writer.stop().await;
    reader.stop().await;
    free.stop().await;
}

/// A custom external cache that holds the first 512 tokens of every prompt.
struct Holds512;

#[async_trait::async_trait]
impl PrefixCache for Holds512 {
    async fn lookup(&self, _model: &str, ids: &[u32]) -> u64 {
        ids.len().min(512) as u64
    }
}

#[tokio::test]
async fn a_custom_prefix_cache_is_an_external_hit_beside_the_gpu() {
    let h = spawn_with_prefix_cache(args(), std::sync::Arc::new(Holds512))
        .await
        .unwrap();
    let ids = prompt(1000, 6);
    let cost = h.cost_model().clone();
    // costed and reported like an LMCache CPU-tier hit
    let first = ask(&h, &ids).await;
    assert_eq!(first.tiers, (0, 512, 0));
    let want = cost.cached_prefill_ms(512, 488) + cost.h2d_ms(cost.kv_bytes(512));
    assert!(close(first.prefill_ms.unwrap(), want));
    // the GPU prefix cache still works, and wins when it holds more
    assert_eq!(ask(&h, &ids).await.tiers, (992, 0, 0));
    // a short prompt: the external hit is capped below the whole prompt
    assert_eq!(ask(&h, &prompt(300, 7)).await.tiers, (0, 299, 0));
    h.stop().await;
}

/// `CONFIG SET` on a real Redis.
async fn config_set(conn: &mut redis::aio::ConnectionManager, key: &str, value: &str) {
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async(conn)
        .await
        .unwrap();
}

/// How many leading `keys` have both halves in Redis.
async fn present_prefix(conn: &mut redis::aio::ConnectionManager, keys: &[String]) -> usize {
    let mut n = 0;
    for k in keys {
        let (a, b): (i64, i64) = redis::pipe()
            .cmd("EXISTS")
            .arg(redis_metadata_key(k))
            .cmd("EXISTS")
            .arg(redis_kv_bytes_key(k))
            .query_async(conn)
            .await
            .unwrap();
        if a == 0 || b == 0 {
            break;
        }
        n += 1;
    }
    n
}

#[tokio::test]
async fn a_bounded_redis_evicts_into_misses_never_errors() {
    let redis = LocalRedis::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    config_set(&mut conn, "maxmemory", "3mb").await;
    config_set(&mut conn, "maxmemory-policy", "allkeys-lru").await;
    // LMCache only (no GPU cache, no CPU tier): every hit is what Redis still holds
    let h = sim(SimArgs {
        kv_store: Some(redis.url()),
        no_enable_prefix_caching: true,
        lmcache_local_cpu_size: 0.0,
        zero_latency: true,
        ..args()
    })
    .await;
    let params = KeyParams {
        hash_seed: Some("0".into()),
        ..KeyParams::new(KeyScheme::Lmcache0_3_13, "m")
    };
    // 40 prompts of 4 chunks (32 KiB blobs): ~5 MiB written into 3 MiB
    let prompts: Vec<Vec<u32>> = (0..40).map(|i| prompt(1024, 100 + i)).collect();
    for p in &prompts {
        assert_eq!(ask(&h, p).await.cached(), 0);
    }
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let evicted: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(evicted > 0, "Redis evicted nothing:\n{info}");
    // each prompt again, newest first (oldest first, each rewrite would evict the next
    // one): the hit is exactly the leading chunks Redis still holds whole
    let (mut full, mut partial) = (0, 0);
    for p in prompts.iter().rev() {
        let keys: Vec<String> = chunk_keys(&params, p)
            .unwrap()
            .into_iter()
            .map(|k| k.key)
            .collect();
        let present = present_prefix(&mut conn, &keys).await as u64;
        let r = ask(&h, p).await;
        assert_eq!(
            r.cached(),
            (present * 256).min(1023),
            "{present} chunks present"
        );
        assert_eq!(r.tiers.2, r.cached());
        if present == 4 {
            full += 1;
        } else {
            partial += 1;
        }
    }
    assert!(partial > 0, "some prompts lost chunks");
    assert!(full > 0, "the newest prompts are still whole");
    // a chunk whose kv_bytes alone is gone (the other half of an eviction) is a miss too
    let p = prompt(1024, 999);
    ask(&h, &p).await;
    let keys: Vec<String> = chunk_keys(&params, &p)
        .unwrap()
        .into_iter()
        .map(|k| k.key)
        .collect();
    assert_eq!(present_prefix(&mut conn, &keys).await, 4);
    let () = redis::cmd("DEL")
        .arg(redis_kv_bytes_key(&keys[1]))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ask(&h, &p).await.cached(), 256);
    assert_eq!(
        metric(&h, "sim_kv_store_errors_total"),
        0.0,
        "misses, not errors"
    );
    println!("{evicted} keys evicted; {full} prompts whole, {partial} cut");
    h.stop().await;
}
