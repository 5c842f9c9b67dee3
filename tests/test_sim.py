"""`cacheroute sim` on its own: the vLLM-shaped HTTP surface."""

from __future__ import annotations

import hashlib
import json

import pytest

from crtest import MODEL, chat_body, client, completion_body, sample_names, sample_sum, scrape, sse_events


def test_health_and_models(sim):
    s = sim(model="sim-model-x")
    with client() as c:
        assert c.get(s.url + "/health").status_code == 200
        r = c.get(s.url + "/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == ["sim-model-x"]
    assert body["data"][0]["object"] == "model"


def test_chat_non_stream_shape_and_usage(sim):
    s = sim()
    with client() as c:
        r = c.post(s.url + "/v1/chat/completions", json=chat_body("Tell me about caches.", max_tokens=12))
    assert r.status_code == 200, r.text
    assert "application/json" in r.headers["content-type"]
    b = r.json()
    assert b["object"] == "chat.completion"
    assert b["model"] == MODEL
    assert isinstance(b["id"], str) and b["id"]
    assert isinstance(b["created"], int)
    ch = b["choices"][0]
    assert ch["index"] == 0
    assert ch["message"]["role"] == "assistant"
    assert isinstance(ch["message"]["content"], str) and ch["message"]["content"]
    assert ch["finish_reason"] in ("length", "stop")
    u = b["usage"]
    assert u["prompt_tokens"] > 0
    assert 0 < u["completion_tokens"] <= 12
    if ch["finish_reason"] == "length":
        assert u["completion_tokens"] == 12
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_longer_prompt_counts_more_tokens(sim):
    s = sim()
    with client() as c:
        short = c.post(s.url + "/v1/chat/completions", json=chat_body("hello", max_tokens=1)).json()
        long = c.post(s.url + "/v1/chat/completions", json=chat_body("hello " * 200, max_tokens=1)).json()
    assert long["usage"]["prompt_tokens"] > short["usage"]["prompt_tokens"] + 100


def test_output_is_deterministic(sim):
    s = sim()
    body = chat_body("Same question twice.", max_tokens=20)
    with client() as c:
        a = c.post(s.url + "/v1/chat/completions", json=body).json()
        b = c.post(s.url + "/v1/chat/completions", json=body).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["usage"] == b["usage"]


def test_chat_stream_sse(sim):
    s = sim()
    with client() as c:
        r = c.post(s.url + "/v1/chat/completions", json=chat_body("stream please", max_tokens=10, stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finals and finals[-1] in ("length", "stop")


def test_completions_non_stream_and_stream(sim):
    s = sim()
    with client() as c:
        r = c.post(s.url + "/v1/completions", json=completion_body(max_tokens=8))
        rs = c.post(s.url + "/v1/completions", json=completion_body(max_tokens=8, stream=True))
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "text_completion"
    assert isinstance(b["choices"][0]["text"], str) and b["choices"][0]["text"]
    assert b["usage"]["total_tokens"] == b["usage"]["prompt_tokens"] + b["usage"]["completion_tokens"]
    events = sse_events(rs.content)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
    assert text == b["choices"][0]["text"]


def test_metrics_vllm_names_and_counters(sim):
    s = sim()
    before = scrape(s.url + "/metrics")
    names = sample_names(before)
    for want in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:time_to_first_token_seconds_bucket",
    ):
        assert want in names, f"{want} missing from sim /metrics; have {sorted(names)}"
    assert any("prefix_cache_queries" in n for n in names), sorted(names)
    assert any("prefix_cache_hits" in n for n in names), sorted(names)

    with client() as c:
        r1 = c.post(s.url + "/v1/chat/completions", json=chat_body("count me", max_tokens=5)).json()
        r2 = c.post(s.url + "/v1/completions", json=completion_body("count me too", max_tokens=7)).json()
    after = scrape(s.url + "/metrics")
    prompt = r1["usage"]["prompt_tokens"] + r2["usage"]["prompt_tokens"]
    gen = r1["usage"]["completion_tokens"] + r2["usage"]["completion_tokens"]
    assert sample_sum(after, "vllm:prompt_tokens_total") - sample_sum(before, "vllm:prompt_tokens_total") == prompt
    assert sample_sum(after, "vllm:generation_tokens_total") - sample_sum(before, "vllm:generation_tokens_total") == gen
    assert sample_sum(after, "vllm:time_to_first_token_seconds_count") - sample_sum(before, "vllm:time_to_first_token_seconds_count") == 2
    assert sample_sum(after, "vllm:num_requests_running") == 0


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", chat_body("what did you get?", max_tokens=2, x_extra={"k": [1, 2]})),
    ("/v1/completions", completion_body("what did you get?", max_tokens=2)),
])
def test_debug_last_request(sim, path, body):
    s = sim()
    raw = json.dumps(body, separators=(",", ":")).encode()
    with client() as c:
        r = c.post(s.url + path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    last = s.last_request()
    assert last["path"] == path
    assert last["bytes"] == len(raw)
    assert last["sha256"] == hashlib.sha256(raw).hexdigest()
    got = last["body"]
    if isinstance(got, str):
        got = json.loads(got)
    assert got == body


def test_unknown_model_rejected(sim):
    s = sim()
    with client() as c:
        r = c.post(s.url + "/v1/chat/completions", json=chat_body(model="no-such-model"))
    assert r.status_code in (400, 404), r.text
    assert "error" in r.json()
