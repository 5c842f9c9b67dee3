"""Lifecycle end to end: members that register, re-register after a gateway
restart, leave on shutdown or expire after their TTL when killed; a reload that
changes a listener says a restart is needed; SIGTERM drains a stream in flight,
SIGINT stops at once; the registry sync revalidates with If-None-Match and
keeps its catalog on a 304."""

from __future__ import annotations

import json
import signal

import httpx

from crtest import (MODEL, PROMPT_TIMEOUT, RecordingProxy, chat_body, client, first_data_line, free_port, pool,
                    sample_sum, scrape, to_toml, wait_until, write_atomic)
from kfleet import ask, knowledge_status, sim_args, start_kdn, wait_synced


def members(gw) -> list[tuple[str, str]]:
    with client() as c:
        r = c.get(gw.control + "/v1/members")
    assert r.status_code == 200, r.text
    return sorted((m["kind"], m["id"]) for m in r.json()["data"])


def start_agent(procs, cr_bin, engine: str, control: str, heartbeat_s: float, name: str = "agent"):
    port = free_port()
    p = procs.start(name, [cr_bin, "agent", "--engine", engine, "--listen", f"127.0.0.1:{port}",
                           "--gateway", control, "--heartbeat-s", str(heartbeat_s)])
    p.wait_http(f"http://127.0.0.1:{port}/health")
    return p, f"agent@127.0.0.1:{port}"


def test_agent_registers_again_after_the_gateway_restarts_and_leaves_on_shutdown(procs, cr_bin, sim, gateway):
    s = sim()
    cport = free_port()
    cfg = {"knowledge": {"member_ttl_s": 600.0}, "pools": [pool("p", [s.url])]}
    gw = gateway(config=cfg, control_port=cport)
    agent, aid = start_agent(procs, cr_bin, s.url, gw.control, heartbeat_s=0.5)
    wait_until(lambda: members(gw) == [("agent", aid)], timeout=15, what="the agent registered")

    # the gateway restarts with an empty member list: the agent's heartbeat adds it again
    gw.proc.stop()
    gw = gateway(config=cfg, control_port=cport)
    wait_until(lambda: members(gw) == [("agent", aid)], timeout=15, what="the agent registered again")
    assert "member registered" in gw.proc.logs()

    # a stopped agent leaves (DELETE), long before its 600 s TTL could expire it
    agent.signal(signal.SIGTERM)
    agent.popen.wait(timeout=PROMPT_TIMEOUT)
    wait_until(lambda: members(gw) == [], timeout=10, what="the agent left")
    assert "member left" in gw.proc.logs(), "removed by its DELETE, not by expiry"


def test_killed_agent_and_kdn_expire_after_their_ttl(procs, cr_bin, sim, gateway, redis_server, tmp_path):
    producer = sim(extra=sim_args(f"{redis_server}/0"))
    s = sim(extra=sim_args(f"{redis_server}/1"))
    gw = gateway(config={"knowledge": {"member_ttl_s": 2.0, "sync_interval_ms": 200},
                         "pools": [pool("p", [s.url])]})
    kdn = start_kdn(procs, cr_bin, tmp_path, "kdn-ttl", redis_server, {"t": (f"{redis_server}/1", None)},
                    producer.url, gateways=[gw.control])
    agent, aid = start_agent(procs, cr_bin, s.url, gw.control, heartbeat_s=0.5)
    wait_until(lambda: members(gw) == [("agent", aid), ("kdn", "kdn-ttl")], timeout=15, what="both registered")

    def gauge():  # refreshed once a second
        fam = scrape(gw.control + "/metrics")
        return [sample_sum(fam, "cacheroute_members", lambda l, k=k: l == {"kind": k}) for k in ("agent", "kdn")]
    wait_until(lambda: gauge() == [1, 1], timeout=10, what="cacheroute_members 1 and 1")

    # SIGKILL: no DELETE is sent; the TTL removes them
    agent.kill()
    wait_until(lambda: members(gw) == [("kdn", "kdn-ttl")], timeout=15, what="the killed agent expired")
    kdn.proc.kill()
    wait_until(lambda: members(gw) == [], timeout=15, what="the killed KDN expired")
    wait_until(lambda: gauge() == [0, 0], timeout=10, what="cacheroute_members 0 and 0")
    assert "member left" not in gw.proc.logs(), "nobody sent a DELETE"


def test_reload_that_changes_listen_requires_a_restart(procs, cr_bin, sim, tmp_path):
    # Started from the file alone: listener flags on the command line would win
    # over the file (and a file change to them would change nothing).
    s = sim()
    port, cport, new_port, new_control = free_port(), free_port(), free_port(), free_port()
    path = tmp_path / "gw.toml"

    def cfg(listen: int, control: int, threads: int) -> dict:
        return {"gateway": {"listen": f"127.0.0.1:{listen}", "control": f"127.0.0.1:{control}", "threads": threads},
                "upstream": {"health_check_interval_ms": 200}, "pools": [pool("p", [s.url])]}
    path.write_text(to_toml(cfg(port, cport, 2)))
    gw = procs.start("gateway", [cr_bin, "gateway", "--config", str(path)])
    base, control = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{cport}"
    gw.wait_http(control + "/healthz")
    gw.wait_http(base + "/health")
    write_atomic(path, to_toml(cfg(new_port, new_control, 3)))
    with client() as c:
        r = c.post(control + "/admin/reload")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ok"] is True
        assert sorted(body["restart_required"]) == ["gateway.control", "gateway.listen", "gateway.threads"], body
        # the running listeners are kept; nothing listens on the new addresses
        assert c.post(base + "/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200
        assert c.get(control + "/healthz").status_code == 200
        for p in (new_port, new_control):
            try:
                c.get(f"http://127.0.0.1:{p}/health")
                raise AssertionError(f"something listens on 127.0.0.1:{p}")
            except httpx.ConnectError:
                pass
        # back to the running addresses: nothing to restart
        write_atomic(path, to_toml(cfg(port, cport, 2)))
        r = c.post(control + "/admin/reload")
        assert r.status_code == 200 and r.json()["restart_required"] == [], r.text


def _open_stream(gw, max_tokens: int):
    c = httpx.Client(timeout=120, trust_env=False)
    cm = c.stream("POST", gw.v1 + "/chat/completions", json=chat_body("tell a long story", max_tokens=max_tokens,
                                                                       stream=True))
    r = cm.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    first_data_line(lines)
    return c, cm, lines


def test_sigterm_drains_a_stream_in_flight(sim, gateway):
    # a real-time sim: 400 tokens keep the stream going for seconds after SIGTERM
    s = sim(time_scale=1.0)
    gw = gateway(config={"pools": [pool("p", [s.url])]})
    c, cm, lines = _open_stream(gw, 400)
    gw.proc.signal(signal.SIGTERM)

    def refused():
        try:
            with client(timeout=2) as c2:
                c2.get(gw.url + "/health")
            return False
        except httpx.HTTPError:
            return True
    wait_until(refused, timeout=10, what="no new connections after SIGTERM")
    assert gw.proc.alive(), "still draining while the stream runs"
    rest = list(lines)  # the stream runs to its end
    assert "data: [DONE]" in rest, rest[-3:]
    events = [ln[len("data: "):] for ln in rest if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert events and json.loads(events[-1])["choices"][0]["finish_reason"] == "length"
    cm.__exit__(None, None, None)
    c.close()
    # with nothing left in flight it exits, well before the 30 s limit
    assert gw.proc.popen.wait(timeout=20) == 0
    assert "no request in flight; exiting" in gw.proc.logs()


def test_sigint_stops_at_once(sim, gateway):
    s = sim(time_scale=1.0)
    gw = gateway(config={"pools": [pool("p", [s.url])]})
    # 5,000 tokens would stream for far longer than the wait below
    c, cm, lines = _open_stream(gw, 5000)
    gw.proc.signal(signal.SIGINT)
    gw.proc.popen.wait(timeout=PROMPT_TIMEOUT)
    try:
        rest = list(lines)
    except httpx.HTTPError:
        rest = []
    assert "data: [DONE]" not in rest, "the stream was cut, not finished"
    cm.__exit__(None, None, None)
    c.close()


def test_sync_revalidates_with_if_none_match_and_keeps_the_catalog_on_304(procs, cr_bin, sim, gateway,
                                                                         redis_server, tmp_path):
    producer = sim(extra=sim_args(f"{redis_server}/0"))
    s = sim(extra=sim_args(f"{redis_server}/1"))
    kdn = start_kdn(procs, cr_bin, tmp_path, "kdn-etag", redis_server, {"t": (f"{redis_server}/1", None)},
                    producer.url)
    kdn.register("basalt")
    proxy = RecordingProxy(kdn.url)
    try:
        gw = gateway(config={"knowledge": {"sync_interval_ms": 100}, "kdns": [{"url": proxy.url}],
                             "pools": [{"name": "p", "models": [MODEL], "instances": [{"url": s.url}]}]})
        wait_synced(gw, ["kdn-etag"], blocks=1)
        wait_until(lambda: sum(1 for _, st, _ in proxy.snapshots() if st == 304) >= 3, timeout=15,
                   what="three 304 answers")
        first_inm, first_status, etag = proxy.snapshots()[0]
        assert first_inm is None and first_status == 200 and etag, proxy.snapshots()[0]
        # every later pull names the version it holds, and an unchanged registry is a 304
        later = proxy.snapshots()[1:]
        assert all(inm == etag for inm, _, _ in later), proxy.snapshots()[:5]
        assert all(st == 304 for _, st, _ in later), proxy.snapshots()[:5]
        # a 304 keeps the catalog: still one block, the KDN up, retrieval works
        st = knowledge_status(gw)
        assert st["blocks"] == 1 and [k["up"] for k in st["kdns"]] == [True], st
        r = ask(gw, "basalt", injection="text")
        assert r.status_code == 200 and r.headers["x-cacheroute-knowledge"] == "basalt"
        # a change: a 200 with a new ETag, then 304s on that one
        kdn.register("tidal")
        wait_synced(gw, ["kdn-etag"], blocks=2)
        n = len(proxy.snapshots())
        wait_until(lambda: len(proxy.snapshots()) >= n + 2, timeout=10, what="more pulls")
        changed = [x for x in proxy.snapshots()[1:] if x[1] == 200]
        assert len(changed) >= 1 and changed[0][2] != etag and changed[0][0] == etag, proxy.snapshots()
        new = changed[-1][2]
        assert proxy.snapshots()[-1] == (new, 304, new), proxy.snapshots()[-3:]
    finally:
        proxy.close()
