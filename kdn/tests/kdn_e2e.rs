//! End to end over real processes: redis-servers, sims with LMCache stores, the KDN.
//!
//! Register → warm up through a sim producer (whose LMCache writes into the KDN store)
//! → inject into a second sim's store → a chat request whose prompt starts with that
//! knowledge hits every knowledge chunk there and answers sooner than on a cold sim.

mod common;

use cacheroute_kdn::spawn_kdn;
use cacheroute_kdn::store::{KvStore, RedisStore};
use cacheroute_sim::SimArgs;
use common::*;
use serde_json::{json, Value};

async fn sim(store: &str) -> cacheroute_sim::SimHandle {
    cacheroute_sim::spawn(SimArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        model: "llama3-8b".into(),
        kv_store: Some(store.into()),
        lmcache_model: Some(LMCACHE_MODEL.into()),
        lmcache_scheme: "lmcache-0.3.15".into(),
        chunk_size: 256,
        hash_seed: "0".into(),
        kv_dtype: "bfloat16".into(),
        // the store sits beside the instance: loading its chunks costs the host-to-device
        // copy only (at the sim's default 25 Gbit/s link, 8B KV loads slower than it
        // recomputes; this test is about the KDN's injection, not that link)
        kv_store_gbps: 0.0,
        ..SimArgs::default()
    })
    .await
    .expect("sim starts")
}

/// (the TTFT the sim reports for a max_tokens=1 chat request, cached_tokens): the
/// simulated engine's time, not the wall clock, so a loaded machine cannot flip it.
async fn ask(client: &reqwest::Client, url: &str, content: &str) -> (f64, u64) {
    let body = json!({
        "model": "llama3-8b",
        "messages": [
            {"role": "system", "content": content},
            {"role": "user", "content": "Which castle overlooks the harbor?"},
        ],
        "max_tokens": 1,
    });
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    assert_eq!(resp.status().as_u16(), 200);
    let ttft: f64 = resp.headers()["x-sim-ttft-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let a: Value = resp.json().await.unwrap();
    let cached = a["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    (ttft, cached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_warm_inject_then_cache_hit_and_lower_ttft() {
    let kdn_redis = RedisServer::start();
    let instance_redis = RedisServer::start();
    let producer = sim(&kdn_redis.url()).await;
    let consumer = sim(&instance_redis.url()).await;
    let cold = sim("memory://kdn-e2e-cold").await;

    let mut cfg = config("memory://kdn-e2e-registry", &kdn_redis.url());
    cfg.models
        .push(model("llama3-8b", 256, Some(producer.url())));
    cfg.targets
        .push(target("instance-b", &instance_redis.url(), None));
    let kdn = spawn_kdn(cfg).await.expect("kdn starts");
    let base = kdn.url();
    let client = http();

    // register and warm up
    let text = knowledge_text("The Free City of Ostravia", 1800);
    let a = call(
        client
            .post(format!("{base}/v1/knowledge?wait=true"))
            .json(&json!({"text": text, "title": "Ostravia", "tags": ["geo"]})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let id = a.body["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64, "default id = sha256 hex");
    let m = &a.body["models"]["llama3-8b"];
    assert_eq!(m["status"], "kv_ready", "{}", a.body);
    let tokens = m["tokens"].as_u64().unwrap();
    let chunks = m["chunks"].as_u64().unwrap();
    assert!(chunks >= 4, "a multi-chunk block: {tokens} tokens");
    assert_eq!(tokens, chunks * 256);
    assert_eq!(m["bytes"].as_u64().unwrap(), tokens * 131072);
    let content = m["content"].as_str().unwrap().to_string();

    // the producer's LMCache wrote every chunk into the KDN store
    let a = call(client.get(format!("{base}/v1/knowledge/{id}?keys=true"))).await;
    let keys: Vec<String> = a.body["models"]["llama3-8b"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len() as u64, chunks);
    let kdn_store = RedisStore::connect(&kdn_redis.url()).await.unwrap();
    assert_eq!(
        kdn_store.longest_present_prefix(&keys).await.unwrap(),
        keys.len()
    );

    // before injection the consumer misses
    let instance_store = RedisStore::connect(&instance_redis.url()).await.unwrap();
    assert_eq!(
        instance_store.longest_present_prefix(&keys).await.unwrap(),
        0
    );

    // inject into the consumer's store
    let a = call(client.post(format!("{base}/v1/inject")).json(&json!({
        "knowledge_ids": [id],
        "model": "llama3-8b",
        "target": "instance-b",
        "wait": true,
    })))
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["status"], "done", "{}", a.body);
    assert_eq!(a.body["chunks_done"].as_u64(), Some(chunks));
    assert_eq!(a.body["bytes_moved"].as_u64(), Some(tokens * 131072));
    assert!(a.body["bandwidth_bytes_per_s"].as_f64().unwrap() > 0.0);
    let job_id = a.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        instance_store.longest_present_prefix(&keys).await.unwrap(),
        keys.len()
    );
    let a = call(client.get(format!("{base}/v1/inject/{job_id}"))).await;
    assert_eq!(a.body["status"], "done");
    let a = call(client.get(format!("{base}/v1/knowledge/{id}"))).await;
    assert_eq!(
        a.body["models"]["llama3-8b"]["resident"],
        json!(["instance-b"])
    );

    // the same chat request: a hit of every knowledge chunk on the consumer, none cold
    let (cold_ttft, cold_cached) = ask(&client, &cold.url(), &content).await;
    let (warm_ttft, warm_cached) = ask(&client, &consumer.url(), &content).await;
    assert_eq!(cold_cached, 0);
    assert_eq!(
        warm_cached, tokens,
        "cached_tokens = the knowledge's full chunks"
    );
    assert!(
        warm_ttft < cold_ttft,
        "simulated TTFT with injected KV {warm_ttft} ms should be below the cold {cold_ttft} ms"
    );
    eprintln!(
        "knowledge: {tokens} tokens ({chunks} chunks); simulated TTFT cold {cold_ttft:.1} ms, injected {warm_ttft:.1} ms"
    );

    // load and metrics reflect the work
    let a = call(client.get(format!("{base}/v1/load"))).await;
    assert_eq!(a.body["pending_jobs"], 0);
    assert_eq!(a.body["active_jobs"], 0);
    assert!(
        a.body["recent_bytes_per_s"].as_f64().unwrap() > 0.0,
        "{}",
        a.body
    );
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "cacheroute_kdn_knowledge_blocks{model=\"llama3-8b\",status=\"kv_ready\"} 1",
        "cacheroute_kdn_injection_jobs_total{result=\"done\"} 1",
        "cacheroute_kdn_warmups_total{model=\"llama3-8b\",result=\"kv_ready\"} 1",
        "cacheroute_kdn_injected_bytes_total{target=\"instance-b\"}",
        "cacheroute_kdn_injection_bandwidth_bytes_per_second",
        "cacheroute_kdn_injection_queue_length 0",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }

    // a second registration of the same text is idempotent (200, same id, still ready)
    let a = call(
        client
            .post(format!("{base}/v1/knowledge"))
            .json(&json!({"text": format!("  {text}\r\n")})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["id"], Value::String(id.clone()));
    assert_eq!(a.body["models"]["llama3-8b"]["status"], "kv_ready");

    kdn.stop().await;
    producer.stop().await;
    consumer.stop().await;
    cold.stop().await;
}
