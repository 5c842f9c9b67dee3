"""The proxy filter end to end: admission queues (429, disconnects), the injection
decision against real KDN links (shaped), ready-release, KV handles and cache hits,
with sims whose LMCache stores live in a real Redis."""

from __future__ import annotations

import socket
import threading

import pytest

from crtest import MODEL, RecordingProxy, assert_openai_error, client, is_upstream, scrape, sample_sum, wait_until
from kfleet import BLOCKS, QUESTIONS, ask, decision, dump, sim_args, start_kdn, wait_current, wait_synced


class Fleet:
    pass


@pytest.fixture
def pfleet(procs, cr_bin, sim, gateway, redis_server, tmp_path):
    """One pool of one sim (store in Redis db 1), one KDN whose link to it is
    `link_gbps`, and a gateway with the given [proxy] and pool settings."""

    def start(link_gbps: float | None = None, proxy: dict | None = None, pool: dict | None = None,
              time_scale: float | None = None, sims: int = 1, blocks=("basalt",), kdn_kw: dict | None = None,
              kdn_proxy: bool = False, sim_extra: list[str] | None = None):
        f = Fleet()
        f.redis = redis_server
        f.producer = sim(extra=sim_args(f"{redis_server}/0"))
        kw = {"zero_latency": time_scale is None, "time_scale": time_scale}
        f.sims = [sim(extra=sim_args(f"{redis_server}/{1 + i}") + (sim_extra or []), **kw) for i in range(sims)]
        targets = {f"inst-{i}": (f"{redis_server}/{1 + i}", link_gbps) for i in range(sims)}
        f.kdn = start_kdn(procs, cr_bin, tmp_path, "kdn-1", redis_server, targets, f.producer.url,
                          **(kdn_kw or {}))
        for b in blocks:
            f.kdn.register(b)
            f.kdn.wait_kv_ready(b)
        # optionally, the gateway talks to the KDN through a proxy that records it
        f.kdn_proxy = RecordingProxy(f.kdn.url) if kdn_proxy else None
        f.config = {
            "knowledge": {"sync_interval_ms": 200},
            "proxy": dict(proxy or {}),
            "kdns": [{"url": f.kdn_proxy.url if f.kdn_proxy else f.kdn.url}],
            "pools": [dict({"name": "pool-a", "models": [MODEL],
                            "instances": [{"url": s.url, "kv_target": f"inst-{i}"} for i, s in enumerate(f.sims)]},
                           **(pool or {}))],
        }
        f.gw = gateway(config=f.config)
        wait_synced(f.gw, [f.kdn.id], blocks=len(blocks))
        return f

    return start


def occupy(gw, max_tokens: int) -> threading.Thread:
    """Send a long generation in the background (it may be torn down under it)."""
    def run():
        try:
            with client(timeout=120) as c:
                c.post(gw.v1 + "/chat/completions", json={
                    "model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "x"}]})
        except Exception:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def usage(r) -> dict:
    return r.json()["usage"]


def cached(r) -> int:
    return (usage(r).get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def test_slow_link_and_idle_instance_adaptive_picks_text(pfleet):
    f = pfleet(link_gbps=2.0)
    r = ask(f.gw, "basalt")
    assert r.status_code == 200, r.text
    assert r.headers["x-cacheroute-injection"] == "text"
    d = decision(f.gw, r)["injection"]
    assert d["strategy"] == "adaptive" and d["reason"] == "text_faster", dump(d)
    assert d["predicted_kv_ms"] > d["predicted_text_ms"]
    assert cached(r) == 0
    fam = scrape(f.gw.control + "/metrics")
    assert sample_sum(fam, "cacheroute_injection_decisions_total",
                      lambda l: l == {"mode": "text", "reason": "text_faster"}) == 1
    assert sample_sum(fam, "cacheroute_injection_decisions_total") == 1
    tokens = d["inputs"]["knowledge"]["knowledge_tokens"]
    assert tokens == f.kdn.record("basalt")["models"][MODEL]["tokens"] > 0
    assert sample_sum(fam, "cacheroute_knowledge_tokens_total", lambda l: l == {"mode": "text"}) == tokens
    assert sample_sum(fam, "cacheroute_knowledge_tokens_total", lambda l: l == {"mode": "kv"}) == 0
    assert sample_sum(fam, "cacheroute_knowledge_cached_tokens_total") == 0
    assert sample_sum(fam, "cacheroute_kv_injections_total") == 0, "text asks no KDN"
    # measured over predicted TTFT, one observation for this text request
    assert sample_sum(fam, "cacheroute_ttft_prediction_ratio_count", lambda l: l == {"mode": "text"}) == 1
    assert sample_sum(fam, "cacheroute_ttft_prediction_ratio_count", lambda l: l == {"mode": "kv"}) == 0


def test_fast_link_and_long_queue_adaptive_picks_kv_and_hits(pfleet):
    f = pfleet(link_gbps=400.0, time_scale=1.0, pool={"max_inflight": 1})
    # Fill the instance: one long request running, a few queued behind it.

    for _ in range(3):
        occupy(f.gw, 100)
    wait_until(lambda: sum(i["queued"] for p in f.gw.status()["pools"] for i in p["instances"]) >= 2 or None,
               timeout=10, what="a queue on the instance")
    r = ask(f.gw, "basalt", timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-cacheroute-injection"] == "kv", r.headers
    d = decision(f.gw, r)
    inj = d["injection"]
    assert inj["reason"] == "kv_faster" and inj["inputs"]["load"]["queued"] >= 2, dump(d)
    rec = f.kdn.record("basalt")["models"][MODEL]
    assert cached(r) == rec["tokens"] == rec["chunks"] * rec["chunk_size"]


def test_resident_kv_is_chosen_even_on_a_slow_link(pfleet):
    # engine_stores_prefix off: the first text request does not count the block as
    # resident, so only the KDN's injection (seen through its registry) can.
    f = pfleet(link_gbps=2.0, proxy={"engine_stores_prefix": False})
    r = ask(f.gw, "basalt")
    assert r.headers["x-cacheroute-injection"] == "text", "slow link, nothing resident: text"
    r = ask(f.gw, "basalt", question=QUESTIONS["basalt"] + " (again)")
    assert r.headers["x-cacheroute-injection"] == "text", "a text prefill does not make it resident here"
    assert decision(f.gw, r)["injection"]["inputs"]["knowledge"]["resident_chunks"] == 0
    # The KDN copies the KV into the instance's store out of band.
    assert f.kdn.inject("basalt", "inst-0")["status"] == "done"
    wait_current(f.gw, f.kdn)

    n = iter(range(10_000))

    def kv():  # a fresh question each time: an engine prefix cache sees no repeat
        r = ask(f.gw, "basalt", question=f"{QUESTIONS['basalt']} (try {next(n)})")
        return r if r.headers["x-cacheroute-injection"] == "kv" else None
    r = wait_until(kv, timeout=10, what="resident KV chosen once the registry says so")
    d = decision(f.gw, r)["injection"]
    k = d["inputs"]["knowledge"]
    assert k["resident_chunks"] == k["total_chunks"] > 0, dump(d)
    assert d["reason"] == "kv_resident", dump(d)  # nothing to move: no comparison
    assert cached(r) == k["knowledge_tokens"]


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_kv_mode_hits_every_knowledge_chunk(pfleet, route):
    f = pfleet(link_gbps=100.0, proxy={"injection": "kv", "kv_transfer_params": True})
    r = ask(f.gw, "basalt", route=route)
    assert r.status_code == 200, r.text
    assert r.headers["x-cacheroute-injection"] == "kv"
    rec = f.kdn.record("basalt")["models"][MODEL]
    assert cached(r) == rec["chunks"] * rec["chunk_size"] == rec["tokens"], (usage(r), rec)
    body = f.sims[0].last_request()["body"]
    handle = body["kv_transfer_params"]["cacheroute_kv_handle"]
    assert handle["chunks"] == rec["chunks"] and handle["tokens"] == rec["tokens"]
    fam = scrape(f.sims[0].url + "/metrics")
    assert sample_sum(fam, "sim:kv_handle_checks_total", lambda l: l.get("result") == "ok") >= 1
    # one injection job, one KV decision, its tokens all counted as cached
    fam = scrape(f.gw.control + "/metrics")
    assert sample_sum(fam, "cacheroute_kv_injections_total", lambda l: l == {"result": "ok"}) == 1
    assert sample_sum(fam, "cacheroute_kv_injections_total") == 1
    assert sample_sum(fam, "cacheroute_injection_decisions_total", lambda l: l.get("mode") == "kv") == 1
    assert sample_sum(fam, "cacheroute_injection_decisions_total") == 1
    assert sample_sum(fam, "cacheroute_knowledge_tokens_total", lambda l: l == {"mode": "kv"}) == rec["tokens"]
    assert sample_sum(fam, "cacheroute_knowledge_cached_tokens_total") == rec["chunks"] * rec["chunk_size"]
    assert sample_sum(fam, "cacheroute_ttft_prediction_ratio_count", lambda l: l == {"mode": "kv"}) == 1
    assert sample_sum(fam, "cacheroute_ttft_prediction_ratio_sum", lambda l: l == {"mode": "kv"}) > 0
    assert sample_sum(fam, "cacheroute_ready_release_total",
                      lambda l: l.get("outcome") == "ready") == 1, "the KV was not resident when admitted"


def test_async_store_loading_prefetches_off_the_step(pfleet):
    """LMCache's async loading: the sim prefetches the KV the KDN copied over its 1 Gb/s
    store link off the engine's steps, and the gateway prices the link as a wait."""
    f = pfleet(link_gbps=100.0, time_scale=1.0, sim_extra=["--lmcache-async-loading", "--kv-store-gbps", "1"],
               proxy={"injection": "kv", "store_gbps": 1.0, "store_async_loading": True})
    r = ask(f.gw, "basalt", timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-cacheroute-injection"] == "kv"
    rec = f.kdn.record("basalt")["models"][MODEL]
    assert cached(r) == rec["tokens"] > 0
    with client() as c:
        info = c.get(f.sims[0].url + "/debug/engine").json()
    assert info["scheduler"]["async_loading"] is True
    engine = info["stats"]
    d = decision(f.gw, r)["injection"]
    assert d["inputs"]["store_async"] is True
    bpt = d["inputs"]["knowledge"]["kv_bytes_per_token"]
    link_ms = rec["tokens"] * bpt * 8 / 1e9 * 1000
    # the whole hit came over the link as a prefetch, none of it inside a step
    assert engine["cached_tokens"]["remote"] == rec["tokens"], engine
    assert abs(engine["prefetch_ms"] - link_ms) < 1e-6 * link_ms, (engine, link_ms)
    assert engine["load_ms"] < link_ms / 10, engine
    assert engine["waiting_for_kv"] == 0
    a = d["adaptive"]
    assert abs(a["kv_store_wait"] - link_ms) < 1e-6 * link_ms, dump(d)
    assert a["gpu_load"] < link_ms / 10, dump(d)


def test_text_bypass_late_kv_goes_as_text(pfleet):
    f = pfleet(link_gbps=0.001, proxy={"injection": "kv", "release": "text_bypass", "kv_deadline_ms": 300})
    r = ask(f.gw, "basalt")
    assert r.status_code == 200, r.text
    assert r.headers["x-cacheroute-injection"] == "text"
    d = decision(f.gw, r)
    assert d["injection"]["reason"] == "kv_deadline", dump(d)
    fam = scrape(f.gw.control + "/metrics")
    assert sample_sum(fam, "cacheroute_ready_release_total",
                      lambda l: l == {"policy": "text_bypass", "outcome": "deadline_text"}) == 1
    assert sample_sum(fam, "cacheroute_kv_injections_total", lambda l: l == {"result": "timeout"}) == 1
    assert sample_sum(fam, "cacheroute_kv_injections_total") == 1
    assert sample_sum(fam, "cacheroute_injection_decisions_total",
                      lambda l: l == {"mode": "text", "reason": "kv_deadline"}) == 1


def test_full_queue_gets_429_with_retry_after(pfleet):
    f = pfleet(time_scale=1.0, pool={"max_inflight": 1, "queue_size": 1, "queue_timeout_ms": 60000})
    for _ in range(2):
        occupy(f.gw, 3000)
    wait_until(lambda: [i["queued"] for p in f.gw.status()["pools"] for i in p["instances"]] == [1] or None,
               timeout=10, what="one running, one queued")
    inst = f.sims[0].url
    fam = scrape(f.gw.control + "/metrics")
    assert sample_sum(fam, "cacheroute_queue_length",
                      lambda l: l.get("pool") == "pool-a" and is_upstream(l, inst)) == 1
    with client() as c:
        r = c.post(f.gw.v1 + "/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "y"}]})
    err = assert_openai_error(r, 429)
    assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
    # queue_timeout_ms = 60 s: Retry-After says 60
    assert r.headers["retry-after"] == "60", dict(r.headers)
    fam = scrape(f.gw.control + "/metrics")
    assert sample_sum(fam, "cacheroute_admission_rejected_total",
                      lambda l: l == {"pool": "pool-a", "reason": "queue_full"}) == 1
    assert sample_sum(fam, "cacheroute_admission_rejected_total") == 1


def test_queue_timeout_gets_429(pfleet):
    f = pfleet(time_scale=1.0, pool={"max_inflight": 1, "queue_timeout_ms": 200})
    occupy(f.gw, 3000)
    wait_until(lambda: [i["inflight"] for p in f.gw.status()["pools"] for i in p["instances"]] == [1] or None,
               timeout=10, what="the slot taken")
    with client() as c:
        r = c.post(f.gw.v1 + "/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "y"}]})
    assert assert_openai_error(r, 429)["code"] == "queue_timeout"
    assert r.headers.get("retry-after") == "1", f"a 200 ms wait rounds up to 1 s: {dict(r.headers)}"
    fam = scrape(f.gw.control + "/metrics")
    assert sample_sum(fam, "cacheroute_admission_rejected_total",
                      lambda l: l == {"pool": "pool-a", "reason": "timeout"}) == 1
    assert sample_sum(fam, "cacheroute_admission_rejected_total") == 1
    # the one that waited is the one observed; the queue is empty again
    assert sample_sum(fam, "cacheroute_queue_wait_seconds_count", lambda l: l == {"pool": "pool-a"}) == 1
    assert sample_sum(fam, "cacheroute_queue_wait_seconds_sum", lambda l: l == {"pool": "pool-a"}) > 0
    assert sample_sum(fam, "cacheroute_queue_length", lambda l: is_upstream(l, f.sims[0].url)) == 0


def _raw_post(port: int, body: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    return s


def test_client_disconnect_frees_its_slot_and_aborts_upstream(pfleet):
    import json as _json
    f = pfleet(time_scale=1.0, pool={"max_inflight": 1})
    long = _json.dumps({"model": MODEL, "max_tokens": 5000, "messages": [{"role": "user", "content": "x"}]}).encode()
    running = _raw_post(f.gw.port, long)
    wait_until(lambda: [i["inflight"] for p in f.gw.status()["pools"] for i in p["instances"]] == [1] or None,
               timeout=10, what="the slot taken")
    queued = _raw_post(f.gw.port, long)
    wait_until(lambda: [i["queued"] for p in f.gw.status()["pools"] for i in p["instances"]] == [1] or None,
               timeout=10, what="a request queued")
    queued.close()   # gives up while queued
    wait_until(lambda: [i["queued"] for p in f.gw.status()["pools"] for i in p["instances"]] == [0] or None,
               timeout=10, what="the queued request left the queue")
    running.close()  # gives up while running: the upstream request is aborted
    wait_until(lambda: [i["inflight"] for p in f.gw.status()["pools"] for i in p["instances"]] == [0] or None,
               timeout=10, what="the slot freed")

    def engine_idle():
        fam = scrape(f.sims[0].url + "/metrics")
        return sample_sum(fam, "vllm:num_requests_running") == 0 or None
    wait_until(engine_idle, timeout=10, what="the engine aborted the request")
    with client(timeout=30) as c:
        r = c.post(f.gw.v1 + "/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "next"}]})
    assert r.status_code == 200, r.text


def test_agents_register_report_load_and_residency(pfleet, procs, cr_bin):
    # Two instances; knowledge_affinity. The KV lands in inst-1's store out of band
    # (a store URL target: the KDN's registry cannot tell which instance it is), so
    # only the agent beside inst-1 can say it is resident.
    f = pfleet(sims=2, pool={"policy": "knowledge_affinity"})
    from crtest import free_port
    agents = []
    for i, s in enumerate(f.sims):
        port = free_port()
        p = procs.start(f"agent-{i}", [cr_bin, "agent", "--engine", s.url, "--listen", f"127.0.0.1:{port}",
                                       "--gateway", f.gw.control, "--heartbeat-s", "1.0",
                                       "--kdn", f.kdn.url, "--kv-store", f"{f.redis}/{1 + i}",
                                       "--model", MODEL, "--residency-ms", "200"])
        p.wait_http(f"http://127.0.0.1:{port}/health")
        agents.append(f"http://127.0.0.1:{port}")

    def members():
        with client() as c:
            data = c.get(f.gw.control + "/v1/members").json()["data"]
        return sorted(m["instance"] for m in data if m["kind"] == "agent")
    wait_until(lambda: members() == sorted(s.url for s in f.sims) or None, timeout=15,
               what="both agents registered")
    wait_until(lambda: sample_sum(scrape(f.gw.control + "/metrics"), "cacheroute_members",
                                  lambda l: l == {"kind": "agent"}) == 2, timeout=10,
               what="cacheroute_members{kind=agent} 2")
    assert f.kdn.inject("basalt", f"{f.redis}/2")["status"] == "done"

    def agent_says_resident():
        from kfleet import knowledge_status
        a = knowledge_status(f.gw)["agents"]
        return (a.get(f.sims[1].url, {}).get("up") and "basalt" in a[f.sims[1].url]["load"]["resident"]) or None
    wait_until(agent_says_resident, timeout=15, what="the gateway learns residency from inst-1's agent")
    for _ in range(4):
        r = ask(f.gw, "basalt")
        assert r.status_code == 200
        assert r.headers["x-cacheroute-instance"] == f.sims[1].url, "knowledge affinity follows the agent"
        assert r.headers["x-cacheroute-injection"] == "kv"
        assert cached(r) > 0


def test_prefix_affinity_keeps_a_shared_prefix_on_one_instance(sim, gateway):
    sims = [sim(), sim()]
    gw = gateway(config={"pools": [{"name": "p", "models": [MODEL], "policy": "prefix_affinity",
                                    "instances": [{"url": s.url} for s in sims]}]})

    def send(system: str, q: str) -> str:
        with client() as c:
            r = c.post(gw.v1 + "/chat/completions", json={
                "model": MODEL, "max_tokens": 2,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]})
        assert r.status_code == 200, r.text
        return r.headers["x-cacheroute-instance"]
    a = "You are the archivist of the basalt museum. " * 30
    b = "You are a tide-table calculator for estuaries. " * 30
    first_a = send(a, "q0")
    assert {send(a, f"q{i}") for i in range(1, 6)} == {first_a}, "a shared prefix stays put"
    first_b = send(b, "q0")
    assert first_b != first_a, "a new prefix goes where the tree holds less"
    assert {send(b, f"q{i}") for i in range(1, 6)} == {first_b}
