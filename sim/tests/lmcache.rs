//! The sim's LMCache (`--kv-store`) over real HTTP: prefix hits, chunk writes, metrics,
//! store failures, and two sims sharing a store (in-process `memory://` and a real
//! `redis-server`).
//!
//! The Redis test needs `redis-server` on PATH (or named by `CACHEROUTE_REDIS_SERVER`):
//! without it, it fails, it does not skip.
//!
//! These sims run with `--no-enable-prefix-caching`: a repeated prompt would otherwise be a
//! GPU prefix-cache hit (longer than LMCache's whole chunks), and these tests are about
//! what LMCache supplies (`tests/cache.rs` covers the tiers together).

use cacheroute_lmcache::keys::{
    chunk_keys, redis_kv_bytes_key, redis_metadata_key, KeyParams, KeyScheme, RemoteMetadata,
};
use cacheroute_lmcache::store::{named_memory_store, KvStore, RedisStore};
use cacheroute_sim::tokenizer::Tokenizer;
use cacheroute_sim::{spawn, spawn_with_prefix_cache, NoPrefixCache, SimArgs, SimHandle};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const HF_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// A store name no other test (or test run in this process) uses.
fn unique_store(tag: &str) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    format!(
        "memory://sim-lmcache-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn args(store: &str) -> SimArgs {
    SimArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        model: "m".into(),
        time_scale: 20.0,
        kv_store: Some(store.into()),
        no_enable_prefix_caching: true,
        ..SimArgs::default()
    }
}

async fn sim(a: SimArgs) -> SimHandle {
    spawn(a).await.expect("sim starts")
}

/// A long chat/completion text (well over 1,000 approximate tokens).
fn long_text(words: usize) -> String {
    let vocab = [
        "retrieval",
        "augmented",
        "generation",
        "keeps",
        "the",
        "knowledge",
        "in",
        "front",
        "of",
        "every",
        "question",
        "so",
        "that",
        "cached",
        "chunks",
        "match",
        "exactly",
    ];
    (0..words)
        .map(|i| format!("{}{}", vocab[i % vocab.len()], i % 7))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Answer {
    body: Value,
    ttft_ms: f64,
    queue_ms: f64,
}

impl Answer {
    fn cached(&self) -> u64 {
        self.body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    }
    fn prompt_tokens(&self) -> u64 {
        self.body["usage"]["prompt_tokens"].as_u64().unwrap()
    }
    /// Simulated ms from being scheduled to the first token: the prefill step alone (the
    /// request is alone in the engine), independent of wall-clock jitter.
    fn prefill_ms(&self) -> f64 {
        self.ttft_ms - self.queue_ms
    }
}

async fn ask(h: &SimHandle, path: &str, body: Value) -> Answer {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", h.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let get = |k: &str| -> f64 { r.headers()[k].to_str().unwrap().parse().unwrap() };
    let (ttft_ms, queue_ms) = (get("x-sim-ttft-ms"), get("x-sim-queue-ms"));
    Answer {
        body: r.json().await.unwrap(),
        ttft_ms,
        queue_ms,
    }
}

fn metric(h: &SimHandle, name: &str) -> u64 {
    let text = h.metrics_text();
    let prefix = format!("{name}{{model_name=\"{}\"}} ", h.model());
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        .parse()
        .unwrap()
}

/// `sim_cached_tokens_total{tier}`.
fn tier(h: &SimHandle, tier: &str) -> u64 {
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

/// Transfer time (ms) of `bytes` over the default 25 Gbit/s store link.
fn link_ms(bytes: u64) -> f64 {
    bytes as f64 / (25e9 / 8.0) * 1000.0
}

fn full_chunks(n: u64) -> u64 {
    n / 256 * 256
}

#[tokio::test]
async fn repeated_prompt_hits_the_second_time() {
    let store = unique_store("repeat");
    // real time: the raw TTFTs, whose queueing part comes from the wall clock, stay far
    // apart (~125 vs ~40 simulated ms)
    let h = sim(SimArgs {
        time_scale: 1.0,
        ..args(&store)
    })
    .await;
    let body = json!({"model": "m", "max_tokens": 3,
        "messages": [{"role": "system", "content": long_text(1600)},
                     {"role": "user", "content": "What matters?"}]});
    let first = ask(&h, "/v1/chat/completions", body.clone()).await;
    let n = first.prompt_tokens();
    assert!(n > 3000 && n < 8192, "prompt of {n} tokens");
    assert_eq!(first.cached(), 0);
    let c = full_chunks(n);
    assert!(c >= 3000 - 256 && c < n, "{n} tokens, {c} in full chunks");

    let second = ask(&h, "/v1/chat/completions", body.clone()).await;
    assert_eq!(second.cached(), c);
    assert_eq!(
        second.body["choices"][0]["message"]["content"],
        first.body["choices"][0]["message"]["content"]
    );
    // simulated prefill: full prefill, then cached prefill of the tail plus the load
    // of the cached KV at the profile's h2d bandwidth (real size, not the stored blob)
    let cost = h.cost_model();
    let miss = cost.prefill_ms(n);
    let hit = cost.cached_prefill_ms(c, n - c) + cost.h2d_ms(cost.kv_bytes(c));
    assert!(
        (first.prefill_ms() - miss).abs() < 0.01,
        "{} vs {miss}",
        first.prefill_ms()
    );
    assert!(
        (second.prefill_ms() - hit).abs() < 0.01,
        "{} vs {hit}",
        second.prefill_ms()
    );
    assert!(second.prefill_ms() < first.prefill_ms() / 2.0);
    assert!(second.ttft_ms < first.ttft_ms);

    // streamed: the usage chunk carries the hit too
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let text = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", h.url()))
        .json(&streamed)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let usage: Value = text
        .split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|f| *f != "[DONE]")
        .map(|f| serde_json::from_str::<Value>(f).unwrap())
        .find(|v| v.get("usage").is_some())
        .expect("a usage chunk")["usage"]
        .clone();
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], c);
    assert_eq!(usage["prompt_tokens"], n);

    // metrics: three lookups of n tokens, two hits of c, both from the CPU tier (the
    // chunks the first request stored are kept there too); no GPU prefix cache
    let k = c / 256;
    assert_eq!(metric(&h, "vllm:prefix_cache_queries_total"), 0);
    assert_eq!(metric(&h, "vllm:prefix_cache_hits_total"), 0);
    assert_eq!(tier(&h, "cpu"), 2 * c);
    assert_eq!(tier(&h, "remote") + tier(&h, "gpu"), 0);
    assert_eq!(
        metric(&h, "vllm:external_prefix_cache_queries_total"),
        3 * n
    );
    assert_eq!(metric(&h, "vllm:external_prefix_cache_hits_total"), 2 * c);
    assert_eq!(metric(&h, "sim_lmcache_chunks_loaded_total"), 2 * k);
    assert_eq!(metric(&h, "sim_lmcache_chunks_stored_total"), k);
    assert_eq!(metric(&h, "sim_kv_store_errors_total"), 0);
    // (32 KiB blob + 28-byte header) per chunk
    assert_eq!(
        metric(&h, "sim_lmcache_stored_bytes_total"),
        k * (32768 + 28)
    );

    // the store: k chunks; scaled blob, header with the real 8B shape
    let mem = named_memory_store(store.strip_prefix("memory://").unwrap());
    assert_eq!(mem.chunk_count() as u64, k);
    let ids = Tokenizer::approx(128256).encode_chat(&[
        cacheroute_sim::tokenizer::ChatMessage {
            role: "system".into(),
            content: long_text(1600),
        },
        cacheroute_sim::tokenizer::ChatMessage {
            role: "user".into(),
            content: "What matters?".into(),
        },
    ]);
    assert_eq!(ids.len() as u64, n);
    let params = KeyParams {
        hash_seed: Some("0".into()),
        ..KeyParams::new(KeyScheme::Lmcache0_3_13, "m")
    };
    let keys = chunk_keys(&params, &ids).unwrap();
    assert_eq!(keys.len() as u64, k);
    for key in &keys {
        let meta = mem.raw_get(&redis_metadata_key(&key.key)).unwrap();
        let meta = RemoteMetadata::from_bytes(&meta).unwrap();
        assert_eq!(meta.length, 33_554_432);
        assert_eq!(meta.shape, [2, 32, 256, 1024]);
        assert_eq!((meta.fmt, meta.dtype), (1, 3));
        let blob = mem.raw_get(&redis_kv_bytes_key(&key.key)).unwrap();
        assert_eq!(blob.len(), 33_554_432 / 1024);
    }
    h.stop().await;
}

#[tokio::test]
async fn token_id_prompt_hits_chunks_written_by_another_sim() {
    let store = unique_store("shared");
    let a = SimArgs {
        lmcache_model: Some(HF_MODEL.into()),
        ..args(&store)
    };
    let writer = sim(a.clone()).await;
    let reader = sim(a).await;
    // the writer gets text; the reader the same prompt as token ids
    let text = long_text(500);
    let w = ask(
        &writer,
        "/v1/completions",
        json!({"prompt": text, "max_tokens": 2}),
    )
    .await;
    assert_eq!(w.cached(), 0);
    let ids = Tokenizer::llama3().unwrap().encode(&text);
    let n = ids.len() as u64;
    assert_eq!(w.prompt_tokens(), n);
    assert!(n > 1000);
    for prompt in [json!(ids), json!([ids])] {
        let r = ask(
            &reader,
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 2}),
        )
        .await;
        assert_eq!(r.prompt_tokens(), n);
        assert_eq!(r.cached(), full_chunks(n), "{prompt}");
        assert_eq!(r.body["choices"][0]["text"], w.body["choices"][0]["text"]);
    }
    assert_eq!(metric(&reader, "sim_lmcache_chunks_stored_total"), 0);
    assert_eq!(
        metric(&reader, "vllm:external_prefix_cache_hits_total"),
        2 * full_chunks(n)
    );
    // the first load came from the store and promoted the chunks to the reader's CPU tier
    assert_eq!(tier(&reader, "remote"), full_chunks(n));
    assert_eq!(tier(&reader, "cpu"), full_chunks(n));
    // the keys are LMCache's, for the vLLM --model string
    let params = KeyParams {
        hash_seed: Some("0".into()),
        ..KeyParams::new(KeyScheme::Lmcache0_3_13, HF_MODEL)
    };
    let keys: Vec<String> = chunk_keys(&params, &ids)
        .unwrap()
        .into_iter()
        .map(|k| k.key)
        .collect();
    assert!(keys[0].starts_with("meta-llama/Llama-3.1-8B-Instruct@1@0@"));
    let mem = named_memory_store(store.strip_prefix("memory://").unwrap());
    assert_eq!(mem.longest_present_prefix(&keys).await.unwrap(), keys.len());

    // a prompt that is exactly whole chunks: the last token is still computed
    let exact: Vec<u32> = ids[..512].to_vec();
    let r = ask(
        &reader,
        "/v1/completions",
        json!({"prompt": exact, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.cached(), 511);
    // a different prompt sharing only the first chunk hits that chunk
    let mut fork = ids.clone();
    fork[300] = fork[300].wrapping_add(1) % 128000;
    let r = ask(
        &reader,
        "/v1/completions",
        json!({"prompt": fork, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.cached(), 256);
    // ... and its own new chunks are written by the reader
    assert_eq!(
        metric(&reader, "sim_lmcache_chunks_stored_total"),
        full_chunks(n) / 256 - 1
    );
    writer.stop().await;
    reader.stop().await;
}

#[tokio::test]
async fn zero_latency_sims_hit_too() {
    let store = unique_store("zero");
    let h = sim(SimArgs {
        zero_latency: true,
        ..args(&store)
    })
    .await;
    let body = json!({"prompt": (0..700).collect::<Vec<u32>>(), "max_tokens": 1});
    let r = reqwest::Client::new().post(format!("{}/v1/completions", h.url()));
    let first: Value = r
        .try_clone()
        .unwrap()
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let second: Value = r.json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        second["usage"]["prompt_tokens_details"]["cached_tokens"],
        512
    );
    h.stop().await;
}

#[tokio::test]
async fn failing_store_answers_without_hits() {
    // no CPU tier either (it would keep what the first request computed)
    let h = sim(SimArgs {
        lmcache_local_cpu_size: 0.0,
        ..args("redis://127.0.0.1:1")
    })
    .await;
    let plain = sim(SimArgs {
        kv_store: None,
        ..args("unused")
    })
    .await;
    assert!(!h.lmcache().unwrap().is_connected());
    let body = json!({"prompt": long_text(400), "max_tokens": 4});
    let want = ask(&plain, "/v1/completions", body.clone()).await;
    for _ in 0..2 {
        let r = ask(&h, "/v1/completions", body.clone()).await;
        assert_eq!(r.cached(), 0);
        assert_eq!(r.body["choices"], want.body["choices"]);
        assert_eq!(r.body["usage"], want.body["usage"]);
        assert!((r.prefill_ms() - want.prefill_ms()).abs() < 0.01);
    }
    // start-up, then a failed lookup and a failed write per request
    assert!(metric(&h, "sim_kv_store_errors_total") >= 3);
    assert_eq!(metric(&h, "vllm:prefix_cache_hits_total"), 0);
    assert_eq!(metric(&h, "sim_lmcache_chunks_stored_total"), 0);
    // the plain sim has the counters, at zero
    assert_eq!(metric(&plain, "sim_kv_store_errors_total"), 0);
    assert_eq!(
        metric(&plain, "vllm:external_prefix_cache_queries_total"),
        0
    );
    h.stop().await;
    plain.stop().await;
}

#[tokio::test]
async fn bad_lmcache_flags_refuse_to_start() {
    let store = unique_store("flags");
    let cases: Vec<(SimArgs, &str)> = vec![
        (
            SimArgs {
                lmcache_scheme: "lmcache-0.3.12".into(),
                ..args(&store)
            },
            "--lmcache-scheme",
        ),
        (
            SimArgs {
                lmcache_scheme: "lmcache-9".into(),
                ..args(&store)
            },
            "not supported",
        ),
        (
            SimArgs {
                hash_seed: "random".into(),
                ..args(&store)
            },
            "PYTHONHASHSEED",
        ),
        (
            SimArgs {
                hash_seed: "seed".into(),
                ..args(&store)
            },
            "4294967295",
        ),
        (
            SimArgs {
                world_size: 2,
                worker_id: Some(2),
                ..args(&store)
            },
            "--worker-id 2",
        ),
        (
            SimArgs {
                kv_scale_down: 0,
                ..args(&store)
            },
            "--kv-scale-down",
        ),
        (
            SimArgs {
                kv_dtype: "float8".into(),
                ..args(&store)
            },
            "float8",
        ),
        (args("s3://bucket/kv"), "unsupported store URL"),
    ];
    for (a, want) in cases {
        let e = match spawn(a).await {
            Ok(_) => panic!("started despite {want}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(want), "{want}: {e}");
    }
    let e = match spawn_with_prefix_cache(args(&store), Arc::new(NoPrefixCache)).await {
        Ok(_) => panic!("--kv-store with a custom PrefixCache"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("PrefixCache"), "{e}");
}

#[tokio::test]
async fn kv_handles_and_skip_save() {
    let store = unique_store("handles");
    let h = sim(args(&store)).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/completions", h.url());
    let ids: Vec<u32> = (0..600).map(|i| (i * 7919 + 13) % 128000).collect();
    // kv_transfer_params of any content, LMCache's skip_save honoured
    let r = client
        .post(&url)
        .header("x-cacheroute-kv-handle", "kh-1")
        .json(&json!({"prompt": ids, "max_tokens": 1,
            "kv_transfer_params": {"lmcache.skip_save": true, "opaque": {"x": [1, 2]}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(metric(&h, "sim_kv_handle_requests_total"), 1);
    assert_eq!(metric(&h, "sim_kv_transfer_params_requests_total"), 1);
    assert_eq!(metric(&h, "sim_lmcache_chunks_stored_total"), 0);
    let r = client
        .post(&url)
        .json(&json!({"prompt": ids, "max_tokens": 1, "kv_transfer_params": {}}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(metric(&h, "sim_kv_transfer_params_requests_total"), 2);
    assert_eq!(metric(&h, "sim_kv_handle_requests_total"), 1);
    assert_eq!(metric(&h, "sim_lmcache_chunks_stored_total"), 2);
    let r = client
        .post(&url)
        .json(&json!({"prompt": ids, "max_tokens": 1, "kv_transfer_params": "kh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = client
        .post(&url)
        .json(&json!({"prompt": ids, "max_tokens": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 512);
    // /debug/engine shows the LMCache settings
    let dbg: Value = client
        .get(format!("{}/debug/engine", h.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dbg["lmcache"]["scheme"], "lmcache-0.3.13");
    assert_eq!(dbg["lmcache"]["chunk_size"], 256);
    assert_eq!(dbg["lmcache"]["kv_scale_down"], 1024);
    assert_eq!(dbg["lmcache"]["connected"], true);
    h.stop().await;
}

/// The `sim:kv_handle_checks_total` sample of one result.
fn checks(h: &SimHandle, result: &str) -> u64 {
    let text = h.metrics_text();
    let want = format!("result=\"{result}\"");
    text.lines()
        .filter(|l| l.starts_with("sim:kv_handle_checks_total{"))
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("no {result} sample:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// POST a completion with an optional KV-handle header; returns the `x-sim-kv-handle`
/// result and the body (or the SSE text for streams).
async fn with_handle(h: &SimHandle, header: Option<&str>, body: Value) -> (String, String) {
    let mut rq = reqwest::Client::new()
        .post(format!("{}/v1/completions", h.url()))
        .json(&body);
    if let Some(v) = header {
        rq = rq.header("x-cacheroute-kv-handle", v);
    }
    let r = rq.send().await.unwrap();
    assert_eq!(r.status(), 200, "served whatever the handle says");
    let result = r
        .headers()
        .get("x-sim-kv-handle")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (result, r.text().await.unwrap())
}

async fn last_handle(h: &SimHandle) -> Value {
    let v: Value = reqwest::Client::new()
        .get(format!("{}/debug/last_request", h.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["kv_handle"].clone()
}

#[tokio::test]
async fn kv_handles_are_checked_against_the_store() {
    let store = unique_store("check");
    let h = sim(args(&store)).await;
    // 600 tokens: 2 full chunks of 256
    let ids: Vec<u32> = (0..600).map(|i| (i * 7919 + 13) % 128000).collect();
    let body = json!({"prompt": ids, "max_tokens": 1});
    // nothing stored yet: the handle's chunks are missing (and the request is served)
    let (r, _) = with_handle(&h, Some("job=j-1;chunks=2;tokens=512"), body.clone()).await;
    assert_eq!(r, "missing");
    let d = last_handle(&h).await;
    assert_eq!(d["result"], "missing");
    assert_eq!(d["source"], "header");
    assert_eq!(d["value"], "job=j-1;chunks=2;tokens=512");
    assert_eq!(
        (d["present_chunks"].as_u64(), d["prompt_chunks"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(d["chunk_size"], 256);
    // that request stored both chunks, as a KDN injection would have
    let (r, text) = with_handle(&h, Some("job=j-1;chunks=2;tokens=512"), body.clone()).await;
    assert_eq!(r, "ok");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 512);
    let d = last_handle(&h).await;
    assert_eq!(
        (d["result"].as_str(), d["job"].as_str()),
        (Some("ok"), Some("j-1"))
    );
    assert_eq!(
        (d["chunks"].as_u64(), d["tokens"].as_u64()),
        (Some(2), Some(512))
    );
    // fewer chunks claimed than present is fine; more than the prompt has is not
    let (r, _) = with_handle(&h, Some("job=j-1;chunks=1;tokens=256"), body.clone()).await;
    assert_eq!(r, "ok");
    let (r, _) = with_handle(&h, Some("job=j-1;chunks=3;tokens=768"), body.clone()).await;
    assert_eq!(r, "missing");
    // tokens not chunks × chunk size
    let (r, _) = with_handle(&h, Some("job=j-1;chunks=2;tokens=500"), body.clone()).await;
    assert_eq!(r, "mismatch");
    // unparsable
    let (r, _) = with_handle(&h, Some("kh-1"), body.clone()).await;
    assert_eq!(r, "malformed");
    let d = last_handle(&h).await;
    assert_eq!(d["result"], "malformed");
    assert!(d["error"].as_str().unwrap().contains("key=value"), "{d}");
    // a prompt sharing only the first chunk: the second chunk of THIS prompt is missing
    let mut fork = ids.clone();
    fork[300] = (fork[300] + 1) % 128000;
    let fork_body =
        json!({"prompt": fork, "max_tokens": 1, "kv_transfer_params": {"lmcache.skip_save": true}});
    let (r, _) = with_handle(&h, Some("job=j-2;chunks=2;tokens=512"), fork_body.clone()).await;
    assert_eq!(r, "missing");
    let (r, _) = with_handle(&h, Some("job=j-2;chunks=1;tokens=256"), fork_body).await;
    assert_eq!(r, "ok");

    // the body form, streamed too
    let handle = json!({"job": "j-3", "chunks": 2, "tokens": 512});
    let in_body = json!({"prompt": ids, "max_tokens": 2,
        "kv_transfer_params": {"cacheroute_kv_handle": handle}});
    let (r, _) = with_handle(&h, None, in_body.clone()).await;
    assert_eq!(r, "ok");
    let d = last_handle(&h).await;
    assert_eq!(
        (d["source"].as_str(), d["job"].as_str()),
        (Some("kv_transfer_params"), Some("j-3"))
    );
    assert_eq!(d["value"], handle);
    let mut streamed = in_body.clone();
    streamed["stream"] = json!(true);
    let (r, text) = with_handle(&h, None, streamed).await;
    assert_eq!(r, "ok");
    assert!(text.ends_with("data: [DONE]\n\n"));
    // the header wins over the body, either way
    let (r, _) = with_handle(&h, Some("job=j-4"), in_body.clone()).await;
    assert_eq!(r, "malformed");
    let bad_body = json!({"prompt": ids, "max_tokens": 1,
        "kv_transfer_params": {"cacheroute_kv_handle": {"job": "j-5", "chunks": "2"}}});
    let (r, _) = with_handle(&h, None, bad_body.clone()).await;
    assert_eq!(r, "malformed");
    let (r, _) = with_handle(&h, Some("job=j-5;chunks=2;tokens=512"), bad_body).await;
    assert_eq!(r, "ok");
    assert_eq!(last_handle(&h).await["source"], "header");
    // no handle: no result header, no report, no count
    let (r, _) = with_handle(&h, None, body.clone()).await;
    assert_eq!(r, "");
    assert_eq!(last_handle(&h).await, Value::Null);

    assert_eq!(checks(&h, "ok"), 6);
    assert_eq!(checks(&h, "missing"), 3);
    assert_eq!(checks(&h, "mismatch"), 1);
    assert_eq!(checks(&h, "malformed"), 3);
    assert_eq!(checks(&h, "no_store"), 0);
    // header-carrying requests are still counted apart
    assert_eq!(metric(&h, "sim_kv_handle_requests_total"), 10);
    h.stop().await;
}

#[tokio::test]
async fn kv_handles_without_a_store() {
    for zero_latency in [false, true] {
        let h = sim(SimArgs {
            kv_store: None,
            zero_latency,
            ..args("unused")
        })
        .await;
        let body = json!({"prompt": "hello there", "max_tokens": 1});
        let (r, _) = with_handle(&h, Some("job=j;chunks=2;tokens=512"), body.clone()).await;
        assert_eq!(r, "no_store");
        let d = last_handle(&h).await;
        assert_eq!(
            (d["result"].as_str(), d["chunks"].as_u64()),
            (Some("no_store"), Some(2))
        );
        // parsing comes first
        let (r, _) = with_handle(&h, Some("job=j;chunks=two;tokens=512"), body).await;
        assert_eq!(r, "malformed");
        assert_eq!(checks(&h, "no_store"), 1);
        assert_eq!(checks(&h, "malformed"), 1);
        assert_eq!(checks(&h, "ok"), 0);
        h.stop().await;
    }
}

// ---------------------------------------------------------------------------
// A real Redis

use cacheroute_lmcache::local_redis::LocalRedis as RedisServer;

#[tokio::test]
async fn two_sims_share_a_real_redis() {
    let redis = RedisServer::start();
    let a = SimArgs {
        lmcache_model: Some(HF_MODEL.into()),
        kv_store_timeout_ms: 1000,
        ..args(&redis.url())
    };
    let one = sim(a.clone()).await;
    let two = sim(a).await;
    assert!(one.lmcache().unwrap().is_connected());
    let body = json!({"max_tokens": 2,
        "messages": [{"role": "system", "content": long_text(600)},
                     {"role": "user", "content": "Summarise."}]});
    let first = ask(&one, "/v1/chat/completions", body.clone()).await;
    assert_eq!(first.cached(), 0);
    let n = first.prompt_tokens();
    let hit = ask(&two, "/v1/chat/completions", body.clone()).await;
    let c = full_chunks(n);
    assert_eq!(hit.cached(), c);
    // a remote hit: host-to-device plus the real bytes over the 25 Gbit/s store link
    let cost = two.cost_model();
    let want = cost.cached_prefill_ms(c, n - c)
        + cost.h2d_ms(cost.kv_bytes(c))
        + link_ms(cost.kv_bytes(c));
    assert!(
        (hit.prefill_ms() - want).abs() < 0.01,
        "{} vs {want}",
        hit.prefill_ms()
    );
    assert_eq!(metric(&two, "sim_lmcache_chunks_stored_total"), 0);
    assert_eq!(metric(&two, "vllm:external_prefix_cache_hits_total"), c);
    assert_eq!(tier(&two, "remote"), c);

    // what the first sim wrote, as LMCache's redis:// connector lays it out
    let ids = Tokenizer::llama3().unwrap().encode_chat(&[
        cacheroute_sim::tokenizer::ChatMessage {
            role: "system".into(),
            content: long_text(600),
        },
        cacheroute_sim::tokenizer::ChatMessage {
            role: "user".into(),
            content: "Summarise.".into(),
        },
    ]);
    let params = KeyParams {
        hash_seed: Some("0".into()),
        ..KeyParams::new(KeyScheme::Lmcache0_3_13, HF_MODEL)
    };
    let keys: Vec<String> = chunk_keys(&params, &ids)
        .unwrap()
        .into_iter()
        .map(|k| k.key)
        .collect();
    assert_eq!(keys.len() as u64, full_chunks(n) / 256);
    let r = RedisStore::connect(&redis.url()).await.unwrap();
    assert_eq!(r.longest_present_prefix(&keys).await.unwrap(), keys.len());
    let chunk = r.get_chunk(&keys[0]).await.unwrap().unwrap();
    let meta = RemoteMetadata::from_bytes(&chunk.metadata).unwrap();
    assert_eq!(meta.shape, [2, 32, 256, 1024]);
    assert_eq!(chunk.kv_bytes.len(), 32768);

    // Redis goes away: what two loaded is in its CPU tier and still hits; other prompts
    // miss, and the errors are counted
    drop(redis);
    let r = ask(&two, "/v1/chat/completions", body).await;
    assert_eq!(r.cached(), c);
    assert_eq!(tier(&two, "cpu"), c);
    let other = json!({"max_tokens": 2,
        "messages": [{"role": "user", "content": long_text(400)}]});
    let r = ask(&two, "/v1/chat/completions", other).await;
    assert_eq!(r.cached(), 0);
    assert!(metric(&two, "sim_kv_store_errors_total") >= 1);
    one.stop().await;
    two.stop().await;
}
