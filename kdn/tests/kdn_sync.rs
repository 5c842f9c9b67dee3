//! What gateways sync from: the versioned snapshot (ETag / If-None-Match), the list with
//! keys, the KDN id, and membership heartbeats to gateways that start late or restart.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Router;
use bytes::Bytes;
use cacheroute_kdn::keys::RemoteMetadata;
use cacheroute_kdn::spawn_kdn;
use cacheroute_kdn::store::{named_memory_store, Chunk, KvStore};
use common::*;
use serde_json::{json, Value};
use tokio::sync::oneshot;

const CHUNK: usize = 16;

fn chunk(i: usize) -> Chunk {
    let meta = RemoteMetadata::kv_2ltd("bfloat16", 32, CHUNK, 1024).unwrap();
    Chunk {
        kv_bytes: Bytes::from((0..256).map(|j| (i * 7 + j) as u8).collect::<Vec<_>>()),
        metadata: Bytes::copy_from_slice(&meta.to_bytes()),
    }
}

/// `GET /v1/knowledge/snapshot`, optionally with `If-None-Match`: (status, ETag, body).
async fn snapshot(
    client: &reqwest::Client,
    base: &str,
    if_none_match: Option<&str>,
) -> (u16, String, String) {
    let mut req = client.get(format!("{base}/v1/knowledge/snapshot"));
    if let Some(tag) = if_none_match {
        req = req.header("If-None-Match", tag);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let etag = resp
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, etag, resp.text().await.unwrap())
}

async fn etag(client: &reqwest::Client, base: &str) -> String {
    let (status, etag, _) = snapshot(client, base, None).await;
    assert_eq!(status, 200);
    etag
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_versions_follow_registry_changes() {
    let mut cfg = config("memory://kdn-sync-reg", "memory://kdn-sync-store");
    cfg.kdn.id = Some("kdn-sync-1".into());
    cfg.models.push(model("m16", CHUNK, None));
    cfg.targets
        .push(target("t", "memory://kdn-sync-target", None));
    let kdn = spawn_kdn(cfg).await.unwrap();
    let base = kdn.url();
    let client = http();

    // empty registry: a quoted <epoch>-<counter> tag, equal to the body's version
    let (status, tag0, body) = snapshot(&client, &base, None).await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["object"], "knowledge.snapshot");
    assert_eq!(body["kdn_id"], "kdn-sync-1");
    assert_eq!(body["blocks"], json!([]));
    assert_eq!(tag0, format!("\"{}\"", body["version"].as_str().unwrap()));
    let (epoch, counter) = body["version"].as_str().unwrap().split_once('-').unwrap();
    assert_eq!(epoch.len(), 8, "{body}");
    counter.parse::<u64>().unwrap();

    // register (no producer: the warm-up fails); the tag changes
    let text = knowledge_text("Snapshot harbor", 120);
    let a = call(
        client
            .post(format!("{base}/v1/knowledge?wait=true"))
            .json(&json!({
                "text": text, "id": "blk-1", "title": "Harbor", "tags": ["sea", "port"]
            })),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.body["models"]["m16"]["status"], "failed", "{}", a.body);
    let tag1 = etag(&client, &base).await;
    assert_ne!(tag1, tag0);

    // reads do not change it
    for path in [
        "/v1/knowledge",
        "/v1/knowledge/blk-1",
        "/v1/knowledge/search?q=harbor",
        "/v1/load",
    ] {
        assert_eq!(call(client.get(format!("{base}{path}"))).await.status, 200);
    }
    assert_eq!(etag(&client, &base).await, tag1);

    // If-None-Match: the current tag → 304 with an empty body; another → 200, full
    let (status, tag, body) = snapshot(&client, &base, Some(&tag1)).await;
    assert_eq!(status, 304);
    assert!(body.is_empty(), "{body:?}");
    assert_eq!(tag, tag1);
    let (status, _, body) = snapshot(&client, &base, Some(&format!("W/{tag1}"))).await;
    assert_eq!((status, body.as_str()), (304, ""));
    let (status, tag, body) = snapshot(&client, &base, Some(&tag0)).await;
    assert_eq!(status, 200);
    assert_eq!(tag, tag1);
    let body: Value = serde_json::from_str(&body).unwrap();
    let blocks = body["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 1, "{body}");
    let b = &blocks[0];
    assert_eq!(b["id"], "blk-1");
    assert_eq!(b["text"].as_str().unwrap(), text);
    assert_eq!(b["title"], "Harbor");
    assert_eq!(b["tags"], json!(["sea", "port"]));
    let m = &b["models"]["m16"];
    for field in [
        "status",
        "tokens",
        "chunks",
        "chunk_size",
        "bytes",
        "resident",
    ] {
        assert!(!m[field].is_null(), "{field} missing: {m}");
    }
    assert_eq!(m["chunk_size"], CHUNK);
    assert!(m["content"].as_str().unwrap().contains(&text[..40]), "{m}");
    assert!(m.get("keys").is_none(), "{m}");
    let (status, _, _) = snapshot(&client, &base, Some("\"nope-0\"")).await;
    assert_eq!(status, 200);

    // the list shows chunk keys only with ?keys=1
    let a = call(client.get(format!("{base}/v1/knowledge"))).await;
    assert!(a.body["data"][0]["models"]["m16"].get("keys").is_none());
    let a = call(client.get(format!("{base}/v1/knowledge?keys=1"))).await;
    let keys: Vec<String> = a.body["data"][0]["models"]["m16"]["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), m["chunks"].as_u64().unwrap() as usize);
    assert!(keys.iter().all(|k| k.contains("@")), "{keys:?}");

    // warm status change failed → kv_ready
    let store = named_memory_store("kdn-sync-store");
    let items: Vec<(String, Chunk)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), chunk(i)))
        .collect();
    store.put_chunks(&items).await.unwrap();
    let a = call(client.post(format!("{base}/v1/knowledge/blk-1/warm?wait=true"))).await;
    assert_eq!(a.body["models"]["m16"]["status"], "kv_ready", "{}", a.body);
    let tag2 = etag(&client, &base).await;
    assert_ne!(tag2, tag1);
    let (status, _, _) = snapshot(&client, &base, Some(&tag1)).await;
    assert_eq!(status, 200);

    // registering the same block again changes nothing
    let a = call(
        client
            .post(format!("{base}/v1/knowledge"))
            .json(&json!({"text": text, "id": "blk-1"})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(etag(&client, &base).await, tag2);

    // an injection adds the target to `resident`
    let a = call(client.post(format!("{base}/v1/inject")).json(&json!({
        "knowledge_ids": ["blk-1"], "model": "m16", "target": "t", "wait": true
    })))
    .await;
    assert_eq!(a.body["status"], "done", "{}", a.body);
    let (_, tag3, body) = snapshot(&client, &base, Some(&tag2)).await;
    assert_ne!(tag3, tag2);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["blocks"][0]["models"]["m16"]["resident"], json!(["t"]));

    // the static route wins over /v1/knowledge/{id}; such ids are refused
    let a = call(
        client
            .post(format!("{base}/v1/knowledge"))
            .json(&json!({"text": "x", "id": "snapshot"})),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "invalid_id");
    assert_eq!(etag(&client, &base).await, tag3);

    // delete
    let a = call(client.delete(format!("{base}/v1/knowledge/blk-1"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let (status, tag4, body) = snapshot(&client, &base, Some(&tag3)).await;
    assert_eq!(status, 200);
    assert_ne!(tag4, tag3);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["blocks"], json!([]));

    let a = call(client.get(format!("{base}/v1/load"))).await;
    assert_eq!(a.body["kdn_id"], "kdn-sync-1");
    kdn.stop().await;

    // a new KDN on the same registry data starts another epoch: old tags never match
    let mut cfg = config("memory://kdn-sync-reg", "memory://kdn-sync-store");
    cfg.models.push(model("m16", CHUNK, None));
    let kdn = spawn_kdn(cfg).await.unwrap();
    let (status, tag, body) = snapshot(&client, &kdn.url(), Some(&tag4)).await;
    assert_eq!(status, 200);
    assert_ne!(tag, tag4);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["kdn_id"], format!("kdn@{}", kdn.addr));
    kdn.stop().await;
}

/// One request a fake gateway received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    auth: Option<String>,
    body: Value,
}

#[derive(Default)]
struct FakeGateway {
    seen: Mutex<Vec<Seen>>,
    /// POSTs answered 503 before the first 200.
    refuse_first: Mutex<usize>,
}

async fn record(
    State(gw): State<Arc<FakeGateway>>,
    method: axum::http::Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    gw.seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        auth: headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string()),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    let mut refuse = gw.refuse_first.lock().unwrap();
    if method == axum::http::Method::POST && *refuse > 0 {
        *refuse -= 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    StatusCode::OK
}

/// A fake gateway serving on `addr` until the sender fires.
async fn start_gateway(
    addr: SocketAddr,
    refuse_first: usize,
) -> (
    Arc<FakeGateway>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let gw = Arc::new(FakeGateway {
        refuse_first: Mutex::new(refuse_first),
        ..FakeGateway::default()
    });
    let app = Router::new().fallback(record).with_state(gw.clone());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (gw, tx, task)
}

/// Wait (up to 20 s) until `gw` saw `n` POSTs; returns them.
async fn posts(gw: &FakeGateway, n: usize) -> Vec<Seen> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p: Vec<Seen> = gw
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == "POST")
            .cloned()
            .collect();
        if p.len() >= n {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} POSTs after 20 s",
            p.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_survives_gateway_start_order_and_restarts() {
    // a free port for the gateway, not listening yet
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = config(
        "memory://kdn-sync-member-reg",
        "memory://kdn-sync-member-store",
    );
    cfg.kdn.id = Some("kdn-member-1".into());
    cfg.kdn.gateways = vec![format!("http://{addr}/")];
    cfg.kdn.gateway_token = "sekret".into();
    cfg.kdn.advertise_url = Some("http://kdn.example:9101".into());
    cfg.kdn.heartbeat_s = 0.1;
    let kdn = spawn_kdn(cfg).await.unwrap();
    // a few heartbeats hit the closed port and count as failed
    let deadline = Instant::now() + Duration::from_secs(20);
    while kdn
        .kdn
        .metrics
        .heartbeats
        .with_label_values(&["error"])
        .get()
        < 2
    {
        assert!(Instant::now() < deadline, "no failed heartbeat after 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        kdn.kdn.metrics.heartbeats.with_label_values(&["ok"]).get(),
        0
    );

    // the gateway comes up after the KDN, and refuses twice (503) before accepting
    let (gw, stop_gw, task) = start_gateway(addr, 2).await;
    let seen = posts(&gw, 3).await;
    for s in &seen {
        assert_eq!(s.path, "/v1/members");
        assert_eq!(s.auth.as_deref(), Some("Bearer sekret"));
        assert_eq!(s.body["kind"], "kdn");
        assert_eq!(s.body["id"], "kdn-member-1");
        assert_eq!(s.body["url"], "http://kdn.example:9101");
        let ttl = s.body["ttl_s"].as_f64().unwrap();
        assert!((ttl - 0.3).abs() < 1e-9, "{ttl}");
    }
    // it keeps heartbeating after a success
    posts(&gw, 5).await;

    // the gateway restarts (a new process: nothing remembered)
    let _ = stop_gw.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("fake gateway stops")
        .unwrap();
    let (gw2, stop_gw2, task2) = start_gateway(addr, 0).await;
    let seen = posts(&gw2, 2).await;
    assert_eq!(seen[0].body["id"], "kdn-member-1");

    // stopping the KDN deregisters it
    kdn.stop().await;
    let deletes: Vec<Seen> = gw2
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "DELETE")
        .cloned()
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0].path, "/v1/members/kdn/kdn-member-1");
    assert_eq!(deletes[0].auth.as_deref(), Some("Bearer sekret"));
    let _ = stop_gw2.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task2).await;
}

#[tokio::test]
async fn no_gateways_no_heartbeats_and_default_id() {
    let cfg = config("memory://kdn-sync-solo-reg", "memory://kdn-sync-solo-store");
    let kdn = spawn_kdn(cfg).await.unwrap();
    let a = call(http().get(format!("{}/v1/load", kdn.url()))).await;
    assert_eq!(a.body["kdn_id"], format!("kdn@{}", kdn.addr));
    kdn.stop().await;
}
