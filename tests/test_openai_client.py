"""The real `openai` Python client through the gateway to sims: content,
usage and SSE framing intact; the gateway's answers are the sim's answers."""

from __future__ import annotations

import json

import openai
import pytest

from crtest import MODEL, chat_body, client, completion_body, first_data_line, norm_url, sample_sum, scrape, sse_events

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three uses of a KV cache."},
]


@pytest.fixture
def stack(sim, gateway):
    s = sim()
    g = gateway(upstreams=[s.url])
    oa = openai.OpenAI(base_url=g.v1, api_key="anything", max_retries=0, timeout=30)
    yield s, g, oa
    oa.close()


def test_sim_is_deterministic(stack):
    """The comparisons below rely on the sim answering the same request
    with the same text; check that against the sim directly first."""
    s, _, _ = stack
    direct = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=30)
    a = direct.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)
    b = direct.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_non_stream(stack):
    s, g, oa = stack
    raw = oa.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=24)
    assert norm_url(raw.headers.get("x-cacheroute-instance")) == s.url
    assert raw.headers.get("x-cacheroute-pool")
    r = raw.parse()
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("length", "stop")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_stream_matches_non_stream(stack):
    s, g, oa = stack
    full = oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)
    stream = oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, stream=True)
    parts, finish, n = [], None, 0
    for chunk in stream:
        n += 1
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert n >= 2, "expected the answer in several chunks"
    assert "".join(parts) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason


def test_chat_stream_include_usage(stack):
    _, _, oa = stack
    full = oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
    chunks = list(oa.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.usage is not None, "include_usage: the last chunk must carry usage"
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_non_stream_and_stream(stack):
    _, _, oa = stack
    r = oa.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(oa.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == r.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", chat_body("frame me", max_tokens=12, stream=True)),
    ("/v1/completions", completion_body("frame me", max_tokens=12, stream=True)),
])
def test_raw_sse_framing_through_gateway(stack, path, body):
    s, g, _ = stack
    with client() as c:
        via = c.post(g.url + path, json=body)
        direct = c.post(s.url + path, json=body)
    assert via.status_code == 200, via.text
    assert via.headers["content-type"].startswith("text/event-stream")
    events = sse_events(via.content)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    direct_chunks = [json.loads(e) for e in sse_events(direct.content)[:-1]]
    assert len(chunks) == len(direct_chunks), (
        f"{len(chunks)} events through the gateway, {len(direct_chunks)} from the sim directly; "
        f"gateway's last events: {events[-3:]}")
    for i, (a, b) in enumerate(zip(chunks, direct_chunks)):
        assert a.keys() == b.keys(), f"event {i}: {a} vs direct {b}"
        assert a["choices"] == b["choices"], f"event {i}: {a} vs direct {b}"


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", chat_body("compare me", max_tokens=12)),
    ("/v1/completions", completion_body("compare me", max_tokens=12)),
])
def test_gateway_answer_equals_sim_answer(stack, path, body):
    s, g, _ = stack
    with client() as c:
        via = c.post(g.url + path, json=body)
        direct = c.post(s.url + path, json=body)
    assert via.status_code == direct.status_code == 200
    a, b = via.json(), direct.json()
    assert a.keys() == b.keys()
    assert a["choices"] == b["choices"]
    assert a["usage"] == b["usage"]
    assert a["model"] == b["model"]


def test_stream_is_not_buffered(sim, gateway):
    """The first SSE event reaches the client while the engine is still
    generating: the sim (real-time latency, long answer) still reports the
    request as running when the client holds its first chunk."""
    s = sim(time_scale=1.0)
    g = gateway(upstreams=[s.url])
    body = chat_body("a long answer please", max_tokens=400, stream=True)
    with client(timeout=60) as c:
        with c.stream("POST", g.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = first_data_line(lines)
            assert first != "data: [DONE]"
            running = sample_sum(scrape(s.url + "/metrics"), "vllm:num_requests_running")
            assert running == 1, "the gateway delivered the first chunk only after the engine had finished"
            # leave early: the client going away must not upset the gateway
    with client() as c:
        r = c.post(g.url + "/v1/chat/completions", json=chat_body("still there?", max_tokens=2))
    assert r.status_code == 200
