"""Request bodies reach the upstream intact: at least 1 MiB, unknown fields
kept, non-ASCII text kept, chunked transfer encoding accepted."""

from __future__ import annotations

import json

import pytest

from crtest import MODEL, chat_body, client, completion_body, norm_url, sse_events

MIB = 1024 * 1024


def big_chat_body(size: int = MIB + 4096, **extra) -> dict:
    # Varied text (not one repeated byte) so a truncated or reordered body
    # cannot compare equal by accident.
    words = [f"w{i % 9973}" for i in range(size // 5)]
    text = " ".join(words)[:size]
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Answer from the document."},
            {"role": "user", "content": text},
        ],
        "max_tokens": 1,
        "temperature": 0.5,
        "x_custom": {"nested": [1, 2, 3]},
    }
    body.update(extra)
    return body


def upstream_body(last: dict):
    got = last["body"]
    return json.loads(got) if isinstance(got, str) else got


@pytest.fixture
def stack(sim, gateway):
    # a long-context deployment: 1 MiB of text is a few hundred thousand tokens
    s = sim(extra=["--max-model-len", "4000000"])
    g = gateway(upstreams=[s.url])
    return s, g


def test_one_mib_body_arrives_intact(stack):
    s, g = stack
    body = big_chat_body()
    raw = json.dumps(body).encode()
    assert len(raw) >= MIB
    with client(timeout=60) as c:
        r = c.post(g.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:500]
    assert norm_url(r.headers.get("x-cacheroute-instance")) == s.url
    assert r.json()["choices"][0]["message"]["content"]
    last = s.last_request()
    assert last["path"] == "/v1/chat/completions"
    assert last["bytes"] >= MIB
    assert upstream_body(last) == body  # unknown field x_custom kept, nothing lost


def test_one_mib_body_streamed_response(stack):
    s, g = stack
    body = big_chat_body(stream=True, max_tokens=4)
    with client(timeout=60) as c:
        r = c.post(g.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text[:500]
    assert sse_events(r.content)[-1] == "[DONE]"
    assert upstream_body(s.last_request()) == body


def test_one_mib_completion_prompt(stack):
    s, g = stack
    prompt = " ".join(f"t{i}" for i in range(MIB // 4))
    body = completion_body(prompt, max_tokens=1, x_custom={"nested": [1, 2, 3]})
    with client(timeout=60) as c:
        r = c.post(g.url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text[:500]
    last = s.last_request()
    assert last["path"] == "/v1/completions"
    assert last["bytes"] >= MIB
    assert upstream_body(last) == body


def test_chunked_request_body(stack):
    s, g = stack
    body = big_chat_body(size=MIB + 12345)
    raw = json.dumps(body).encode()

    def gen():
        for i in range(0, len(raw), 64 * 1024):
            yield raw[i:i + 64 * 1024]

    with client(timeout=60) as c:
        req = c.build_request("POST", g.url + "/v1/chat/completions", content=gen(),
                              headers={"content-type": "application/json"})
        assert req.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in req.headers
        r = c.send(req)
    assert r.status_code == 200, r.text[:500]
    last = s.last_request()
    assert last["bytes"] >= MIB
    assert upstream_body(last) == body


def test_small_chunked_request_body(stack):
    s, g = stack
    body = chat_body("tiny chunked body", max_tokens=2)
    raw = json.dumps(body).encode()

    def gen():
        for i in range(0, len(raw), 7):
            yield raw[i:i + 7]

    with client() as c:
        r = c.post(g.url + "/v1/chat/completions", content=gen(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:500]
    assert upstream_body(s.last_request()) == body


def test_unicode_and_unknown_fields_round_trip(stack):
    s, g = stack
    body = chat_body(
        "naïve café — 你好 🌍 \"quoted\" \\ backslash\nnew line\ttab \u0001",
        max_tokens=2,
        x_custom={"nested": [1, 2, 3], "deep": {"a": [True, False, None], "f": 0.25, "neg": -7}},
        logit_bias={"50256": -100},
        user="tester",
    )
    body["messages"].insert(0, {"role": "system", "content": "sys", "name": "extra_name_field"})
    with client() as c:
        r = c.post(g.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text[:500]
    assert upstream_body(s.last_request()) == body


def test_expect_100_continue(stack):
    """A client that sends `Expect: 100-continue` and waits for the interim
    answer before sending its body (as curl does for large bodies) gets
    `100 Continue`, then the completion; the upstream never sees the Expect
    header. A body declared over the limit is refused without the 100."""
    import socket
    from urllib.parse import urlsplit

    s, g = stack
    host, port = urlsplit(g.url).hostname, urlsplit(g.url).port
    body = json.dumps(chat_body(max_tokens=2)).encode()

    def send_headers(length: int) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
                      "Expect: 100-continue\r\n\r\n").encode())
        return sock

    sock = send_headers(len(body))
    with sock:
        # Without the interim answer this read blocks until the socket timeout.
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(4096)
            assert chunk, "connection closed before any answer"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100"), interim[:200]
        sock.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    last = s.last_request()
    assert upstream_body(last) == json.loads(body)

    sock = send_headers(64 * MIB)  # over the default 32 MiB limit
    with sock:
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
