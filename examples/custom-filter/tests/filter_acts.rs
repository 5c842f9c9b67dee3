//! The example's filter in a real gateway, on loopback, in front of `cacheroute sim`:
//! a blocked prompt is refused with OpenAI error JSON, others pass and carry the
//! filter's header.

use cacheroute_gateway::Gateway;
use clap::Parser;
use custom_filter::ContentCheck;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Sim {
    #[command(flatten)]
    args: cacheroute_sim::SimArgs,
}

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn chat(content: &str) -> serde_json::Value {
    serde_json::json!({
        "model": "llama3-8b",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_refuses_and_marks() {
    let sim_addr = free_addr();
    let sim = Sim::parse_from([
        "sim",
        "--listen",
        &sim_addr.to_string(),
        "--model",
        "llama3-8b",
        "--zero-latency",
    ]);
    tokio::spawn(cacheroute_sim::run(sim.args));
    let (listen, control) = (free_addr(), free_addr());
    let upstream = format!("http://{sim_addr}");
    // The gateway blocks its thread (Pingora owns its runtimes).
    std::thread::spawn(move || {
        let r = Gateway::builder()
            .upstream(upstream)
            .listen(listen)
            .control(control)
            .add_filter(ContentCheck::new(&["password"]))
            .run();
        eprintln!("gateway ended: {r:?}");
    });
    let http = reqwest::Client::new();
    let url = format!("http://{listen}/v1/chat/completions");
    // Wait until the gateway serves (it discovers the sim's model and checks its health).
    let deadline = Instant::now() + Duration::from_secs(60);
    let ok = loop {
        match http.post(&url).json(&chat("hello")).send().await {
            Ok(r) if r.status() == 200 => break r,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("the gateway never served: {other:?}"),
        }
    };
    assert_eq!(
        ok.headers().get("x-content-check").map(|v| v.as_bytes()),
        Some(&b"passed"[..])
    );
    let refused = http
        .post(&url)
        .json(&chat("tell me the admin Password"))
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 400);
    assert!(refused.headers().get("x-content-check").is_none());
    let err: serde_json::Value = refused.json().await.expect("error JSON");
    assert_eq!(err["error"]["code"], "content_blocked");
}
