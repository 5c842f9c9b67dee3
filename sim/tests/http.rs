//! The sim over real HTTP on 127.0.0.1 ephemeral ports.

use cacheroute_sim::tokenizer::TokenizerChoice;
use cacheroute_sim::{spawn, SimArgs, SimHandle};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

fn args() -> SimArgs {
    SimArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        model: "m".into(),
        time_scale: 50.0,
        ..SimArgs::default()
    }
}

async fn sim(a: SimArgs) -> SimHandle {
    spawn(a).await.expect("sim starts")
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(h: &SimHandle, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", h.url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Parse an SSE body into its `data:` payloads.
fn sse_payloads(text: &str) -> Vec<String> {
    assert!(
        text.ends_with("\n\n"),
        "frames end with a blank line: {text:?}"
    );
    text.split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| {
            f.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad frame {f:?}"))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn chat_and_completions_non_stream_shape() {
    let h = sim(args()).await;
    let r = post(
        &h,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": [{"role": "user", "content": "Hello there, sim!"}],
                "max_tokens": 7, "temperature": 0.3, "unknown_field": [1, 2]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-sim-ttft-ms"));
    let v: Value = r.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "m");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    let text = c["message"]["content"].as_str().unwrap();
    assert_eq!(text.split(' ').count(), 7);
    assert_eq!(c["finish_reason"], "length");
    let u = &v["usage"];
    // BOS + header(3 specials + "user" + "\n\n") + 5 content pieces + eot + assistant header (4)
    let prompt = u["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 10 && prompt < 30, "{u}");
    assert_eq!(u["completion_tokens"], 7);
    assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt + 7);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);

    // default max_tokens: 16 tokens, "stop"
    let v: Value = post(
        &h,
        "/v1/completions",
        &json!({"model": "m", "prompt": "Once upon a time"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap().split(' ').count(),
        16
    );
    // BOS + Once + " upon" + " a" + " time"
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 16);

    // token-id prompts count as given; the model field may be omitted
    let v: Value = post(
        &h,
        "/v1/completions",
        &json!({"prompt": [1, 2, 3], "max_tokens": 2}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    h.stop().await;
}

async fn stream_text(h: &SimHandle, path: &str, body: Value) -> (Vec<Value>, String) {
    let r = post(h, path, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let frames = sse_payloads(&text);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    (chunks, text)
}

#[tokio::test]
async fn streaming_framing_matches_non_stream() {
    let h = sim(args()).await;
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]);
    let full: Value = post(
        &h,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": messages, "max_tokens": 12}),
    )
    .await
    .json()
    .await
    .unwrap();
    let expect = full["choices"][0]["message"]["content"].as_str().unwrap();

    let (chunks, _) = stream_text(
        &h,
        "/v1/chat/completions",
        json!({"model": "m", "messages": messages, "max_tokens": 12, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    // 12 token chunks, the finish chunk, the usage chunk
    assert_eq!(chunks.len(), 14);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut content = String::new();
    for c in &chunks[..12] {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(c["id"], chunks[0]["id"]);
        assert!(c["choices"][0]["finish_reason"].is_null());
        content.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    assert_eq!(content, expect);
    assert_eq!(chunks[12]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[13]["choices"].as_array().unwrap().len(), 0);
    // the same usage, except that the repeat is a GPU prefix-cache hit: the prompt's one
    // full 16-token block (28 tokens)
    let mut usage = chunks[13]["usage"].clone();
    assert_eq!(usage["prompt_tokens"], 28);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 16);
    assert_eq!(full["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    usage["prompt_tokens_details"]["cached_tokens"] = json!(0);
    assert_eq!(usage, full["usage"]);

    // completions stream, no usage chunk unless asked
    let full: Value = post(
        &h,
        "/v1/completions",
        &json!({"model": "m", "prompt": "abc", "max_tokens": 5}),
    )
    .await
    .json()
    .await
    .unwrap();
    let (chunks, _) = stream_text(
        &h,
        "/v1/completions",
        json!({"model": "m", "prompt": "abc", "max_tokens": 5, "stream": true}),
    )
    .await;
    assert_eq!(chunks.len(), 6);
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, full["choices"][0]["text"].as_str().unwrap());
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    h.stop().await;
}

#[tokio::test]
async fn tokens_arrive_over_time() {
    // at 4x real time a decode step of the 8B profile is ~4-5 ms: 40 tokens take ~200 ms
    // Events, not wall time: the first token is read while the engine still
    // runs the request (it was not buffered to the end), and the engine's
    // simulated time grows after the first token.
    let h = sim(SimArgs {
        time_scale: 4.0,
        ..args()
    })
    .await;
    let mut r = post(
        &h,
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 400, "stream": true}),
    )
    .await;
    let mut body = r.chunk().await.unwrap().unwrap().to_vec();
    let at_first = h.engine_stats().unwrap();
    assert_eq!(
        at_first.running, 1,
        "first token read before the end: {at_first:?}"
    );
    assert_eq!(at_first.completed, 0, "{at_first:?}");
    while let Some(c) = r.chunk().await.unwrap() {
        body.extend_from_slice(&c);
    }
    let text = String::from_utf8(body).unwrap();
    assert_eq!(sse_payloads(&text).len(), 400 + 1 + 1);
    let done = h.engine_stats().unwrap();
    assert_eq!(done.completed, 1);
    // one prefill step, then a decode step per further token, each simulated
    assert!(
        done.steps >= 400 && done.busy_ms > at_first.busy_ms,
        "{at_first:?} {done:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn errors_like_vllm() {
    let h = sim(args()).await;
    let r = post(
        &h,
        "/v1/chat/completions",
        &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "NotFoundError");
    assert_eq!(v["error"]["code"], 404);
    assert_eq!(v["error"]["message"], "The model `nope` does not exist.");
    assert!(v["error"]["param"].is_null());

    let r = client()
        .post(format!("{}/v1/chat/completions", h.url()))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "BadRequestError");
    assert_eq!(v["error"]["code"], 400);

    for (path, body) in [
        ("/v1/chat/completions", json!({"model": "m"})),
        ("/v1/completions", json!({"model": "m"})),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "n": 3}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "max_tokens": 200000}),
        ),
    ] {
        let r = post(&h, path, &body).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "BadRequestError", "{v}");
    }
    let v: Value = post(
        &h,
        "/v1/completions",
        &json!({"model": "m", "prompt": "x", "max_tokens": 200000}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum context length is 131072 tokens"));
    h.stop().await;
}

#[tokio::test]
async fn models_health_and_metrics() {
    let h = sim(args()).await;
    let c = client();
    let r = c.get(format!("{}/health", h.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());
    let v: Value = c
        .get(format!("{}/v1/models", h.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "m");
    assert_eq!(v["data"][0]["object"], "model");
    // vLLM's card: owned_by "vllm", root (vLLM's --model), a permission entry.
    assert_eq!(v["data"][0]["owned_by"], "vllm");
    assert_eq!(v["data"][0]["root"], "m");
    assert_eq!(v["data"][0]["max_model_len"], 131072);
    assert_eq!(v["data"][0]["permission"][0]["object"], "model_permission");

    let metrics = |c: reqwest::Client, url: String| async move {
        c.get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = metrics(c.clone(), h.url()).await;
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:request_success_total",
    ] {
        assert!(before.contains(name), "{name} missing:\n{before}");
    }
    assert!(before.contains("vllm:prompt_tokens_total{model_name=\"m\"} 0"));
    post(
        &h,
        "/v1/completions",
        &json!({"prompt": [5, 6, 7, 8], "max_tokens": 3}),
    )
    .await;
    let after = metrics(c.clone(), h.url()).await;
    assert!(
        after.contains("vllm:prompt_tokens_total{model_name=\"m\"} 4"),
        "{after}"
    );
    assert!(
        after.contains("vllm:generation_tokens_total{model_name=\"m\"} 3"),
        "{after}"
    );
    assert!(after.contains("vllm:prefix_cache_queries_total{model_name=\"m\"} 4"));
    assert!(after.contains("vllm:time_to_first_token_seconds_count{model_name=\"m\"} 1"));
    assert!(after.contains("vllm:e2e_request_latency_seconds_count{model_name=\"m\"} 1"));
    assert!(
        after.contains("vllm:request_success_total{finished_reason=\"length\",model_name=\"m\"} 1"),
        "{after}"
    );
    assert!(after.contains("vllm:num_requests_running{model_name=\"m\"} 0"));

    // two sims in one process keep separate registries
    let h2 = sim(SimArgs {
        model: "other".into(),
        ..args()
    })
    .await;
    let m2 = metrics(c.clone(), h2.url()).await;
    assert!(
        m2.contains("vllm:prompt_tokens_total{model_name=\"other\"} 0"),
        "{m2}"
    );
    assert!(!m2.contains("model_name=\"m\""));
    h.stop().await;
    h2.stop().await;
}

#[tokio::test]
async fn last_request_reports_raw_body() {
    // ~250k approximate tokens: above the default --max-model-len (131072)
    let h = sim(SimArgs {
        zero_latency: true,
        max_model_len: 1 << 22,
        ..args()
    })
    .await;
    // ~1 MiB prompt
    let big = "lorem ipsum dolor sit amet ".repeat(40_000);
    let body = serde_json::to_vec(&json!({"model": "m", "prompt": big, "max_tokens": 1, "x": "é"}))
        .unwrap();
    assert!(body.len() > 1 << 20);
    let r = client()
        .post(format!("{}/v1/completions", h.url()))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = client()
        .get(format!("{}/debug/last_request", h.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["path"], "/v1/completions");
    assert_eq!(v["bytes"], body.len());
    assert_eq!(v["sha256"], hex::encode(Sha256::digest(&body)));
    assert_eq!(v["body"]["prompt"].as_str().unwrap().len(), big.len());
    assert_eq!(v["body"]["x"], "é");
    h.stop().await;

    // a refused request (too long for the default max-model-len) is recorded too
    let h = sim(args()).await;
    let r = client()
        .post(format!("{}/v1/completions", h.url()))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = client()
        .get(format!("{}/debug/last_request", h.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["bytes"], body.len());
    assert_eq!(v["sha256"], hex::encode(Sha256::digest(&body)));
    h.stop().await;
}

/// Poll the engine's stats until `ok` holds (10 s at most): wait for an event,
/// never for a guessed duration.
async fn wait_for(
    h: &SimHandle,
    what: &str,
    ok: impl Fn(&cacheroute_sim::engine::EngineStats) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = h.engine_stats().unwrap();
        if ok(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// (x-sim-ttft-ms, x-sim-e2e-ms) of a completion sent to `url`.
async fn sim_ms_url(url: &str, body: Value) -> (f64, f64) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let get = |k: &str| -> f64 { r.headers()[k].to_str().unwrap().parse().unwrap() };
    (get("x-sim-ttft-ms"), get("x-sim-e2e-ms"))
}

async fn sim_ms(h: &SimHandle, body: Value) -> (f64, f64) {
    let r = post(h, "/v1/completions", &body).await;
    assert_eq!(r.status(), 200);
    let get = |k: &str| -> f64 { r.headers()[k].to_str().unwrap().parse().unwrap() };
    (get("x-sim-ttft-ms"), get("x-sim-e2e-ms"))
}

#[tokio::test]
async fn engine_timing_prompt_length_and_batching() {
    let h = sim(SimArgs {
        time_scale: 20.0,
        ..args()
    })
    .await;
    let short: Vec<u32> = (0..100).collect();
    let long: Vec<u32> = (0..6000).collect();
    let (ttft_short, _) = sim_ms(&h, json!({"prompt": short, "max_tokens": 1})).await;
    let (ttft_long, _) = sim_ms(&h, json!({"prompt": long, "max_tokens": 1})).await;
    // simulated GPU time: ~31 ms (the eager floor) vs ~190 ms
    assert!(
        ttft_long > 3.0 * ttft_short,
        "short {ttft_short} long {ttft_long}"
    );
    let c = h.cost_model();
    assert!((ttft_long - c.prefill_ms(6000)).abs() / c.prefill_ms(6000) < 0.5);

    let body = json!({"prompt": (0..500).collect::<Vec<u32>>(), "max_tokens": 32});
    let (_, one) = sim_ms(&h, body.clone()).await;
    // 8 long requests; the engine is seen running all 8 at once (an event, not a
    // race of arrival times), then each one's simulated time is compared.
    let long = json!({"prompt": (0..500).collect::<Vec<u32>>(), "max_tokens": 1500});
    let all = tokio::spawn({
        let reqs: Vec<_> = (0..8)
            .map(|_| {
                let (h2, b) = (h.url(), long.clone());
                async move { sim_ms_url(&h2, b).await }
            })
            .collect();
        futures::future::join_all(reqs)
    });
    wait_for(&h, "8 sequences running in one batch", |s| s.running == 8).await;
    let all = all.await.unwrap();
    let (_, one_long) = sim_ms(&h, long).await;
    let slowest = all.iter().map(|x| x.1).fold(0.0, f64::max);
    // batched: far less than 8x one request (serial would be 8x); simulated time
    assert!(
        slowest < 3.0 * one_long,
        "one {one_long} ms, slowest of 8 {slowest} ms"
    );
    assert!(one > 0.0);
    let stats = h.engine_stats().unwrap();
    assert!(stats.max_batch >= 8, "{stats:?}");
    assert_eq!(stats.running + stats.waiting, 0);
    h.stop().await;
}

#[tokio::test]
async fn client_disconnect_aborts_the_request() {
    let h = sim(SimArgs {
        time_scale: 1.0,
        ..args()
    })
    .await;
    let mut r = post(
        &h,
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 100000, "stream": true}),
    )
    .await;
    assert!(r.chunk().await.unwrap().is_some());
    assert_eq!(h.engine_stats().unwrap().running, 1);
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = h.engine_stats().unwrap();
        if s.aborted == 1 && s.running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not aborted: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
}

#[tokio::test]
async fn zero_latency_answers_at_once() {
    let h = sim(SimArgs {
        zero_latency: true,
        time_scale: 1.0,
        ..args()
    })
    .await;
    assert!(h.engine_stats().is_none());
    let t = Instant::now();
    let v: Value = post(
        &h,
        "/v1/completions",
        &json!({"prompt": (0..20000).collect::<Vec<u32>>(), "max_tokens": 2000}),
    )
    .await
    .json()
    .await
    .unwrap();
    // at real time, the engine would take ~0.6 s of prefill plus ~40 s of decode
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(v["usage"]["prompt_tokens"], 20000);
    assert_eq!(v["usage"]["completion_tokens"], 2000);
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap().split(' ').count(),
        2000
    );
    let (chunks, _) = stream_text(
        &h,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(chunks.len(), 5);
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 3);
    h.stop().await;
}

#[tokio::test]
async fn hf_tokenizer_file_is_used() {
    let dir = std::env::temp_dir().join(format!("cacheroute-sim-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(
        &path,
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{"id": 0, "content": "[UNK]", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2},
                      "unk_token": "[UNK]"}
        })
        .to_string(),
    )
    .unwrap();
    let h = sim(SimArgs {
        tokenizer: TokenizerChoice::File(path),
        zero_latency: true,
        ..args()
    })
    .await;
    let v: Value = post(
        &h,
        "/v1/completions",
        &json!({"prompt": "hello world hello there", "max_tokens": 1}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    h.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn llama3_models_count_exact_tokens_by_default() {
    // Meta's Llama-3 ids: "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n
    // Hello<|eot_id|>" is [128000, 128006, 882, 128007, 271, 9906, 128009] and the
    // generation prompt adds [128006, 78191, 128007, 271]: 11 tokens.
    let chat = json!({"messages": [{"role": "user", "content": "  Hello\n"}], "max_tokens": 1});
    // raw completions: BOS + "Hello world" (9906, 1917)
    let text = json!({"prompt": "Hello world", "max_tokens": 1});
    let usage = |v: Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    for (model, lmcache_model, tokenizer, want_chat, want_text) in [
        ("llama3-8b", None, TokenizerChoice::Auto, Some(11), Some(3)),
        // the vLLM --model string counts too
        (
            "served",
            Some("meta-llama/Meta-Llama-3.1-8B-Instruct"),
            TokenizerChoice::Auto,
            Some(11),
            Some(3),
        ),
        // not Llama-3, or the approximation asked for: not Meta's counts
        ("m", None, TokenizerChoice::Auto, None, None),
        ("llama3-8b", None, TokenizerChoice::Approx, None, None),
    ] {
        let h = sim(SimArgs {
            model: model.into(),
            lmcache_model: lmcache_model.map(Into::into),
            tokenizer: tokenizer.clone(),
            zero_latency: true,
            ..args()
        })
        .await;
        let c = usage(
            post(&h, "/v1/chat/completions", &chat)
                .await
                .json()
                .await
                .unwrap(),
        );
        let t = usage(
            post(&h, "/v1/completions", &text)
                .await
                .json()
                .await
                .unwrap(),
        );
        match (want_chat, want_text) {
            (Some(wc), Some(wt)) => assert_eq!((c, t), (wc, wt), "{model} {tokenizer}"),
            // the approximation: "Hello" is two pieces ("Hell", "o"), the newline a third
            _ => assert_eq!((c, t), (14, 5), "{model} {tokenizer}"),
        }
        h.stop().await;
    }
}

#[tokio::test]
async fn shipped_profiles_are_chosen_by_short_name() {
    for (name, kv_bytes) in [
        ("h100-llama3-8b", 131_072),
        ("h100x8-llama3-70b-tp8", 327_680),
        ("rtx5090x8-llama3-70b", 327_680),
    ] {
        let h = sim(SimArgs {
            profile: Some(name.into()),
            zero_latency: true,
            ..args()
        })
        .await;
        assert_eq!(h.cost_model().kv_bytes_per_token, kv_bytes, "{name}");
        h.stop().await;
    }
    let e = spawn(SimArgs {
        profile: Some("h100-llama3-9b".into()),
        ..args()
    })
    .await
    .err()
    .expect("an unknown name fails");
    let e = format!("{e:#}");
    assert!(
        e.contains("h100-llama3-9b") && e.contains("rtx5090x8-llama3-70b"),
        "{e}"
    );
}

#[tokio::test]
async fn bad_tokenizer_or_profile_fails_to_start() {
    let a = SimArgs {
        tokenizer: TokenizerChoice::parse("/nonexistent/tokenizer.json"),
        ..args()
    };
    assert!(spawn(a).await.is_err());
    let a = SimArgs {
        profile: Some("/nonexistent/profile.json".into()),
        ..args()
    };
    assert!(spawn(a).await.is_err());
    let a = SimArgs {
        time_scale: 0.0,
        ..args()
    };
    assert!(spawn(a).await.is_err());
}

#[tokio::test]
async fn embeddings_openai_shape() {
    let h = sim(args()).await;
    let r = post(
        &h,
        "/v1/embeddings",
        &json!({"model": "m", "input": ["The KV cache of a knowledge block",
            "the kv cache of the knowledge block", "Bananas are yellow"],
            "encoding_format": "float"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "m");
    assert!(v["id"].as_str().unwrap().starts_with("embd-"));
    let vecs: Vec<Vec<f64>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], i);
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vecs.len(), 3);
    let cos = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for e in &vecs {
        assert_eq!(e.len(), 256);
        assert!((cos(e, e) - 1.0).abs() < 1e-5);
    }
    assert!(cos(&vecs[0], &vecs[1]) > 0.6);
    assert!(cos(&vecs[0], &vecs[2]).abs() < 0.4);
    // usage: the inputs' token counts, nothing generated
    let u = &v["usage"];
    let n = u["prompt_tokens"].as_u64().unwrap();
    assert!(n > 12 && n < 40, "{u}");
    assert_eq!(u["total_tokens"].as_u64(), Some(n));

    // deterministic across calls; a single string works; base64 is the same floats
    let one: Value = post(
        &h,
        "/v1/embeddings",
        &json!({"input": "Bananas are yellow"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let floats: Vec<f64> = one["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(floats, vecs[2]);
    let b64: Value = post(
        &h,
        "/v1/embeddings",
        &json!({"input": "Bananas are yellow", "encoding_format": "base64"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let s = b64["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(s.len(), (256 * 4usize).div_ceil(3) * 4);
    assert_eq!(
        s,
        cacheroute_sim::embeddings::base64_f32(
            &floats.iter().map(|x| *x as f32).collect::<Vec<f32>>()
        )
    );

    // errors, OpenAI-shaped
    for (body, status) in [
        (json!({"model": "m"}), 400),
        (json!({"input": ""}), 400),
        (json!({"input": []}), 400),
        (json!({"input": ["ok", ""]}), 400),
        (json!({"input": [1, 2, 3]}), 400),
        (json!({"input": "x", "encoding_format": "int8"}), 400),
        (json!({"model": "other", "input": "x"}), 404),
    ] {
        let r = post(&h, "/v1/embeddings", &body).await;
        assert_eq!(r.status(), status, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], status, "{body}");
        assert!(e["error"]["message"].as_str().unwrap().len() > 5);
    }
    let r = client()
        .post(format!("{}/v1/embeddings", h.url()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // longer than --max-model-len
    let small = sim(SimArgs {
        max_model_len: 16,
        ..args()
    })
    .await;
    let r = post(
        &small,
        "/v1/embeddings",
        &json!({"input": "word ".repeat(100)}),
    )
    .await;
    assert_eq!(r.status(), 400);
    h.stop().await;
    small.stop().await;
}
