//! The KDN's bounds (issue 13): the registration rate (429 with Retry-After), the
//! registry size (507), warm-ups that cannot flood a producer (a bounded queue, the rest
//! `deferred`, at most `max_concurrent_warmups` prefills at once), deletes that free the
//! KDN store's and memory targets' chunks, and deletes that cost O(their block).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use cacheroute_kdn::keys::RemoteMetadata;
use cacheroute_kdn::spawn_kdn;
use cacheroute_kdn::store::{named_memory_store, Chunk, KvStore};
use common::*;
use serde_json::{json, Value};
use tokio::sync::watch;

/// Poll `f` until it holds (the condition is what the test waits for, not a delay).
async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..3000 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn jsonl(n: usize, prefix: &str) -> String {
    (0..n)
        .map(|i| {
            json!({"id": format!("{prefix}-{i}"), "text": knowledge_text(&format!("{prefix} {i}"), 20)})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_past_the_rate_get_429_and_the_registry_is_bounded() {
    let mut cfg = config("memory://bounds-rate-reg", "memory://bounds-rate-store");
    cfg.models = vec![model("llama3-8b", 16, None)];
    // about one token in 1000 s: nothing refills during the test
    cfg.kdn.max_registrations_per_s = 0.001;
    cfg.kdn.registration_burst = 10;
    let kdn = spawn_kdn(cfg).await.unwrap();
    let (c, base) = (http(), kdn.url());
    for i in 0..10 {
        let a = call(c.post(format!("{base}/v1/knowledge")).json(&json!({
            "id": format!("r-{i}"), "text": knowledge_text(&format!("rate {i}"), 20)
        })))
        .await;
        assert_eq!(a.status, 201, "{}", a.body);
    }
    let resp = c
        .post(format!("{base}/v1/knowledge"))
        .json(&json!({"id": "r-10", "text": "one too many"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_registrations_per_s"));
    // a bulk counts its lines; one larger than the burst can never pass
    let a = call(
        c.post(format!("{base}/v1/knowledge/bulk"))
            .body(jsonl(2, "bulk-rate")),
    )
    .await;
    assert_eq!(a.status, 429, "{}", a.body);
    let a = call(
        c.post(format!("{base}/v1/knowledge/bulk"))
            .body(jsonl(11, "bulk-big")),
    )
    .await;
    assert_eq!(a.status, 413, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "too_many_blocks");
    assert_eq!(kdn.kdn.registry.len(), 10);
    kdn.stop().await;

    // the registry size
    let mut cfg = config("memory://bounds-size-reg", "memory://bounds-size-store");
    cfg.models = vec![model("llama3-8b", 16, None)];
    cfg.kdn.max_registrations_per_s = 0.0;
    cfg.kdn.max_blocks = 3;
    let kdn = spawn_kdn(cfg).await.unwrap();
    let base = kdn.url();
    let a = call(
        c.post(format!("{base}/v1/knowledge/bulk"))
            .body(jsonl(3, "size")),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = call(
        c.post(format!("{base}/v1/knowledge"))
            .json(&json!({"text": "a fourth block"})),
    )
    .await;
    assert_eq!(a.status, 507, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "registry_full");
    assert!(a.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_blocks"));
    // registering a block it already holds adds nothing and is still answered
    let again = jsonl(1, "size");
    let a = call(c.post(format!("{base}/v1/knowledge/bulk")).body(again)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(kdn.kdn.registry.len(), 3);
    kdn.stop().await;
}

/// A producer that counts its prefills and holds them until released.
#[derive(Default)]
struct Producer {
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
    total: AtomicUsize,
}

async fn spawn_producer() -> (String, Arc<Producer>, watch::Sender<bool>) {
    let p = Arc::new(Producer::default());
    let (tx, rx) = watch::channel(false);
    async fn prefill(
        State((p, mut rx)): State<(Arc<Producer>, watch::Receiver<bool>)>,
    ) -> Json<Value> {
        let now = p.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        p.max_inflight.fetch_max(now, Ordering::SeqCst);
        p.total.fetch_add(1, Ordering::SeqCst);
        let _ = rx.wait_for(|r| *r).await;
        p.inflight.fetch_sub(1, Ordering::SeqCst);
        Json(json!({"choices": [{"text": "x"}]}))
    }
    let app = Router::new()
        .route("/v1/completions", post(prefill))
        .with_state((p.clone(), rx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, p, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmups_are_bounded_and_the_rest_deferred() {
    let (producer, p, release) = spawn_producer().await;
    let mut cfg = config("memory://bounds-warm-reg", "memory://bounds-warm-store");
    cfg.models = vec![model("llama3-8b", 16, Some(producer))];
    cfg.kdn.max_registrations_per_s = 0.0;
    cfg.kdn.max_concurrent_warmups = 2;
    cfg.kdn.max_pending_warmups = 6;
    cfg.kdn.warmup_max_share = 1.0;
    // the stub writes no KV: each warm-up fails at once after its prefill
    cfg.kdn.warmup_verify_s = 0.0;
    let kdn = spawn_kdn(cfg).await.unwrap();
    let (c, base) = (http(), kdn.url());
    let n = 200;
    let a = call(
        c.post(format!("{base}/v1/knowledge/bulk"))
            .body(jsonl(n, "warm")),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    wait_until("two prefills on the producer", async || {
        p.inflight.load(Ordering::SeqCst) == 2
    })
    .await;
    let load = call(c.get(format!("{base}/v1/load"))).await.body;
    assert_eq!(load["warmups_queued"], 8, "{load}");
    assert_eq!(load["warmups_deferred"], n - 8, "{load}");
    let list = call(c.get(format!("{base}/v1/knowledge?text=false")))
        .await
        .body;
    let deferred: Vec<&Value> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["models"]["llama3-8b"]["status"] == "deferred")
        .collect();
    assert_eq!(deferred.len(), n - 8);
    assert!(deferred[0]["models"]["llama3-8b"]["error"]
        .as_str()
        .unwrap()
        .contains("max_pending_warmups"));
    assert_eq!(p.total.load(Ordering::SeqCst), 2);
    // released, every deferred warm-up runs in turn, never more than two at once
    release.send_replace(true);
    wait_until("every warm-up finished", async || {
        let (queued, deferred) = kdn.kdn.warmup_counts();
        queued == 0 && deferred == 0
    })
    .await;
    assert_eq!(p.total.load(Ordering::SeqCst), n);
    assert_eq!(p.max_inflight.load(Ordering::SeqCst), 2);
    let list = call(c.get(format!("{base}/v1/knowledge?text=false")))
        .await
        .body;
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["models"]["llama3-8b"]["status"] == "failed"));
    kdn.stop().await;
}

fn chunk() -> Chunk {
    let meta = RemoteMetadata::kv_2ltd("bfloat16", 32, 16, 1024).unwrap();
    Chunk {
        kv_bytes: Bytes::from(vec![7u8; 256]),
        metadata: Bytes::copy_from_slice(&meta.to_bytes()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_frees_the_store_and_the_memory_targets() {
    let store_url = "memory://bounds-free-store";
    let target_url = "memory://bounds-free-target";
    let mut cfg = config("memory://bounds-free-reg", store_url);
    cfg.models = vec![model("llama3-8b", 16, None)];
    cfg.targets = vec![target("pool-m", target_url, None)];
    let kdn = spawn_kdn(cfg).await.unwrap();
    let (c, base) = (http(), kdn.url());
    let store = named_memory_store("bounds-free-store");
    let tstore = named_memory_store("bounds-free-target");
    let mut keys = Vec::new();
    for id in ["free-a", "free-b"] {
        let a = call(
            c.post(format!("{base}/v1/knowledge?wait=true"))
                .json(&json!({
                    "id": id, "text": knowledge_text(id, 60)
                })),
        )
        .await;
        assert_eq!(a.status, 201, "{}", a.body);
        let rec = call(c.get(format!("{base}/v1/knowledge/{id}?keys=true")))
            .await
            .body;
        let k: Vec<String> =
            serde_json::from_value(rec["models"]["llama3-8b"]["keys"].clone()).unwrap();
        // the KV a producer would have written
        let chunks: Vec<(String, Chunk)> = k.iter().map(|k| (k.clone(), chunk())).collect();
        store.put_chunks(&chunks).await.unwrap();
        let a = call(c.post(format!("{base}/v1/knowledge/{id}/warm?wait=true"))).await;
        assert_eq!(
            a.body["models"]["llama3-8b"]["status"], "kv_ready",
            "{}",
            a.body
        );
        let a = call(c.post(format!("{base}/v1/inject")).json(&json!({
            "knowledge_ids": [id], "model": "llama3-8b", "target": "pool-m", "wait": true
        })))
        .await;
        assert_eq!(a.body["status"], "done", "{}", a.body);
        keys.push(k);
    }
    let unique = |i: usize| {
        let other: std::collections::HashSet<&String> = keys[1 - i].iter().collect();
        keys[i].iter().filter(|k| !other.contains(k)).count()
    };
    let all: std::collections::HashSet<&String> = keys.iter().flatten().collect();
    assert_eq!(store.chunk_count(), all.len());
    assert_eq!(tstore.chunk_count(), all.len());
    assert!(
        unique(0) > 0 && unique(0) < keys[0].len(),
        "some chunks are shared"
    );

    let a = call(c.delete(format!("{base}/v1/knowledge/free-a"))).await;
    assert_eq!(a.body["kv_chunks_deleted"], unique(0), "{}", a.body);
    assert_eq!(a.body["target_chunks_deleted"], unique(0), "{}", a.body);
    // the shared chunks stay for free-b, in both stores
    assert_eq!(store.chunk_count(), keys[1].len());
    assert_eq!(tstore.chunk_count(), keys[1].len());
    let a = call(c.delete(format!("{base}/v1/knowledge/free-b"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(store.chunk_count(), 0);
    assert_eq!(tstore.chunk_count(), 0);
    assert_eq!(store.bytes_stored(), 0);
    kdn.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_cost_their_block_only() {
    let mut cfg = config("memory://bounds-del-reg", "memory://bounds-del-store");
    cfg.models = vec![model("llama3-8b", 16, None)];
    cfg.kdn.max_registrations_per_s = 0.0;
    cfg.kdn.max_pending_warmups = 2000;
    let kdn = spawn_kdn(cfg).await.unwrap();
    let (c, base) = (http(), kdn.url());
    let n = 1000;
    let started = std::time::Instant::now();
    let a = call(
        c.post(format!("{base}/v1/knowledge/bulk?wait=true"))
            .body(jsonl(n, "del")),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let registered = started.elapsed();
    wait_until("warm-ups finished", async || {
        kdn.kdn.warmup_counts() == (0, 0)
    })
    .await;
    let mut keys = 0;
    kdn.kdn.registry.for_each(|r| {
        keys += r.models.values().map(|m| m.keys.len()).sum::<usize>();
    });
    let work = kdn.kdn.registry.work();
    let started = std::time::Instant::now();
    for i in 0..n {
        let a = call(c.delete(format!("{base}/v1/knowledge/del-{i}"))).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let deleted = started.elapsed();
    let work = kdn.kdn.registry.work() - work;
    eprintln!(
        "{n} blocks ({keys} keys): registered in {:.2} s, deleted in {:.2} s ({:.0}/s); \
         registry work of the deletes: {work}",
        registered.as_secs_f64(),
        deleted.as_secs_f64(),
        n as f64 / deleted.as_secs_f64()
    );
    // each key: one reference check and one reference dropped; a scan of the other
    // blocks per delete would be n²/2 records
    assert!(work <= 2 * keys as u64, "{work} > 2 × {keys}");
    assert!(kdn.kdn.registry.is_empty());
    kdn.stop().await;
}
