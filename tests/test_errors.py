"""Each bad input gets its status and an OpenAI error body; upstream faults
map to 502/503/504 promptly; the gateway keeps serving afterwards."""

from __future__ import annotations

import json

import pytest

from crtest import (
    MODEL,
    PROMPT_TIMEOUT,
    FaultServer,
    assert_openai_error,
    chat_body,
    client,
    completion_body,
    free_port,
    is_upstream,
    pool,
    sample_sum,
    scrape,
)

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"


@pytest.fixture
def stack(sim, gateway):
    s = sim()
    g = gateway(upstreams=[s.url])
    return s, g


BAD_REQUESTS = [
    # (id, path, raw body, status)
    ("malformed-json", CHAT, b'{"model": "llama3-8b", "messages": [', 400),
    ("not-json", CHAT, b"hello there", 400),
    ("empty-body", CHAT, b"", 400),
    ("json-array", CHAT, b"[1, 2, 3]", 400),
    ("messages-int", CHAT, json.dumps({"model": MODEL, "messages": 5}).encode(), 400),
    ("messages-str", CHAT, json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400),
    ("model-int", CHAT, json.dumps({"model": 3, "messages": [{"role": "user", "content": "x"}]}).encode(), 400),
    ("stream-str", CHAT, json.dumps(chat_body(stream="yes")).encode(), 400),
    ("missing-model", CHAT, json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400),
    ("missing-messages", CHAT, json.dumps({"model": MODEL}).encode(), 400),
    ("missing-prompt", COMPL, json.dumps({"model": MODEL, "max_tokens": 3}).encode(), 400),
    ("compl-malformed", COMPL, b'{"model": "llama3-8b", "prompt": "x"', 400),
    ("compl-model-int", COMPL, json.dumps({"model": 3, "prompt": "x"}).encode(), 400),
    ("compl-stream-str", COMPL, json.dumps(completion_body(stream="yes")).encode(), 400),
    ("unknown-model-chat", CHAT, json.dumps(chat_body(model="no-such-model")).encode(), 404),
    ("unknown-model-compl", COMPL, json.dumps(completion_body(model="no-such-model")).encode(), 404),
]


@pytest.mark.parametrize("path,raw,status", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(stack, path, raw, status):
    s, g = stack
    with client() as c:
        r = c.post(g.url + path, content=raw, headers={"content-type": "application/json"})
        assert_openai_error(r, status)
        # the gateway still serves good ones afterwards
        ok = c.post(g.url + CHAT, json=chat_body(max_tokens=2))
    assert ok.status_code == 200, ok.text


def test_bad_requests_do_not_reach_upstream(stack):
    s, g = stack
    with client() as c:
        c.post(g.url + CHAT, json=chat_body("the good one", max_tokens=2))
        for _, path, raw, _ in BAD_REQUESTS:
            c.post(g.url + path, content=raw, headers={"content-type": "application/json"})
    last = s.last_request()
    body = last["body"] if isinstance(last["body"], dict) else json.loads(last["body"])
    assert body["messages"][0]["content"] == "the good one"


@pytest.mark.parametrize("path,method,allow", [
    (CHAT, "GET", "POST"), (CHAT, "PUT", "POST"), (COMPL, "GET", "POST"), (COMPL, "DELETE", "POST"),
    ("/v1/models", "POST", "GET"), ("/health", "POST", "GET"),
])
def test_wrong_method_405_with_allow(stack, path, method, allow):
    _, g = stack
    with client() as c:
        r = c.request(method, g.url + path, json=chat_body() if method != "GET" else None)
    assert_openai_error(r, 405)
    assert r.headers.get("allow") == allow, dict(r.headers)


@pytest.mark.parametrize("method,path", [("GET", "/nope"), ("POST", "/v1/chat"), ("POST", "/v1/embeddings/x"),
                                         ("POST", "/sleep"), ("GET", "/metrics"), ("GET", "/")])
def test_unknown_path_404(stack, method, path):
    s, g = stack
    with client() as c:
        assert c.post(g.url + CHAT, json=chat_body("the good one", max_tokens=2)).status_code == 200
        r = c.request(method, g.url + path, json=chat_body("not routed") if method == "POST" else None)
        err = assert_openai_error(r, 404)
        assert "allow" not in r.headers, "a 404 names no method"
        assert path in err["message"], err
    # nothing was sent upstream: the sim's last request is still the good one
    body = s.last_request()["body"]
    body = body if isinstance(body, dict) else json.loads(body)
    assert body["messages"][0]["content"] == "the good one"


def test_body_over_limit_413(sim, gateway):
    s = sim()
    g = gateway(config={"gateway": {"max_body_bytes": 4096}, "pools": [pool("p", [s.url])]})
    small = chat_body("x" * 1000, max_tokens=2)
    big = chat_body("x" * 10_000, max_tokens=2)
    with client() as c:
        assert c.post(g.url + CHAT, json=small).status_code == 200
        assert_openai_error(c.post(g.url + CHAT, json=big), 413)
        raw = json.dumps(big).encode()

        def gen():
            for i in range(0, len(raw), 1024):
                yield raw[i:i + 1024]

        assert_openai_error(c.post(g.url + CHAT, content=gen(), headers={"content-type": "application/json"}), 413)
        assert_openai_error(c.post(g.url + COMPL, json=completion_body("y" * 10_000)), 413)
        assert c.post(g.url + CHAT, json=small).status_code == 200


def test_no_healthy_upstream_503(gateway):
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    g = gateway(config={"pools": [pool("p", dead)]}, wait_healthy=False)
    g.wait_healthy(dead, healthy=False)
    with client(timeout=PROMPT_TIMEOUT) as c:
        for body, path in ((chat_body(), CHAT), (completion_body(), COMPL), (chat_body(stream=True), CHAT)):
            assert_openai_error(c.post(g.url + path, json=body), 503)


def test_every_instance_refusing_connections_is_exactly_503(sim, gateway):
    """Instances that health checks still call healthy (the next check is a
    minute away) but refuse every connection: the request is retried on each,
    then answered 503 (none could be connected to), never 502. The retries are
    counted per instance."""
    sims = [sim(), sim()]
    dead = [s.url for s in sims]
    g = gateway(config={"upstream": {"health_check_interval_ms": 60000, "max_retries": 3},
                        "pools": [pool("p", dead)]})
    for s in sims:
        s.kill()
    assert all(i["healthy"] for i in g.instances().values()), "no health check noticed"
    with client(timeout=PROMPT_TIMEOUT) as c:
        err = assert_openai_error(c.post(g.url + CHAT, json=chat_body()), 503)
        assert all(u.split("://")[1] in err["message"] for u in dead), f"names both instances: {err}"
        fams = scrape(g.control + "/metrics")
        for u in dead:
            assert sample_sum(fams, "cacheroute_upstream_retries_total",
                              lambda l: l.get("pool") == "p" and is_upstream(l, u)) == 1, u
            assert sample_sum(fams, "cacheroute_upstream_errors_total",
                              lambda l: l.get("kind") == "connect" and is_upstream(l, u)) == 1, u
        assert sample_sum(fams, "cacheroute_upstream_errors_total") == 2
        # and again, streamed and on the other route
        assert_openai_error(c.post(g.url + COMPL, json=completion_body(stream=True)), 503)
        assert_openai_error(c.post(g.url + CHAT, json=chat_body(stream=True)), 503)


def test_upstream_timeout_504(gateway):
    hang = FaultServer("hang")
    try:
        g = gateway(config={"upstream": {"read_timeout_ms": 500}, "pools": [pool("p", [hang.url])]})
        with client(timeout=PROMPT_TIMEOUT) as c:
            assert_openai_error(c.post(g.url + CHAT, json=chat_body()), 504)
            assert_openai_error(c.post(g.url + CHAT, json=chat_body(stream=True)), 504)
        assert hang.posts == 2
        fams = scrape(g.control + "/metrics")
        assert sample_sum(fams, "cacheroute_upstream_errors_total",
                          lambda l: l.get("kind") == "timeout" and is_upstream(l, hang.url)) == 2
        assert sample_sum(fams, "cacheroute_upstream_errors_total") == 2
        assert sample_sum(fams, "cacheroute_upstream_retries_total") == 0, "a sent request is not retried"
    finally:
        hang.close()


def test_sent_request_is_not_retried(gateway):
    """A request that reached an upstream is never sent again (generation is
    not idempotent): with two hanging instances, one POST in all."""
    hangs = [FaultServer("hang"), FaultServer("hang")]
    try:
        g = gateway(config={"upstream": {"read_timeout_ms": 500, "max_retries": 2},
                            "pools": [pool("p", [h.url for h in hangs])]})
        with client(timeout=PROMPT_TIMEOUT) as c:
            assert_openai_error(c.post(g.url + CHAT, json=chat_body()), 504)
        assert sum(h.posts for h in hangs) == 1
    finally:
        for h in hangs:
            h.close()


def test_upstream_reset_502(gateway):
    rst = FaultServer("reset")
    try:
        g = gateway(config={"pools": [pool("p", [rst.url])]})
        with client(timeout=PROMPT_TIMEOUT) as c:
            assert_openai_error(c.post(g.url + CHAT, json=chat_body()), 502)
            assert_openai_error(c.post(g.url + COMPL, json=completion_body(stream=True)), 502)
            assert c.get(g.url + "/health").status_code == 200
        fams = scrape(g.control + "/metrics")
        assert sample_sum(fams, "cacheroute_upstream_errors_total",
                          lambda l: l.get("kind") == "failed" and is_upstream(l, rst.url)) == 2
        assert sample_sum(fams, "cacheroute_upstream_errors_total") == 2
        assert sample_sum(fams, "cacheroute_upstream_retries_total") == 0
    finally:
        rst.close()


def test_gateway_still_serves_after_faults(sim, gateway):
    """Faulty and healthy instances side by side in separate pools: the
    faults stay confined to their model."""
    s = sim()
    rst = FaultServer("reset", model="broken-model")
    try:
        g = gateway(config={"pools": [pool("good", [s.url]), pool("bad", [rst.url], models=["broken-model"])]})
        with client(timeout=PROMPT_TIMEOUT) as c:
            for _ in range(3):
                assert_openai_error(c.post(g.url + CHAT, json=chat_body(model="broken-model")), 502)
                r = c.post(g.url + CHAT, json=chat_body(max_tokens=2))
                assert r.status_code == 200, r.text
                assert r.headers.get("x-cacheroute-pool") == "good"
    finally:
        rst.close()
