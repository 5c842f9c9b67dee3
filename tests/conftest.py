"""Fixtures for the end-to-end suite: real `cacheroute` processes (sim,
gateway) and a real `redis-server` on 127.0.0.1 ephemeral ports.

Run with `bash scripts/test.sh`, or, with the binary built, with
`CACHEROUTE_BIN=target/debug/cacheroute python3 -m pytest -q tests/`.

Every process a test starts is killed when the test ends; the logs of all of
them are attached to the report of a failed test.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest

from crtest import (
    MODEL,
    START_TIMEOUT,
    Proc,
    client,
    free_port,
    norm_url,
    to_toml,
    wait_until,
    write_atomic,
)

# Loopback only: never route test traffic through a proxy from the environment.
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(x for x in ("127.0.0.1,localhost", os.environ.get(_var, "")) if x)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cr_bin() -> str:
    path = os.environ.get("CACHEROUTE_BIN") or str(REPO / "target" / "debug" / "cacheroute")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"cacheroute binary not found at {path}: run `cargo build` or set CACHEROUTE_BIN", pytrace=False)
    return path


# --------------------------------------------------------------------------
# process bookkeeping + logs on failure


class Procs:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.all: list[Proc] = []

    def start(self, name: str, args: list[str], env: dict | None = None) -> Proc:
        n = sum(1 for p in self.all if p.name == name)
        log = self.log_dir / f"{name}{'-' + str(n) if n else ''}.log"
        p = Proc(name, args, log, env)
        self.all.append(p)
        return p

    def report(self) -> str:
        return "\n".join(p.describe() for p in self.all)

    def stop_all(self) -> None:
        for p in reversed(self.all):
            p.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    procs: Procs | None = getattr(item, "_cr_procs", None)
    if rep.failed and procs is not None and procs.all:
        rep.sections.append((f"cacheroute process logs ({rep.when})", procs.report()))


@pytest.fixture
def procs(request, tmp_path) -> Procs:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    p = Procs(log_dir)
    request.node._cr_procs = p
    yield p
    p.stop_all()
    panics = [q for q in p.all if "panicked at" in q.logs()]
    if panics:
        pytest.fail("a process panicked:\n" + "\n".join(q.describe() for q in panics), pytrace=False)


# --------------------------------------------------------------------------
# sim


class Sim:
    def __init__(self, proc: Proc, port: int, model: str):
        self.proc = proc
        self.port = port
        self.model = model
        self.url = f"http://127.0.0.1:{port}"

    def kill(self) -> None:
        self.proc.kill()

    def last_request(self) -> dict:
        with client() as c:
            r = c.get(self.url + "/debug/last_request")
        assert r.status_code == 200, f"sim /debug/last_request: {r.status_code} {r.text[:300]}"
        return r.json()


@pytest.fixture
def sim(procs, cr_bin):
    """Factory: sim(model=..., zero_latency=True, time_scale=None,
    extra=[...], port=None) -> Sim, running and answering /health."""

    def start(model: str = MODEL, zero_latency: bool = True, time_scale: float | None = None,
              extra: list[str] | None = None, port: int | None = None) -> Sim:
        port = port or free_port()
        args = [cr_bin, "sim", "--listen", f"127.0.0.1:{port}", "--model", model]
        if time_scale is not None:
            args += ["--time-scale", str(time_scale)]
        elif zero_latency:
            args += ["--zero-latency"]
        args += extra or []
        p = procs.start(f"sim-{model}-{port}", args)
        s = Sim(p, port, model)
        p.wait_http(s.url + "/health")
        return s

    return start


# --------------------------------------------------------------------------
# gateway


class Gateway:
    def __init__(self, proc: Proc, port: int, control_port: int, config_path: Path | None, token: str | None):
        self.proc = proc
        self.port = port
        self.control_port = control_port
        self.config_path = config_path
        self.token = token
        self.url = f"http://127.0.0.1:{port}"
        self.control = f"http://127.0.0.1:{control_port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def ctl_headers(self) -> dict:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def status(self) -> dict:
        with client() as c:
            r = c.get(self.control + "/debug/status", headers=self.ctl_headers())
        assert r.status_code == 200, f"/debug/status: {r.status_code} {r.text[:300]}"
        return r.json()

    def metrics_text(self) -> str:
        with client() as c:
            r = c.get(self.control + "/metrics", headers=self.ctl_headers())
        assert r.status_code == 200, f"/metrics: {r.status_code} {r.text[:300]}"
        return r.text

    def reload(self) -> httpx.Response:
        with client() as c:
            return c.post(self.control + "/admin/reload", headers=self.ctl_headers())

    def write_config(self, cfg: dict | str) -> None:
        """Rewrite the config file (atomically), keeping the listener
        addresses this gateway was started with."""
        assert self.config_path is not None, "gateway was started without a config file"
        write_atomic(self.config_path, render_config(cfg, self.port, self.control_port))

    def instances(self) -> dict[str, dict]:
        """url -> instance entry from /debug/status, over all pools."""
        out = {}
        for p in self.status()["pools"]:
            for i in p["instances"]:
                out[norm_url(i["url"])] = i
        return out

    def wait_healthy(self, urls: list[str], healthy: bool = True, timeout: float = 20.0) -> None:
        want = {norm_url(u) for u in urls}

        def ok() -> bool:
            inst = self.instances()
            return all(u in inst and bool(inst[u]["healthy"]) == healthy for u in want)

        wait_until(ok, timeout=timeout, what=f"instances {sorted(want)} healthy={healthy} in /debug/status")


def render_config(cfg: dict | str, port: int, control_port: int) -> str:
    if isinstance(cfg, str):
        return cfg
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    gw = cfg.setdefault("gateway", {})
    gw.setdefault("listen", f"127.0.0.1:{port}")
    gw.setdefault("control", f"127.0.0.1:{control_port}")
    gw.setdefault("threads", 2)
    up = cfg.setdefault("upstream", {})
    up.setdefault("health_check_interval_ms", 200)
    return to_toml(cfg)


@pytest.fixture
def gateway(procs, cr_bin, tmp_path):
    """Factory. gateway(upstreams=[url, ...]) starts drop-in mode;
    gateway(config={...} or TOML text) writes tmp_path/cacheroute.toml and
    starts with --config. The listener addresses are always given on the
    command line (fresh ephemeral ports). Waits until the service /health
    and the control /healthz answer, and (wait_healthy=True) until
    /debug/status shows every configured instance healthy."""

    def start(upstreams: list[str] | None = None, config: dict | str | None = None,
              wait_healthy: bool = True, token: str | None = None, extra: list[str] | None = None,
              port: int | None = None, control_port: int | None = None) -> Gateway:
        assert (upstreams is None) != (config is None), "give upstreams or config"
        port, cport = port or free_port(), control_port or free_port()
        args = [cr_bin, "gateway", "--listen", f"127.0.0.1:{port}", "--control", f"127.0.0.1:{cport}"]
        cfg_path = None
        if upstreams is not None:
            for u in upstreams:
                args += ["--upstream", u]
        else:
            cfg_path = tmp_path / f"cacheroute-{port}.toml"
            cfg_path.write_text(render_config(config, port, cport))
            args += ["--config", str(cfg_path)]
        args += extra or []
        p = procs.start("gateway", args)
        g = Gateway(p, port, cport, cfg_path, token)
        p.wait_http(g.control + "/healthz")
        p.wait_http(g.url + "/health")
        if wait_healthy:
            urls = list(upstreams or [])
            if config is not None and isinstance(config, dict):
                urls = [i["url"] for pl in config.get("pools", []) for i in pl.get("instances", [])]
            if urls:
                try:
                    g.wait_healthy(urls)
                except AssertionError as e:
                    raise AssertionError(f"{e}\n{p.describe()}")
        return g

    return start


# --------------------------------------------------------------------------
# redis


@pytest.fixture
def redis_server(procs, tmp_path) -> str:
    """A real redis-server on a loopback ephemeral port, no persistence.
    Returns its URL redis://127.0.0.1:PORT."""
    exe = shutil.which("redis-server")
    if not exe:
        pytest.fail("redis-server is not installed (scripts/test.sh installs it: apt-get install redis-server)", pytrace=False)
    port = free_port()
    d = tmp_path / "redis"
    d.mkdir()
    p = procs.start("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d)])

    def pong() -> bool:
        if not p.alive():
            raise RuntimeError(f"redis-server exited\n{p.describe()}")
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if pong():
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer PING\n{p.describe()}")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}"
