//! The agent over real HTTP on 127.0.0.1: a real sim as the engine, test servers as
//! gateway and KDN, and an in-process memory:// store.

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use cacheroute_agent::{start, AgentArgs, AgentHandle};
use cacheroute_lmcache::store::{open_store, Chunk};
use cacheroute_sim::{spawn, SimArgs};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Upper bound of every wait below: generous, only there so a broken agent fails
/// instead of hanging.
const PATIENCE: Duration = Duration::from_secs(30);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A port with nothing listening on it (right now).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn args(engine: &str) -> AgentArgs {
    let mut a = AgentArgs::new(engine);
    a.listen = "127.0.0.1:0".parse().unwrap();
    a.scrape_ms = 50;
    a.heartbeat_s = 0.1;
    a.residency_ms = 50;
    a
}

async fn agent(a: AgentArgs) -> AgentHandle {
    start(a).await.expect("agent starts")
}

async fn get_json(url: String) -> Value {
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.json().await.unwrap()
}

async fn get_text(url: String) -> String {
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.text().await.unwrap()
}

/// Fetch `url` until `ok` accepts the JSON; panics with the last one after PATIENCE.
async fn poll_json(url: String, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = get_json(url.clone()).await;
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}: {v}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Value of the sample `name{labels}` (exact label text) in a metrics page.
fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn load_reflects_a_real_sim() {
    // one sequence at a time and 5x slower than real time: the requests below stay
    // running / waiting for seconds
    let sim = spawn(SimArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        model: "m".into(),
        time_scale: 0.2,
        max_num_seqs: 1,
        num_gpu_blocks: Some(256),
        ..SimArgs::default()
    })
    .await
    .unwrap();
    let a = agent(args(&format!("{}/", sim.url()))).await;
    let load_url = format!("{}/v1/load", a.url());

    let idle = poll_json(load_url.clone(), "engine up", |v| v["engine_up"] == true).await;
    assert_eq!(idle["object"], "agent.load");
    assert_eq!(idle["id"], a.id());
    assert_eq!(idle["instance"], sim.url(), "trailing slash trimmed");
    assert_eq!(idle["running"], 0);
    assert_eq!(idle["waiting"], 0);
    assert!(idle["age_ms"].as_u64().is_some(), "{idle}");
    assert_eq!(idle["resident"], json!([]));

    let url = format!("{}/v1/completions", sim.url());
    let reqs: Vec<JoinHandle<()>> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let _ = reqwest::Client::new()
                    .post(url)
                    .json(&json!({"model": "m", "prompt": "tell me a long story", "max_tokens": 2000}))
                    .send()
                    .await;
            })
        })
        .collect();

    let busy = poll_json(load_url.clone(), "1 running + 2 waiting", |v| {
        v["running"] == 1 && v["waiting"] == 2
    })
    .await;
    assert_eq!(busy["engine_up"], true);
    let kv = busy["kv_usage"].as_f64().unwrap();
    assert!(kv > 0.0 && kv <= 1.0, "{busy}");
    // tokens are being generated: the rate shows it while the first request runs
    poll_json(load_url.clone(), "generation rate", |v| {
        v["generation_tokens_per_s"].as_f64().unwrap() > 0.0
            && v["prompt_tokens_per_s"].as_f64().unwrap() >= 0.0
    })
    .await;

    // the agent's own gauges follow
    let m = get_text(format!("{}/metrics", a.url())).await;
    assert!(metric(&m, "cacheroute_agent_scrapes_total{result=\"ok\"}").unwrap() > 0.0);
    assert_eq!(metric(&m, "cacheroute_agent_engine_up"), Some(1.0));
    assert!(m.contains("cacheroute_agent_engine_running"), "{m}");
    assert!(m.contains("cacheroute_agent_engine_kv_usage"), "{m}");

    for r in reqs {
        r.abort();
    }
    a.shutdown().await;
    sim.stop().await;
}

#[tokio::test]
async fn engine_down_keeps_the_agent_answering() {
    // never up
    let dead = format!("http://127.0.0.1:{}", free_port());
    let a = agent(args(&dead)).await;
    let m = poll_json_metrics(&a, "cacheroute_agent_scrapes_total{result=\"unreachable\"}").await;
    assert_eq!(
        metric(&m, "cacheroute_agent_scrapes_total{result=\"ok\"}"),
        Some(0.0)
    );
    let v = get_json(format!("{}/v1/load", a.url())).await;
    assert_eq!(v["engine_up"], false);
    assert_eq!(v["age_ms"], Value::Null);
    assert_eq!(
        (v["running"].as_u64(), v["waiting"].as_u64()),
        (Some(0), Some(0))
    );
    let h = get_json(format!("{}/health", a.url())).await;
    assert_eq!(h, json!({"status": "ok", "engine_up": false}));
    a.shutdown().await;

    // up, then gone: the agent notices and keeps serving the last values
    let sim = spawn(SimArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        model: "m".into(),
        time_scale: 50.0,
        ..SimArgs::default()
    })
    .await
    .unwrap();
    let a = agent(args(&sim.url())).await;
    let load_url = format!("{}/v1/load", a.url());
    poll_json(load_url.clone(), "engine up", |v| v["engine_up"] == true).await;
    sim.stop().await;
    let v = poll_json(load_url.clone(), "engine down", |v| v["engine_up"] == false).await;
    assert!(
        v["age_ms"].as_u64().is_some(),
        "last success still reported: {v}"
    );
    assert_eq!(v["generation_tokens_per_s"], 0.0);
    let h = get_json(format!("{}/health", a.url())).await;
    assert_eq!(h["engine_up"], false);
    let r = client()
        .get(format!("{}/nope", a.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    a.shutdown().await;
}

/// Fetch the agent's metrics until `sample` is above 0.
async fn poll_json_metrics(a: &AgentHandle, sample: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = get_text(format!("{}/metrics", a.url())).await;
        if metric(&m, sample).is_some_and(|v| v > 0.0) {
            return m;
        }
        assert!(Instant::now() < deadline, "no {sample} > 0 in:\n{m}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// What the fake gateway saw: (method, path or body, authorization).
#[derive(Default)]
struct Seen {
    posts: Vec<(Value, Option<String>)>,
    deletes: Vec<(String, String, Option<String>)>,
}

type SeenRef = Arc<Mutex<Seen>>;

fn auth(h: &HeaderMap) -> Option<String> {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn member_post(
    State(s): State<SeenRef>,
    h: HeaderMap,
    Json(body): Json<Value>,
) -> Json<Value> {
    s.lock().unwrap().posts.push((body, auth(&h)));
    Json(json!({"object": "member", "registered": true}))
}

async fn member_delete(
    State(s): State<SeenRef>,
    h: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
) -> Json<Value> {
    s.lock().unwrap().deletes.push((kind, id, auth(&h)));
    Json(json!({"deleted": true}))
}

/// A fake gateway control plane on `port` (retrying the bind briefly: the port was
/// only reserved by number).
async fn fake_gateway(
    port: u16,
    seen: SeenRef,
) -> (JoinHandle<()>, tokio::sync::oneshot::Sender<()>) {
    let app = Router::new()
        .route("/v1/members", post(member_post))
        .route("/v1/members/{kind}/{id}", delete(member_delete))
        .with_state(seen);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + PATIENCE;
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(Instant::now() < deadline, "binding {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (task, tx)
}

async fn wait_for_posts(seen: &SeenRef) -> (Value, Option<String>) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(p) = seen.lock().unwrap().posts.first().cloned() {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no registration reached the gateway"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn registers_with_a_gateway_that_starts_later_and_leaves_on_shutdown() {
    let port = free_port();
    let engine = format!("http://127.0.0.1:{}", free_port());
    let mut a = args(&engine);
    a.gateways = vec![format!("http://127.0.0.1:{port}/")];
    a.gateway_token = Some("s3cret".into());
    let a = agent(a).await;

    // the gateway is not there yet: attempts fail and are counted
    poll_json_metrics(&a, "cacheroute_agent_registrations_total{result=\"error\"}").await;

    let seen = SeenRef::default();
    let (gw, gw_stop) = fake_gateway(port, seen.clone()).await;
    let (body, authz) = wait_for_posts(&seen).await;
    assert_eq!(authz.as_deref(), Some("Bearer s3cret"));
    assert_eq!(body["kind"], "agent");
    assert_eq!(body["id"], a.id());
    assert_eq!(body["id"], format!("agent@{}", a.addr));
    assert_eq!(body["url"], a.url());
    assert_eq!(body["instance"], engine);
    let ttl = body["ttl_s"].as_f64().unwrap();
    assert!((ttl - 0.3).abs() < 1e-9, "{body}");
    assert_eq!(
        body.as_object().unwrap().len(),
        5,
        "exactly the fields the gateway accepts: {body}"
    );
    poll_json_metrics(&a, "cacheroute_agent_registrations_total{result=\"ok\"}").await;

    // the gateway restarts (forgetting everything): the agent comes back by itself
    let _ = gw_stop.send(());
    gw.await.unwrap();
    let seen2 = SeenRef::default();
    let (gw, gw_stop) = fake_gateway(port, seen2.clone()).await;
    let (body2, _) = wait_for_posts(&seen2).await;
    assert_eq!(body2, body);

    let id = a.id().to_string();
    a.shutdown().await;
    let deletes = std::mem::take(&mut seen2.lock().unwrap().deletes);
    assert_eq!(
        deletes,
        [("agent".to_string(), id, Some("Bearer s3cret".to_string()))]
    );
    let _ = gw_stop.send(());
    gw.await.unwrap();
}

type KdnState = Arc<Mutex<(Value, Vec<String>)>>;

async fn kdn_list(State(s): State<KdnState>, RawQuery(q): RawQuery) -> Json<Value> {
    let mut g = s.lock().unwrap();
    g.1.push(q.unwrap_or_default());
    Json(g.0.clone())
}

fn chunk() -> Chunk {
    Chunk {
        kv_bytes: bytes::Bytes::from_static(b"kv"),
        metadata: bytes::Bytes::from_static(b"0123456789012345678901234567"),
    }
}

#[tokio::test]
async fn residency_from_a_stub_kdn_and_a_memory_store() {
    let list = json!({"object": "list", "data": [
        {"id": "a", "object": "knowledge", "models": {
            "m": {"status": "ready", "chunks": 2, "world_size": 2,
                  "keys": ["a-c0-r0", "a-c0-r1", "a-c1-r0", "a-c1-r1"]}}},
        {"id": "b", "object": "knowledge", "models": {
            "m": {"status": "ready", "chunks": 2, "world_size": 1, "keys": ["b-c0", "b-c1"]},
            "other": {"status": "ready", "chunks": 1, "world_size": 1, "keys": ["b-other"]}}},
        {"id": "c", "object": "knowledge", "models": {
            "other": {"status": "ready", "chunks": 1, "world_size": 1, "keys": ["c-c0"]}}},
        // an older KDN: no keys, so never resident
        {"id": "d", "object": "knowledge", "models": {
            "m": {"status": "ready", "chunks": 1, "world_size": 1}}}
    ]});
    let kdn_state: KdnState = Arc::new(Mutex::new((list, Vec::new())));
    let app = Router::new()
        .route("/v1/knowledge", get(kdn_list))
        .with_state(kdn_state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let kdn_url = format!("http://{}", listener.local_addr().unwrap());
    let kdn = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let store_url = "memory://agent-residency-test";
    let store = open_store(store_url).await.unwrap();
    for k in [
        "a-c0-r0", "a-c0-r1", "a-c1-r0", "a-c1-r1", "b-c0", "b-other", "c-c0",
    ] {
        store.put_chunk(k, &chunk()).await.unwrap();
    }

    let mut a = args(&format!("http://127.0.0.1:{}", free_port()));
    a.kdn = Some(kdn_url);
    a.kv_store = Some(store_url.into());
    a.model = Some("m".into());
    let a = agent(a).await;
    let resident_url = format!("{}/v1/resident", a.url());
    let load_url = format!("{}/v1/load", a.url());

    let r = poll_json(resident_url.clone(), "residency checked", |v| {
        v["data"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    assert_eq!(
        r,
        json!({"object": "list", "data": [
            {"id": "a", "model": "m", "chunks": 2, "resident_chunks": 2},
            {"id": "b", "model": "m", "chunks": 2, "resident_chunks": 1},
            {"id": "d", "model": "m", "chunks": 1, "resident_chunks": 0},
        ]})
    );
    assert_eq!(get_json(load_url.clone()).await["resident"], json!(["a"]));
    let queries = kdn_state.lock().unwrap().1.clone();
    let q = &queries[0];
    assert!(q.contains("keys=1") && q.contains("text=0"), "{q}");

    // b's second chunk lands: b becomes resident
    store.put_chunk("b-c1", &chunk()).await.unwrap();
    poll_json(load_url.clone(), "a and b resident", |v| {
        v["resident"] == json!(["a", "b"])
    })
    .await;

    // one rank of a's first chunk is evicted: no prefix left for a
    assert!(store.delete_chunk("a-c0-r1").await.unwrap());
    poll_json(load_url.clone(), "only b resident", |v| {
        v["resident"] == json!(["b"])
    })
    .await;
    let r = get_json(resident_url.clone()).await;
    assert_eq!(r["data"][0]["resident_chunks"], 0, "{r}");

    // the KDN drops b from its list
    kdn_state.lock().unwrap().0["data"]
        .as_array_mut()
        .unwrap()
        .remove(1);
    poll_json(load_url.clone(), "nothing resident", |v| {
        v["resident"] == json!([])
    })
    .await;

    let m = get_text(format!("{}/metrics", a.url())).await;
    assert!(metric(&m, "cacheroute_agent_residency_checks_total{result=\"ok\"}").unwrap() > 0.0);
    assert_eq!(metric(&m, "cacheroute_agent_resident_blocks"), Some(0.0));

    a.shutdown().await;
    kdn.abort();
}

#[tokio::test]
async fn unreachable_kdn_is_retried_without_failing() {
    let mut a = args(&format!("http://127.0.0.1:{}", free_port()));
    a.kdn = Some(format!("http://127.0.0.1:{}", free_port()));
    a.kv_store = Some("memory://agent-unreachable-kdn".into());
    let a = agent(a).await;
    poll_json_metrics(
        &a,
        "cacheroute_agent_residency_checks_total{result=\"kdn_error\"}",
    )
    .await;
    let r = get_json(format!("{}/v1/resident", a.url())).await;
    assert_eq!(r, json!({"object": "list", "data": []}));
    a.shutdown().await;
}
