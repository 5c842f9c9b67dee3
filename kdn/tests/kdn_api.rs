//! The KDN's HTTP API against real redis-servers: failures during injection, restarts,
//! bad input, deduplication, the queue, load, deletion, search and the client CLI.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cacheroute_kdn::client_cli::{run_knowledge, KnowledgeArgs};
use cacheroute_kdn::keys::{redis_kv_bytes_key, RemoteMetadata};
use cacheroute_kdn::store::{named_memory_store, open_store, Chunk, KvStore};
use cacheroute_kdn::{spawn_kdn, KdnHandle};
use clap::Parser;
use common::*;
use serde_json::{json, Value};

const CHUNK: usize = 16;

fn chunk(i: usize, len: usize) -> Chunk {
    let meta = RemoteMetadata::kv_2ltd("bfloat16", 32, CHUNK, 1024).unwrap();
    Chunk {
        kv_bytes: Bytes::from((0..len).map(|j| (i * 31 + j) as u8).collect::<Vec<_>>()),
        metadata: Bytes::copy_from_slice(&meta.to_bytes()),
    }
}

fn keys_of(record: &Value, model: &str) -> Vec<String> {
    record["models"][model]["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

/// Register `text` for model "m16" (no producer: the warm-up fails), put its chunks into
/// the KDN store by hand, warm again: kv_ready. Returns (id, keys).
async fn ready_block(
    base: &str,
    client: &reqwest::Client,
    text: &str,
    title: &str,
    kdn_store: &dyn KvStore,
    blob: usize,
) -> (String, Vec<String>) {
    let a = call(
        client
            .post(format!("{base}/v1/knowledge?wait=true"))
            .json(&json!({"text": text, "title": title})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let id = a.body["id"].as_str().unwrap().to_string();
    let m = &a.body["models"]["m16"];
    assert_eq!(m["status"], "failed", "{}", a.body);
    assert!(
        m["error"].as_str().unwrap().contains("no producer"),
        "{}",
        a.body
    );
    let a = call(client.get(format!("{base}/v1/knowledge/{id}?keys=true"))).await;
    let keys = keys_of(&a.body, "m16");
    let items: Vec<(String, Chunk)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), chunk(i, blob)))
        .collect();
    kdn_store.put_chunks(&items).await.unwrap();
    let a = call(client.post(format!("{base}/v1/knowledge/{id}/warm?wait=true"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["models"]["m16"]["status"], "kv_ready", "{}", a.body);
    (id, keys)
}

fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    let e = &a.body["error"];
    assert_eq!(e["code"], code, "{}", a.body);
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        a.body
    );
    assert!(e["type"].as_str().is_some(), "{}", a.body);
}

async fn wait_job(client: &reqwest::Client, base: &str, job: &str) -> Value {
    let a = call(client.get(format!("{base}/v1/inject/{job}?wait_ms=60000"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body
}

/// Start an injection of a 2-second (shaped) block, kill one Redis once some chunks are
/// done, and return the finished job.
async fn inject_and_kill(kill_source: bool) {
    let mut source = RedisServer::start();
    let mut dest = RedisServer::start();
    let mut cfg = config(
        &format!("memory://kdn-api-kill-{kill_source}"),
        &source.url(),
    );
    cfg.models.push(model("m16", CHUNK, None));
    // 2 MiB logical per chunk at 0.5 Gb/s: about 34 ms per chunk
    cfg.targets.push(target("slow", &dest.url(), Some(0.5)));
    let kdn = spawn_kdn(cfg).await.unwrap();
    let base = kdn.url();
    let client = http();
    let src = open_store(&source.url()).await.unwrap();
    let text = knowledge_text("Kill switch", 420);
    let (id, keys) = ready_block(&base, &client, &text, "k", src.as_ref(), 64 << 10).await;
    let total = keys.len() as u64;
    assert!(total >= 40, "{total} chunks");

    let a = call(client.post(format!("{base}/v1/inject")).json(&json!({
        "knowledge_ids": [id], "model": "m16", "target": "slow"
    })))
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let job = a.body["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = call(client.get(format!("{base}/v1/inject/{job}"))).await;
        if a.body["chunks_done"].as_u64().unwrap() >= 8 {
            assert_eq!(a.body["status"], "running");
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {}", a.body);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if kill_source {
        source.kill();
    } else {
        dest.kill();
    }
    let v = wait_job(&client, &base, &job).await;
    assert_eq!(v["status"], "failed", "{v}");
    let err = v["error"].as_str().unwrap();
    let done = v["chunks_done"].as_u64().unwrap();
    assert!(done >= 8 && done < total, "{v}");
    if kill_source {
        assert!(err.contains("reading the KDN store"), "{err}");
        // the target holds exactly the reported chunks, each whole
        let dst = open_store(&dest.url()).await.unwrap();
        assert_eq!(
            dst.longest_present_prefix(&keys).await.unwrap() as u64,
            done
        );
        let mut conn = redis::Client::open(dest.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let metas: Vec<String> = redis::cmd("KEYS")
            .arg("*metadata")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            metas.len() as u64,
            done,
            "no chunk beyond the reported ones"
        );
        for k in &keys[..done as usize] {
            let n: i64 = redis::cmd("EXISTS")
                .arg(redis_kv_bytes_key(k))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(n, 1, "{k}: metadata without kv_bytes");
        }
    } else {
        assert!(err.contains("writing to target slow"), "{err}");
    }
    eprintln!("{}: {err}", if kill_source { "source" } else { "target" });
    // not resident, nothing left running
    let a = call(client.get(format!("{base}/v1/knowledge/{id}"))).await;
    assert_eq!(a.body["models"]["m16"]["resident"], json!([]));
    let a = call(client.get(format!("{base}/v1/load"))).await;
    assert_eq!(a.body["active_transfers"], 0, "{}", a.body);
    assert_eq!(a.body["pending_jobs"], 0, "{}", a.body);
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("cacheroute_kdn_injection_jobs_total{result=\"failed\"} 1"));
    kdn.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_redis_stopped_during_an_injection() {
    inject_and_kill(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kdn_store_redis_stopped_during_an_injection() {
    inject_and_kill(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_kdn_serves_its_registry() {
    let registry = RedisServer::start();
    let mut cfg = config(&registry.url(), "memory://kdn-api-restart-store");
    cfg.models.push(model("m16", CHUNK, None));
    cfg.targets
        .push(target("t", "memory://kdn-api-restart-target", None));
    let kdn = spawn_kdn(cfg.clone()).await.unwrap();
    let base = kdn.url();
    let client = http();
    let store = named_memory_store("kdn-api-restart-store");
    let (ready, _) = ready_block(
        &base,
        &client,
        &knowledge_text("Volcanoes of Iceland", 120),
        "volcanoes",
        &store,
        256,
    )
    .await;
    let bulk = [
        json!({"id": "lighthouses", "text": knowledge_text("Lighthouses", 60), "tags": ["sea"]}),
        json!({"id": "orchids", "text": knowledge_text("Orchids", 60), "title": "Orchids"}),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n");
    let a = call(
        client
            .post(format!("{base}/v1/knowledge/bulk?wait=true"))
            .body(bulk),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["data"].as_array().unwrap().len(), 2);
    let a = call(client.post(format!("{base}/v1/inject")).json(&json!({
        "knowledge_ids": [ready], "model": "m16", "target": "t", "wait": true
    })))
    .await;
    assert_eq!(a.body["status"], "done", "{}", a.body);
    let before = call(client.get(format!("{base}/v1/knowledge?content=true"))).await;
    assert_eq!(before.body["data"].as_array().unwrap().len(), 3);
    kdn.stop().await;

    let kdn = spawn_kdn(cfg).await.unwrap();
    let base = kdn.url();
    let after = call(client.get(format!("{base}/v1/knowledge?content=true"))).await;
    assert_eq!(before.body, after.body, "the registry survives a restart");
    let a = call(client.get(format!("{base}/v1/knowledge/{ready}"))).await;
    assert_eq!(a.body["models"]["m16"]["status"], "kv_ready");
    assert_eq!(a.body["models"]["m16"]["resident"], json!(["t"]));
    let a = call(client.get(format!("{base}/v1/knowledge/search?q=orchids"))).await;
    assert_eq!(a.body["data"][0]["id"], "orchids", "{}", a.body);
    // and it still injects what it had
    let a = call(client.post(format!("{base}/v1/inject")).json(&json!({
        "knowledge_ids": [ready], "model": "m16",
        "target": "memory://kdn-api-restart-other", "wait": true
    })))
    .await;
    assert_eq!(a.body["status"], "done", "{}", a.body);
    kdn.stop().await;
}

async fn registry_len(url: &str) -> i64 {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("HLEN")
        .arg("cacheroute:kdn:knowledge")
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_nothing_is_half_registered() {
    let registry = RedisServer::start();
    let mut cfg = config(&registry.url(), "memory://kdn-api-bad-store");
    cfg.kdn.max_text_bytes = 4096;
    cfg.models.push(model("m16", CHUNK, None));
    cfg.models.push(model("m32", 32, None));
    let kdn = spawn_kdn(cfg).await.unwrap();
    let base = kdn.url();
    let client = http();
    let post = |body: String| {
        client
            .post(format!("{base}/v1/knowledge"))
            .header("content-type", "application/json")
            .body(body)
    };
    let a = call(post(r#"{"id": "dup", "text": "The first text."}"#.into())).await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.body["models"].as_object().unwrap().len(), 2);

    let cases: Vec<(String, u16, &str)> = vec![
        (r#"{"text": ""}"#.into(), 400, "text_empty"),
        (r#"{"text": " \r\n\t "}"#.into(), 400, "text_empty"),
        (
            r#"{"text": "x", "models": ["nope"]}"#.into(),
            400,
            "unknown_model",
        ),
        (
            r#"{"text": "x", "models": ["m16", "nope"]}"#.into(),
            400,
            "unknown_model",
        ),
        (r#"{"text": "x", "models": []}"#.into(), 400, "no_models"),
        (
            json!({"text": "a ".repeat(2500)}).to_string(),
            413,
            "text_too_large",
        ),
        ("x".repeat(6 * 4096 + (64 << 10) + 1), 413, "body_too_large"),
        ("{not json".into(), 400, "invalid_json"),
        ("".into(), 400, "invalid_json"),
        ("[1, 2]".into(), 400, "invalid_registration"),
        (r#"{"text": 5}"#.into(), 400, "invalid_registration"),
        (
            r#"{"title": "no text"}"#.into(),
            400,
            "invalid_registration",
        ),
        (
            r#"{"text": "x", "colour": "red"}"#.into(),
            400,
            "invalid_registration",
        ),
        (
            r#"{"text": "x", "id": "bad id!"}"#.into(),
            400,
            "invalid_id",
        ),
        (r#"{"text": "x", "tags": [""]}"#.into(), 400, "invalid_tags"),
        (r#"{"text": "x", "meta": 3}"#.into(), 400, "invalid_meta"),
        (
            r#"{"id": "dup", "text": "Another text."}"#.into(),
            409,
            "id_conflict",
        ),
    ];
    for (body, status, code) in &cases {
        let a = call(post(body.clone())).await;
        assert_error(&a, *status, code);
    }
    // bulk: one bad line refuses every line
    let bulk = |lines: Vec<String>| {
        client
            .post(format!("{base}/v1/knowledge/bulk"))
            .body(lines.join("\n"))
    };
    let good = json!({"id": "new-1", "text": "A good block."}).to_string();
    let a = call(bulk(vec![
        good.clone(),
        json!({"text": "x", "models": ["nope"]}).to_string(),
    ]))
    .await;
    assert_error(&a, 400, "unknown_model");
    assert!(a.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("line 2"));
    let a = call(bulk(vec![good.clone(), "".into(), "{oops".into()])).await;
    assert_error(&a, 400, "invalid_json");
    assert!(a.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("line 3"));
    let a = call(bulk(vec![
        good.clone(),
        json!({"id": "dup", "text": "Changed."}).to_string(),
    ]))
    .await;
    assert_error(&a, 409, "id_conflict");
    let a = call(bulk(vec![good.clone(), good.clone()])).await;
    assert_error(&a, 400, "duplicate_id");
    let a = call(bulk(vec![])).await;
    assert_error(&a, 400, "no_knowledge");

    // only the first block exists, in memory and in Redis
    let a = call(client.get(format!("{base}/v1/knowledge"))).await;
    let ids: Vec<&str> = a.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["dup"]);
    assert_eq!(a.body["object"], "list");
    assert_eq!(a.body["data"][0]["text"], "The first text.");
    assert_eq!(registry_len(&registry.url()).await, 1);

    // inject and other endpoints
    let inject = |body: Value| client.post(format!("{base}/v1/inject")).json(&body);
    let a = call(inject(
        json!({"knowledge_ids": ["zzz"], "model": "m16", "target": "memory://x"}),
    ))
    .await;
    assert_error(&a, 404, "knowledge_not_found");
    let a = call(inject(
        json!({"knowledge_ids": ["dup"], "model": "nope", "target": "memory://x"}),
    ))
    .await;
    assert_error(&a, 400, "unknown_model");
    let a = call(inject(
        json!({"knowledge_ids": ["dup"], "model": "m16", "target": "pool-z"}),
    ))
    .await;
    assert_error(&a, 400, "unknown_target");
    let a = call(inject(
        json!({"knowledge_ids": ["dup"], "model": "m16", "target": "memory://x"}),
    ))
    .await;
    assert_error(&a, 409, "not_kv_ready");
    assert!(a.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no producer"));
    let a = call(inject(
        json!({"knowledge_ids": [], "model": "m16", "target": "memory://x"}),
    ))
    .await;
    assert_error(&a, 400, "no_knowledge");
    let a = call(inject(json!({"ids": ["dup"]}))).await;
    assert_error(&a, 400, "invalid_inject_request");
    let a = call(client.get(format!("{base}/v1/inject/inj-0-0"))).await;
    assert_error(&a, 404, "job_not_found");
    let a = call(client.get(format!("{base}/v1/knowledge/search"))).await;
    assert_error(&a, 400, "missing_query");
    let a = call(client.get(format!("{base}/v1/knowledge/nope"))).await;
    assert_error(&a, 404, "knowledge_not_found");
    let a = call(client.delete(format!("{base}/v1/knowledge/nope"))).await;
    assert_error(&a, 404, "knowledge_not_found");
    let a = call(client.get(format!("{base}/v2/whatever"))).await;
    assert_error(&a, 404, "no_route");
    let a = call(client.get(format!("{base}/health"))).await;
    assert_eq!(a.body["status"], "ok");
    let a = call(client.get(format!("{base}/v1/models"))).await;
    assert_eq!(a.body["data"][1]["chunk_size"], 32);
    kdn.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dedup_queue_load_search_and_delete() {
    let mut cfg = config("memory://kdn-api-queue-reg", "memory://kdn-api-queue-store");
    cfg.kdn.max_concurrent_injections = 1;
    cfg.kdn.max_queue = 1;
    cfg.models.push(model("m16", CHUNK, None));
    // 2 MiB logical per chunk at 0.2 Gb/s: 80 ms per chunk, so A's job (a second or
    // more) is surely still running while the next requests arrive, even on a
    // loaded machine (at 20 ms per chunk that window was ~300 ms)
    cfg.targets
        .push(target("slow", "memory://kdn-api-queue-target", Some(0.2)));
    let kdn = spawn_kdn(cfg).await.unwrap();
    let base = kdn.url();
    let client = http();
    let store = named_memory_store("kdn-api-queue-store");
    let mut blocks = Vec::new();
    for (topic, title) in [
        ("Glaciers of Patagonia", "glaciers"),
        ("Steam engines of Manchester", "engines"),
        ("Coral reefs of Belize", "reefs"),
    ] {
        blocks.push(
            ready_block(
                &base,
                &client,
                &knowledge_text(topic, 150),
                title,
                &store,
                128,
            )
            .await,
        );
    }
    let inject = |id: &str| {
        client.post(format!("{base}/v1/inject")).json(&json!({
            "knowledge_ids": [id], "model": "m16", "target": "slow"
        }))
    };
    let j1 = call(inject(&blocks[0].0)).await;
    assert_eq!(j1.status, 202, "{}", j1.body);
    let j2 = call(inject(&blocks[0].0)).await;
    assert_eq!(j2.status, 202, "{}", j2.body);
    assert_eq!(j2.body["knowledge"][0]["deduplicated"], true, "{}", j2.body);
    let j3 = call(inject(&blocks[1].0)).await;
    assert_eq!(j3.status, 202, "{}", j3.body);
    let j4 = call(inject(&blocks[2].0)).await;
    assert_error(&j4, 503, "queue_full");
    let load = call(client.get(format!("{base}/v1/load"))).await.body;
    assert_eq!(
        load["pending_transfers"].as_u64().unwrap() + load["active_transfers"].as_u64().unwrap(),
        2,
        "{load}"
    );
    assert!(load["backlog_bytes"].as_u64().unwrap() > 0, "{load}");
    assert_eq!(load["targets"]["slow"]["link_gbps"], 0.2);
    assert!(load["pending_jobs"].as_u64().unwrap() + load["active_jobs"].as_u64().unwrap() >= 2);
    let mut results = Vec::new();
    for j in [&j1, &j2, &j3] {
        results.push(wait_job(&client, &base, j.body["id"].as_str().unwrap()).await);
    }
    for r in &results {
        assert_eq!(r["status"], "done", "{r}");
    }
    // the shared transfer was copied once, at the emulated link's speed
    let moved = results[0]["bytes_moved"].as_u64().unwrap();
    assert_eq!(moved, results[1]["bytes_moved"].as_u64().unwrap());
    let bw = results[0]["knowledge"][0]["bandwidth_bytes_per_s"]
        .as_f64()
        .unwrap();
    assert!(bw > 0.0 && bw <= 0.2e9 / 8.0 * 1.05, "{bw}");
    // B waited for A's worker
    assert!(
        results[2]["queue_wait_ms"].as_f64().unwrap() > 10.0,
        "{}",
        results[2]
    );
    let target = named_memory_store("kdn-api-queue-target");
    let written = target.chunk_count();
    let union: std::collections::HashSet<&String> =
        blocks[0].1.iter().chain(blocks[1].1.iter()).collect();
    assert_eq!(written, union.len());
    // B's leading chunks (shared with A) were already there: only the rest moved
    let b = &results[2]["knowledge"][0];
    assert!(b["chunks_skipped"].as_u64().unwrap() > 0, "{b}");
    assert_eq!(b["chunks_done"], b["chunks_total"]);
    let load = call(client.get(format!("{base}/v1/load"))).await.body;
    assert!(load["queue_wait_ms"].as_f64().unwrap() > 0.0, "{load}");
    assert!(
        load["bandwidth_bytes_per_s"].as_f64().unwrap() > 0.0,
        "{load}"
    );

    // search
    let a = call(client.get(format!(
        "{base}/v1/knowledge/search?q=coral%20reef%20belize&k=2"
    )))
    .await;
    assert_eq!(a.body["data"][0]["title"], "reefs", "{}", a.body);
    assert!(a.body["data"][0]["score"].as_f64().unwrap() > 0.0);

    // delete: the block's chunks leave the KDN store, the others stay
    let (id0, keys0) = &blocks[0];
    let a = call(client.delete(format!("{base}/v1/knowledge/{id0}"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // chunks shared with other blocks (the template head and preamble fill the first
    // 16-token chunks of every block) stay
    let others: std::collections::HashSet<&String> =
        blocks[1].1.iter().chain(blocks[2].1.iter()).collect();
    let own: Vec<&String> = keys0.iter().filter(|k| !others.contains(k)).collect();
    assert!(own.len() < keys0.len(), "the first chunks are shared");
    assert_eq!(
        a.body["kv_chunks_deleted"].as_u64().unwrap() as usize,
        own.len()
    );
    for k in keys0 {
        assert_eq!(store.exists(k).await.unwrap(), others.contains(k), "{k}");
    }
    let keys1 = &blocks[1].1;
    assert_eq!(
        store.longest_present_prefix(keys1).await.unwrap(),
        keys1.len()
    );
    let a = call(client.get(format!("{base}/v1/knowledge/{id0}"))).await;
    assert_error(&a, 404, "knowledge_not_found");
    let a = call(client.get(format!("{base}/v1/knowledge/search?q=patagonia"))).await;
    assert!(a.body["data"].as_array().unwrap().is_empty(), "{}", a.body);
    kdn.stop().await;
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    knowledge: KnowledgeArgs,
}

async fn cli(kdn: &KdnHandle, args: &[&str]) -> anyhow::Result<()> {
    let mut argv = vec!["knowledge", "--kdn"];
    let url = kdn.url();
    argv.push(&url);
    argv.extend_from_slice(args);
    run_knowledge(Cli::try_parse_from(argv)?.knowledge).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowledge_cli_round_trip() {
    let mut cfg = config("memory://kdn-api-cli-reg", "memory://kdn-api-cli-store");
    cfg.models.push(model("m16", CHUNK, None));
    cfg.targets
        .push(target("t", "memory://kdn-api-cli-target", None));
    let kdn = spawn_kdn(cfg).await.unwrap();
    let dir = std::env::temp_dir().join(format!("kdn-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jsonl = dir.join("k.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{}\n{}\n",
            json!({"id": "alps", "text": "The Alps are a mountain range.", "title": "Alps"}),
            json!({"id": "nile", "text": "The Nile is a river in Africa."}),
        ),
    )
    .unwrap();
    cli(
        &kdn,
        &[
            "register",
            "--text",
            "Paris is the capital of France.",
            "--id",
            "paris",
            "--tag",
            "geo",
            "--wait",
        ],
    )
    .await
    .unwrap();
    cli(
        &kdn,
        &[
            "register",
            "--jsonl",
            jsonl.to_str().unwrap(),
            "--model",
            "m16",
        ],
    )
    .await
    .unwrap();
    cli(&kdn, &["list"]).await.unwrap();
    cli(&kdn, &["--json", "list", "--model", "m16"])
        .await
        .unwrap();
    cli(&kdn, &["show", "alps", "--keys"]).await.unwrap();
    cli(&kdn, &["search", "river", "africa"]).await.unwrap();
    let e = cli(
        &kdn,
        &["inject", "paris", "--model", "m16", "--target", "t"],
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("not kv_ready") && e.to_string().contains("HTTP 409"),
        "{e}"
    );
    cli(&kdn, &["delete", "nile"]).await.unwrap();
    let e = cli(&kdn, &["show", "nile"]).await.unwrap_err();
    assert!(e.to_string().contains("not found (HTTP 404)"), "{e}");
    let e = cli(&kdn, &["register", "--text", " "]).await.unwrap_err();
    assert!(e.to_string().contains("text is empty"), "{e}");
    assert_eq!(kdn.kdn.registry.len(), 2);
    let _ = Arc::strong_count(&kdn.kdn);
    let _ = std::fs::remove_dir_all(&dir);
    kdn.stop().await;
}

/// `cacheroute kdn` / `cacheroute knowledge` as the binary declares them.
#[derive(Parser)]
struct Binary {
    #[command(subcommand)]
    command: BinaryCommand,
}

#[derive(clap::Subcommand)]
enum BinaryCommand {
    Kdn(cacheroute_kdn::KdnArgs),
    Knowledge(KnowledgeArgs),
}

#[tokio::test]
async fn preload_and_binary_arguments() {
    // the example config and the sample knowledge file
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/kdn.example.toml");
    let parsed = Binary::try_parse_from([
        "cacheroute",
        "kdn",
        "--config",
        conf.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--registry",
        "memory://kdn-api-preload",
        "--store",
        "memory://kdn-api-preload-store",
    ])
    .unwrap();
    let BinaryCommand::Kdn(args) = parsed.command else {
        panic!("kdn")
    };
    let mut cfg = args.load_config().unwrap();
    assert_eq!(cfg.models[0].name, "llama3-8b");
    cfg.models[0].producer = None;
    cfg.kdn.preload = vec![
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/knowledge/sample.jsonl")
    ];
    let kdn = spawn_kdn(cfg.clone()).await.unwrap();
    assert_eq!(kdn.kdn.registry.len(), 4);
    let hits = kdn
        .kdn
        .registry
        .search("how does LMCache name chunks in redis", 1);
    assert_eq!(hits[0].0.id, "lmcache-chunks");
    kdn.stop().await;
    // preloading again skips what is registered
    let kdn = spawn_kdn(cfg).await.unwrap();
    assert_eq!(kdn.kdn.registry.len(), 4);
    kdn.stop().await;

    let parsed = Binary::try_parse_from([
        "cacheroute",
        "knowledge",
        "search",
        "kv",
        "cache",
        "--kdn",
        "http://h:1",
        "-k",
        "3",
    ])
    .unwrap();
    let BinaryCommand::Knowledge(k) = parsed.command else {
        panic!("knowledge")
    };
    assert_eq!(k.kdn, "http://h:1");
}

/// With `[kdn] token`, every write needs it and reads stay open; an unauthenticated
/// registration cannot replace a block's text; store URLs are not injection targets.
#[tokio::test]
async fn writes_need_the_token_and_targets_are_the_configured_ones() {
    let mut cfg = config("memory://kdn-api-auth", "memory://kdn-api-auth-store");
    cfg.kdn.token = "s3cret".into();
    cfg.kdn.allow_url_targets = false;
    cfg.models.push(model("m16", CHUNK, None));
    cfg.targets
        .push(target("t", "memory://kdn-api-auth-target", None));
    let kdn = spawn_kdn(cfg).await.unwrap();
    let base = kdn.url();
    let client = http();
    let register = |text: &str| {
        client
            .post(format!("{base}/v1/knowledge"))
            .json(&json!({"id": "doc", "text": text, "models": ["m16"]}))
    };
    let a = call(register("The real text.").bearer_auth("s3cret")).await;
    assert!(a.status == 200 || a.status == 201, "{}", a.body);
    for req in [
        register("An attacker's text."),
        register("An attacker's text.").bearer_auth("wrong"),
    ] {
        let a = call(req).await;
        assert_error(&a, 401, "unauthorized");
    }
    let a = call(client.delete(format!("{base}/v1/knowledge/doc"))).await;
    assert_error(&a, 401, "unauthorized");
    let a = call(client.post(format!("{base}/v1/inject")).json(&json!({
        "knowledge_ids": ["doc"], "model": "m16", "target": "t"
    })))
    .await;
    assert_error(&a, 401, "unauthorized");
    // reads are open, and the text is the real one
    let a = call(client.get(format!("{base}/v1/knowledge/doc?content=true"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.to_string().contains("The real text."), "{}", a.body);
    assert!(!a.body.to_string().contains("attacker"), "{}", a.body);
    // a store URL is refused even with the token
    let a = call(
        client
            .post(format!("{base}/v1/inject"))
            .bearer_auth("s3cret")
            .json(&json!({
                "knowledge_ids": ["doc"], "model": "m16", "target": "memory://elsewhere"
            })),
    )
    .await;
    assert_error(&a, 403, "target_not_allowed");
    kdn.stop().await;
}
