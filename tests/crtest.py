"""Helpers shared by the end-to-end tests: ports, processes, config files,
Prometheus parsing, and the small fault servers that stand in for a broken
upstream (one that never answers, one that resets the connection).

Everything here talks real HTTP on 127.0.0.1; nothing is mocked inside the
processes under test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families

MODEL = "llama3-8b"

# Generous client timeout: "promptly" means the call returns within this
# instead of hanging. Never used as a performance assertion.
PROMPT_TIMEOUT = 10.0
# How long a process gets to start answering HTTP.
START_TIMEOUT = 60.0

_handed_out: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that nothing listens on right now
    and that this test session has not handed out before."""
    with _port_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("could not find a free port")


def two_free_ports() -> int:
    """N such that N and N+1 are both free now (`cacheroute demo --sim-port N`
    takes both)."""
    for _ in range(100):
        n = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", n + 1))
            return n
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def client(timeout: float = PROMPT_TIMEOUT, **kw: Any) -> httpx.Client:
    """An httpx client that ignores proxy settings from the environment."""
    return httpx.Client(timeout=timeout, trust_env=False, **kw)


def norm_url(url: str | None) -> str:
    return (url or "").strip().rstrip("/")


def is_upstream(labels: dict, url: str) -> bool:
    """A metric's `upstream` label names this instance (as its base URL, or
    as host:port)."""
    v = norm_url(labels.get("upstream"))
    return v == norm_url(url) or v == norm_url(url).split("://", 1)[-1]


# --------------------------------------------------------------------------
# processes


class Proc:
    """A process started by a test, its output captured to a log file."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict | None = None):
        self.name = name
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = dict(os.environ)
        full_env.setdefault("RUST_BACKTRACE", "1")
        full_env.setdefault("RUST_LOG", "info")
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def logs(self) -> str:
        try:
            self._log.flush()
        except ValueError:
            pass
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<could not read {self.log_path}: {e}>"

    def describe(self) -> str:
        rc = self.popen.poll()
        state = "running" if rc is None else f"exited with {rc}"
        return (
            f"----- {self.name} (pid {self.pid}, {state}) -----\n"
            f"$ {' '.join(self.args)}\n{self.logs()}"
        )

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL and reap: the process is gone when this returns."""
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        """SIGINT (immediate shutdown), then SIGKILL if it lingers."""
        if self.alive():
            self.signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        try:
            self._log.close()
        except Exception:
            pass

    def wait_http(self, url: str, timeout: float = START_TIMEOUT, ok: Callable[[httpx.Response], bool] | None = None) -> None:
        """Poll `url` until it answers (200 by default). Raises with the
        process log if the process exits or the timeout passes."""
        ok = ok or (lambda r: r.status_code == 200)
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with client(timeout=2.0) as c:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(
                        f"{self.name} exited (rc={self.popen.poll()}) before {url} answered\n{self.describe()}"
                    )
                try:
                    r = c.get(url)
                    if ok(r):
                        return
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    last = repr(e)
                time.sleep(0.05)
        raise RuntimeError(f"{self.name}: {url} did not answer within {timeout}s ({last})\n{self.describe()}")


def wait_until(pred: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `pred` until it returns a truthy value; return it. Raises
    AssertionError with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # keep polling through transient errors
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


# --------------------------------------------------------------------------
# config files (TOML)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table, e.g. templates = { "m" = "chatml" }
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: dict) -> str:
    """Write a config dict as TOML: dict values become [tables], lists of dicts
    become [[arrays of tables]] (one level of nesting, e.g. [[pools.instances]])."""
    out: list[str] = []
    for section, v in cfg.items():
        if isinstance(v, dict):
            out.append(f"[{section}]")
            for k, x in v.items():
                out.append(f"{k} = {_toml_value(x)}")
            out.append("")
    for section, v in cfg.items():
        if isinstance(v, dict):
            continue
        if not (isinstance(v, list) and all(isinstance(x, dict) for x in v)):
            raise KeyError(f"config key {section} must be a table or an array of tables")
        for item in v:
            out.append(f"[[{section}]]")
            nested = {k: x for k, x in item.items() if isinstance(x, list) and x and all(isinstance(e, dict) for e in x)}
            for k, x in item.items():
                if k not in nested:
                    out.append(f"{k} = {_toml_value(x)}")
            out.append("")
            for k, rows in nested.items():
                for row in rows:
                    out.append(f"  [[{section}.{k}]]")
                    for rk, rv in row.items():
                        out.append(f"  {rk} = {_toml_value(rv)}")
                    out.append("")
    return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Replace a file in one step (write a sibling, rename over), so a
    watcher never reads a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pool(name: str, urls: Iterable[str], models: list[str] | None = None, weights: list[int] | None = None, **overrides: Any) -> dict:
    urls = list(urls)
    weights = weights or [1] * len(urls)
    p: dict[str, Any] = {"name": name, "models": models if models is not None else [MODEL]}
    p.update(overrides)
    p["instances"] = [{"url": u, "weight": w} for u, w in zip(urls, weights)]
    return p


# --------------------------------------------------------------------------
# requests


def chat_body(content: str = "Say something.", model: str = MODEL, max_tokens: int = 16, **extra: Any) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    body.update(extra)
    return body


def completion_body(prompt: str = "Once upon a time", model: str = MODEL, max_tokens: int = 16, **extra: Any) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    body.update(extra)
    return body


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    """The response has `status` and an OpenAI error body
    {"error": {"message": str, "type": str, "code": ...}}. Returns error."""
    assert r.status_code == status, f"expected HTTP {status}, got {r.status_code}: {r.text[:500]}"
    ctype = r.headers.get("content-type", "")
    assert "application/json" in ctype, f"error content-type is {ctype!r}: {r.text[:300]}"
    try:
        body = r.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {r.text[:500]!r}")
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"not an OpenAI error body: {body}"
    err = body["error"]
    assert isinstance(err.get("message"), str) and err["message"].strip(), f"error.message missing/empty: {err}"
    assert isinstance(err.get("type"), str) and err["type"].strip(), f"error.type missing/empty: {err}"
    assert "code" in err and err["code"] is not None, f"error.code missing: {err}"
    return err


def sse_events(raw: bytes) -> list[str]:
    """Split a raw SSE body into events, asserting the framing: every event
    is one `data: ...` line terminated by a blank line."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), f"SSE body does not end with a blank line: {text[-80:]!r}"
    events = text[:-2].split("\n\n")
    for ev in events:
        assert ev.startswith("data: "), f"SSE event not framed as 'data: ...': {ev[:200]!r}"
        assert "\n" not in ev, f"SSE event spans several lines: {ev[:200]!r}"
    return [ev[len("data: "):] for ev in events]


def first_data_line(lines) -> str:
    """Read lines from an open SSE stream's line iterator until the first
    `data: ` line. Keep a reference to the iterator while the stream should
    stay open: a line generator that is garbage-collected closes the
    connection under it."""
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended before any data event")


# --------------------------------------------------------------------------
# Prometheus


def scrape(url: str, headers: dict | None = None) -> list:
    with client() as c:
        r = c.get(url, headers=headers or {})
    assert r.status_code == 200, f"GET {url}: {r.status_code} {r.text[:300]}"
    return list(text_string_to_metric_families(r.text))


def samples(families: list) -> list:
    """Flatten families into (name, labels, value) samples."""
    return [(s.name, dict(s.labels), s.value) for f in families for s in f.samples]


def sample_sum(families: list, name: str, match: Callable[[dict], bool] | None = None) -> float:
    match = match or (lambda labels: True)
    return sum(v for n, labels, v in samples(families) if n == name and match(labels))


def sample_names(families: list) -> set[str]:
    return {n for n, _, _ in samples(families)}


# --------------------------------------------------------------------------
# fault servers: stand-ins for a broken upstream


class FaultServer:
    """A tiny HTTP server on 127.0.0.1 that answers GET /health and
    /v1/models like an engine, but misbehaves on POST:
      mode="hang":  reads the request and never answers (until closed);
      mode="reset": reads the request and drops the connection with a TCP RST.
    It counts the POSTs it received."""

    def __init__(self, mode: str, model: str = MODEL):
        assert mode in ("hang", "reset")
        self.mode = mode
        self.model = model
        self.posts = 0
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _json(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.startswith("/health"):
                    self._json(200, {})
                elif self.path.startswith("/v1/models"):
                    self._json(200, {"object": "list", "data": [{"id": outer.model, "object": "model", "owned_by": "test"}]})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                if n:
                    self.rfile.read(n)
                outer.posts += 1
                if outer.mode == "hang":
                    outer._stop.wait(120)
                    self.close_connection = True
                    return
                # reset: abortive close (SO_LINGER 0) sends RST, no response
                import struct

                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------
# a recording proxy


class RecordingProxy:
    """A forwarding HTTP proxy in front of a real server (a KDN) that records
    every request it passes: (method, path, If-None-Match, status, ETag)."""

    def __init__(self, target: str):
        self.target = target
        self.seen: list[tuple[str, str, str | None, int, str | None]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _forward(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                try:
                    with httpx.Client(timeout=300, trust_env=False) as c:
                        r = c.request(self.command, outer.target + self.path, content=body, headers=headers)
                except httpx.HTTPError:
                    self.send_response(502)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                with outer._lock:
                    outer.seen.append((self.command, self.path, self.headers.get("if-none-match"),
                                       r.status_code, r.headers.get("etag")))
                data = r.content
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshots(self) -> list[tuple[str | None, int, str | None]]:
        """(If-None-Match, status, ETag) of each registry snapshot pull."""
        with self._lock:
            return [(inm, st, et) for m, p, inm, st, et in self.seen if p.startswith("/v1/knowledge/snapshot")]

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return sum(1 for m, p, *_ in self.seen if m == method and p.split("?")[0] == path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------
# `cacheroute demo`


class Demo:
    """A running `cacheroute demo`: gateway (service and control), two sims, a KDN."""

    def __init__(self, proc: "Proc", port: int, control_port: int, sim_port: int):
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.control = f"http://127.0.0.1:{control_port}"
        self.sims = [f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{sim_port + 1}"]

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def start_demo(procs, cr_bin: str, *extra: str) -> Demo:
    """`cacheroute demo` on fresh loopback ports, answering on both planes and
    listing its model (the README's main job)."""
    port, cport, kport, sim_port = free_port(), free_port(), free_port(), two_free_ports()
    p = procs.start("demo", [cr_bin, "demo", "--listen", f"127.0.0.1:{port}", "--control", f"127.0.0.1:{cport}",
                             "--sim-port", str(sim_port), "--kdn-listen", f"127.0.0.1:{kport}", *extra])
    d = Demo(p, port, cport, sim_port)
    p.wait_http(d.url + "/health")
    p.wait_http(d.control + "/healthz")
    p.wait_http(d.v1 + "/models", ok=lambda r: r.status_code == 200 and MODEL in r.text)
    return d
