"""Strict HTTP/1.1 on the service plane (issue 13): pipelined requests answered
in order, 431/414 for oversized headers and request targets, 400 for broken
framing, deadlines for a request's header and body, a first-byte deadline to
the engine, a drop-in outage answered 503 with Retry-After, and a 32 MiB body
parsed within a small multiple of its size.

Clients that must misbehave talk over raw sockets; everything else is real
HTTP against a real gateway process and the sim."""

from __future__ import annotations

import json
import socket
import threading

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
    pool,
    wait_until,
)

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"


# --------------------------------------------------------------------------
# a minimal raw HTTP/1.1 client


def connect(g) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", g.port), timeout=PROMPT_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Reader:
    """Reads HTTP/1.1 responses off a socket, one after the other."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before a full line")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self) -> tuple[int, dict, bytes]:
        status = int(self._line().split()[1])
        headers: dict[str, str] = {}
        while True:
            line = self._line()
            if not line:
                break
            k, v = line.decode().split(":", 1)
            headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = self._take(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                chunk = self._take(size)
                self._line()
                if size == 0:
                    break
                body += chunk
        else:
            body = b""
        return status, headers, body

    def closed(self) -> bool:
        """True once the server has closed the connection (EOF or reset)."""
        try:
            return not self._fill()
        except (ConnectionResetError, BrokenPipeError):
            return True


def post(path: str, body: dict | bytes, extra: str = "") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n{extra}\r\n"
    ).encode() + data


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n".encode()


def openai_error(body: bytes, status: int, headers: dict) -> dict:
    assert headers.get("content-type", "").startswith("application/json"), headers
    err = json.loads(body)["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and isinstance(err["code"], str), err
    return err


@pytest.fixture
def stack(sim, gateway):
    s = sim()
    g = gateway(config={
        "gateway": {"header_timeout_ms": 1500, "body_timeout_ms": 1500},
        "pools": [pool("p", [s.url])],
    })
    return s, g


def still_serves(g) -> None:
    with client() as c:
        assert c.post(g.url + CHAT, json=chat_body()).status_code == 200


# --------------------------------------------------------------------------
# pipelining


def test_pipelined_requests_answered_in_order(stack):
    s, g = stack
    with connect(g) as sock:
        # Three requests in one write: a completion between two GETs.
        sock.sendall(get("/health") + post(CHAT, chat_body("first")) + get("/v1/models"))
        r = Reader(sock)
        st1, _, b1 = r.response()
        st2, _, b2 = r.response()
        st3, _, b3 = r.response()
    assert (st1, st2, st3) == (200, 200, 200)
    assert json.loads(b1) == {"status": "ok"}
    assert json.loads(b2)["object"] == "chat.completion"
    assert json.loads(b3)["data"][0]["id"] == MODEL


def test_pipelined_completions_both_answered(stack):
    s, g = stack
    with connect(g) as sock:
        sock.sendall(post(COMPL, completion_body("one")) + post(CHAT, chat_body("two")))
        r = Reader(sock)
        st1, _, b1 = r.response()
        st2, _, b2 = r.response()
        # The connection stays usable after the pipelined pair.
        sock.sendall(get("/health"))
        st3, _, _ = r.response()
    assert (st1, st2, st3) == (200, 200, 200)
    assert json.loads(b1)["object"] == "text_completion"
    assert json.loads(b2)["object"] == "chat.completion"


# --------------------------------------------------------------------------
# oversized headers and request targets


@pytest.mark.parametrize("case", ["one-1MB-header", "10000-headers", "100KB-header", "2MB-header"])
def test_oversized_header_is_431(stack, case):
    s, g = stack
    if case == "one-1MB-header":
        extra = "x-big: " + "a" * 1_000_000 + "\r\n"
    elif case == "10000-headers":
        extra = "".join(f"x-h{i}: v\r\n" for i in range(10_000))
    elif case == "2MB-header":
        # Past Pingora's own 1 MiB limit: refused before the header ends.
        extra = "x-big: " + "a" * 2_000_000 + "\r\n"
    else:
        extra = "x-big: " + "a" * 100_000 + "\r\n"
    with connect(g) as sock:
        sock.sendall(post(CHAT, chat_body(), extra))
        r = Reader(sock)
        status, headers, body = r.response()
        assert status == 431
        assert openai_error(body, 431, headers)["code"] == "header_too_large"
        assert r.closed()
    still_serves(g)


def test_oversized_request_target_is_414(stack):
    s, g = stack
    with connect(g) as sock:
        sock.sendall(f"GET /v1/models?q={'a' * 20_000} HTTP/1.1\r\nhost: gw\r\n\r\n".encode())
        r = Reader(sock)
        status, headers, body = r.response()
        assert status == 414
        assert openai_error(body, 414, headers)["code"] == "uri_too_long"
    still_serves(g)


# --------------------------------------------------------------------------
# malformed framing


FRAMING = [
    ("bad-content-length", b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 12abc\r\n\r\n{}"),
    ("two-content-lengths", b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\ncontent-length: 5\r\n\r\n{}"),
    ("bad-chunk-size", b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    ("non-chunked-te", b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: gzip\r\n\r\n{}"),
    ("garbage-request-line", b"HELLO\x01 WORLD\r\n\r\n"),
]


@pytest.mark.parametrize("raw", [f[1] for f in FRAMING], ids=[f[0] for f in FRAMING])
def test_malformed_framing_is_400(stack, raw):
    s, g = stack
    with connect(g) as sock:
        sock.sendall(raw)
        r = Reader(sock)
        status, headers, body = r.response()
        assert status == 400
        openai_error(body, 400, headers)
        assert r.closed()
    still_serves(g)


# --------------------------------------------------------------------------
# deadlines for a request's header and body


def drip(sock: socket.socket, data: bytes, stop: threading.Event, sent: list) -> None:
    """Send one byte at a time, a pause between, until told to stop or the
    server closes."""
    for b in data:
        if stop.is_set():
            return
        try:
            sock.sendall(bytes([b]))
        except OSError:
            return
        sent[0] += 1
        stop.wait(0.3)


@pytest.mark.parametrize("part", ["header", "body"])
def test_slow_client_dropped_at_deadline(stack, part):
    s, g = stack
    req = post(CHAT, chat_body("slow " * 50))
    head_len = req.index(b"\r\n\r\n") + 4
    with connect(g) as sock:
        if part == "body":
            sock.sendall(req[:head_len])
            rest = req[head_len:]
        else:
            rest = req
        stop, sent = threading.Event(), [0]
        t = threading.Thread(target=drip, args=(sock, rest, stop, sent), daemon=True)
        t.start()
        try:
            r = Reader(sock)
            status, headers, body = r.response()
            assert status == 408
            assert openai_error(body, 408, headers)["code"] == "request_timeout"
            assert r.closed()
            # Dropped while the client was still sending, not after it finished.
            assert sent[0] < len(rest)
        finally:
            stop.set()
            t.join()
    still_serves(g)


# --------------------------------------------------------------------------
# first-byte deadline to the engine


def test_hung_engine_is_504_at_first_byte_deadline(gateway):
    # Answers its health checks, then accepts a completion and never answers.
    hung = FaultServer("hang")
    try:
        # The inter-chunk timeout is long; only the first-byte one can end it.
        g = gateway(config={
            "upstream": {"read_timeout_ms": 600_000, "first_byte_timeout_ms": 700},
            "pools": [pool("p", [hung.url], models=[MODEL])],
        })
        with client(timeout=PROMPT_TIMEOUT) as c:
            for body in (chat_body(), chat_body(stream=True)):
                r = c.post(g.url + CHAT, json=body)
                err = assert_openai_error(r, 504)
                assert err["code"] == "upstream_timeout"
        assert hung.posts == 2
    finally:
        hung.close()


# --------------------------------------------------------------------------
# drop-in outage


def test_upstream_outage_is_503_with_retry_after(sim, gateway):
    s = sim()
    g = gateway(upstreams=[s.url])
    with client() as c:
        assert c.post(g.url + CHAT, json=chat_body()).status_code == 200
        s.kill()
        g.wait_healthy([s.url], healthy=False)
        # Once a discovery round (every 5 s) has found the instance down, the
        # model is still known: the answer is an outage, not a 404.
        wait_until(lambda: g.proc.logs().count("model discovery failed") >= 2, timeout=30,
                   what="two discovery rounds with the instance down")
        for body in (chat_body(), chat_body(stream=True)):
            r = c.post(g.url + CHAT, json=body)
            assert_openai_error(r, 503)
            assert int(r.headers["retry-after"]) >= 1
        models = c.get(g.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == [MODEL]
        # The instance comes back on the same port: served again.
        s2 = sim(port=s.port)
        g.wait_healthy([s2.url])
        wait_until(lambda: c.post(g.url + CHAT, json=chat_body()).status_code == 200,
                   what="served again after the instance came back")


# --------------------------------------------------------------------------
# memory per body


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.mark.parametrize("shape", ["token-ids", "messages", "unknown-field"])
def test_32mib_body_parsed_within_memory_bound(sim, gateway, shape):
    """A 32 MiB body of small items grows the gateway's peak RSS by a small
    multiple of its size (it was ~56x), and the memory is given back."""
    s = sim()
    g = gateway(upstreams=[s.url])
    size = 32 << 20
    if shape == "token-ids":
        n = (size - 100) // 2
        raw = b'{"model":"%s","max_tokens":1,"prompt":[' % MODEL.encode() + b"1," * (n - 1) + b"1]}"
        path = COMPL
    elif shape == "unknown-field":
        n = (size - 100) // 2
        raw = b'{"model":"%s","max_tokens":1,"prompt":"x","extra_ids":[' % MODEL.encode() + b"1," * (n - 1) + b"1]}"
        path = COMPL
    else:
        msg = b'{"role":"user","content":"hi"},'
        n = (size - 100) // len(msg)
        raw = b'{"model":"%s","max_tokens":1,"messages":[' % MODEL.encode() + msg * (n - 1) + msg[:-1] + b"]}"
        path = CHAT
    pid = g.proc.pid
    with client(timeout=120) as c:
        assert c.post(g.url + path, json=completion_body() if path == COMPL else chat_body()).status_code == 200
        before = vm_kib(pid, "VmHWM")
        r = c.post(g.url + path, content=raw, headers={"content-type": "application/json"})
        if shape == "token-ids":
            # Parsed whole and forwarded (the sim may refuse a prompt this long).
            assert r.status_code in (200, 400), r.text[:300]
        else:
            # Past the bound on kept items: refused at once with a clear 400.
            err = assert_openai_error(r, 400)
            assert err["code"] == "too_many_items", err
        peak = vm_kib(pid, "VmHWM")
    growth = (peak - before) * 1024
    limit = 4 * len(raw)
    print(f"{shape}: body {len(raw) >> 20} MiB, peak RSS growth {growth >> 20} MiB")
    assert growth <= limit, f"peak RSS grew by {growth >> 20} MiB for a {len(raw) >> 20} MiB body"
    # Given back: RSS settles well under the peak.
    wait_until(lambda: (vm_kib(pid, "VmRSS") - before) * 1024 < len(raw) * 2, timeout=30,
               what="RSS back near its level before the body")
