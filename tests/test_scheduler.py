"""The scheduler filter end to end: two pools of sims with LMCache stores in a real
Redis, KDNs registering knowledge through a producer sim, and the gateway syncing
the registry, choosing the pool and the KDN and laying the knowledge out."""

from __future__ import annotations

import json
import time

import pytest

from crtest import MODEL, assert_openai_error, client, free_port, sample_sum, scrape, wait_until
from kfleet import (BLOCKS, QUESTIONS, ask, decision, dump, knowledge_status, sim_args, start_kdn,
                    strategy, wait_current, wait_synced)


class Fleet:
    pass


@pytest.fixture
def fleet(procs, cr_bin, sim, gateway, redis_server, tmp_path):
    """fleet(kdns=1, links={...}, scheduler={...}, pool_kw={...}, time_scale=None,
    kdn_kw={...}, start_gateway=True) -> Fleet with .gw, .kdns, .pools {name: [sims]},
    .producer, .redis."""

    def start(kdns: int = 1, links: dict | None = None, scheduler: dict | None = None,
              pool_kw: dict | None = None, time_scale: float | None = None, kdn_kw: dict | None = None,
              gateway_kw: dict | None = None, proxy: dict | None = None, sync_ms: int = 200,
              static_kdns: bool = True, slow_target: bool = False,
              gateway_extra: list[str] | None = None, knowledge: dict | None = None,
              embeddings: bool = False) -> Fleet:
        f = Fleet()
        f.redis = redis_server
        f.producer = sim(extra=sim_args(f"{redis_server}/0"))
        f.pools = {}
        stores = {"pool-a": f"{redis_server}/1", "pool-b": f"{redis_server}/2"}
        for name, store in stores.items():
            kw = {"zero_latency": time_scale is None, "time_scale": time_scale}
            f.pools[name] = [sim(extra=sim_args(store), **kw)]
        links = links or {}
        targets = {n: (s, links.get(n)) for n, s in stores.items()}
        if slow_target:
            targets["slow"] = (f"{redis_server}/5", 0.001)
        f.kdns = [start_kdn(procs, cr_bin, tmp_path, f"kdn-{i + 1}", redis_server, targets,
                            f.producer.url, **(kdn_kw or {})) for i in range(kdns)]
        f.config = {
            "gateway": dict(gateway_kw or {}),
            "knowledge": dict({"sync_interval_ms": sync_ms}, **(knowledge or {}),
                              **({"embeddings_url": f.producer.url} if embeddings else {})),
            "scheduler": dict(scheduler or {}),
            "proxy": dict(proxy or {}),
            "pools": [dict({"name": n, "models": [MODEL],
                            "instances": [{"url": s.url} for s in sims]}, **(pool_kw or {}).get(n, {}))
                      for n, sims in f.pools.items()],
        }
        if static_kdns:
            f.config["kdns"] = [{"url": k.url} for k in f.kdns]
        f.gw = gateway(config=f.config, extra=gateway_extra)
        return f

    return start


def test_rag_request_gets_its_block_first_and_no_extension_reaches_the_engine(fleet):
    f = fleet()
    k = f.kdns[0]
    for bid in BLOCKS:
        k.register(bid)
        k.wait_kv_ready(bid)
    wait_synced(f.gw, [k.id], blocks=len(BLOCKS))
    wait_current(f.gw, k)
    for bid in BLOCKS:
        r = ask(f.gw, bid, injection="text")
        assert r.status_code == 200, r.text
        assert r.headers["x-cacheroute-knowledge"] == bid
        assert r.headers["x-cacheroute-pool"] in f.pools
        assert r.headers["x-cacheroute-kdn"] == k.id
        inst = r.headers["x-cacheroute-instance"]
        sim = next(s for sims in f.pools.values() for s in sims if s.url == inst)
        body = sim.last_request()["body"]
        for field in ("RAG", "knowledge_ids", "injection"):
            assert field not in body, body
        msgs = body["messages"]
        assert msgs[0]["role"] == "system"
        assert msgs[0]["content"] == k.record(bid)["models"][MODEL]["content"]
        assert msgs[-1] == {"role": "user", "content": QUESTIONS[bid]}

    # Explicit ids are used as given; an unknown one is a 400 that names it.
    with client() as c:
        r = c.post(f.gw.v1 + "/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "knowledge_ids": ["tidal"],
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-cacheroute-knowledge"] == "tidal"
        r = c.post(f.gw.v1 + "/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "knowledge_ids": ["tidal", "no-such-block"],
            "messages": [{"role": "user", "content": "hi"}]})
        err = assert_openai_error(r, 400)
        assert "no-such-block" in err["message"] and err["param"] == "knowledge_ids"
        r = c.post(f.gw.v1 + "/chat/completions", json={
            "model": MODEL, "RAG": "yes", "messages": [{"role": "user", "content": "hi"}]})
        assert assert_openai_error(r, 400)["param"] == "RAG"

    # A request without RAG is left alone: no knowledge, the body unchanged.
    with client() as c:
        r = c.post(f.gw.v1 + "/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": QUESTIONS["basalt"]}]})
    assert r.status_code == 200 and "x-cacheroute-knowledge" not in r.headers
    assert "x-cacheroute-injection" not in r.headers and "x-cacheroute-decision" in r.headers


def test_overloaded_kdn_is_avoided(fleet):
    f = fleet(kdns=2, scheduler={"kdn_active_overload_th": 1}, slow_target=True)
    k1, k2 = f.kdns
    for k in (k1, k2):
        k.register("basalt")
        k.wait_kv_ready("basalt")
    wait_synced(f.gw, [k1.id, k2.id], blocks=1)
    r = ask(f.gw, "basalt", injection="text")
    assert r.status_code == 200
    assert r.headers["x-cacheroute-kdn"] == k1.id, "both idle: the tie goes to the smaller id"

    # kdn-1's transfer crawls over a 1 Mb/s link: it stays active for minutes.
    busy = k1.inject("basalt", "slow", wait=False)
    assert busy["status"] in ("queued", "running"), busy
    wait_until(lambda: k1.load()["active_transfers"] >= 1 or None, timeout=10, what="kdn-1 busy")

    def avoided():
        r = ask(f.gw, "basalt", injection="text")
        assert r.status_code == 200, r.text
        return r if r.headers["x-cacheroute-kdn"] == k2.id else None
    r = wait_until(avoided, timeout=10, interval=0.1, what="the gateway avoids the overloaded kdn-1")
    d = decision(f.gw, r)
    cands = {c["id"]: c for c in d["scheduling"]["kdn_candidates"]}
    assert cands[k1.id]["overloaded_by"] == ["active"] and not cands[k1.id]["qualifies"], dump(d)
    assert cands[k2.id]["qualifies"], dump(d)


def test_pool_whose_stores_hold_the_knowledge_is_preferred(fleet):
    # Only the KDN's registry tells residency here (not what the engines computed).
    f = fleet(proxy={"engine_stores_prefix": False})
    k = f.kdns[0]
    for bid in ("basalt", "tidal"):
        k.register(bid)
        k.wait_kv_ready(bid)
    # basalt's KV goes to pool-b's store, tidal's to pool-a's.
    assert k.inject("basalt", "pool-b")["status"] == "done"
    assert k.inject("tidal", "pool-a")["status"] == "done"

    def synced():
        s = knowledge_status(f.gw)
        return s if s["versions"].get(k.id) else None
    wait_until(synced, timeout=20, what="synced")

    def resident_seen(bid, want):
        r = ask(f.gw, bid, injection="text")
        assert r.status_code == 200, r.text
        d = decision(f.gw, r)
        hist = {c["name"]: c["history"] for c in d["scheduling"]["pool_candidates"]}
        return (r, d) if hist.get(want) == 1.0 else None
    for bid, want in (("basalt", "pool-b"), ("tidal", "pool-a")):
        r, d = wait_until(lambda: resident_seen(bid, want), timeout=20, interval=0.1,
                          what=f"the gateway sees {bid} resident in {want}'s store")
        other = "pool-a" if want == "pool-b" else "pool-b"
        hist = {c["name"]: c["history"] for c in d["scheduling"]["pool_candidates"]}
        assert hist == {want: 1.0, other: 0.0}, dump(d)
        assert r.headers["x-cacheroute-pool"] == want, dump(d)
        # and the engine did see the block's KV as a prefix hit
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_pool_past_its_safety_window_is_avoided(fleet):
    # pool-a holds the knowledge and history weighs 5: by score alone it always wins.
    f = fleet(scheduler={"w_history": 5.0}, time_scale=1.0,
              pool_kw={"pool-a": {"max_inflight": 1}, "pool-b": {"max_inflight": 1}})
    k = f.kdns[0]
    k.register("basalt")
    k.wait_kv_ready("basalt")
    assert k.inject("basalt", "pool-a")["status"] == "done"
    r = wait_until(lambda: (lambda r: r if r.headers["x-cacheroute-pool"] == "pool-a" else None)(
        ask(f.gw, "basalt", injection="text")), timeout=20, what="pool-a preferred while idle")

    # Keep pool-a's only slot busy with a long generation.
    import threading
    done = threading.Event()

    def long_request():
        try:
            with client(timeout=120) as c:
                c.post(f.gw.v1 + "/chat/completions", json={
                    "model": MODEL, "max_tokens": 4000, "knowledge_ids": ["basalt"],
                    "messages": [{"role": "user", "content": "Tell me everything."}]})
        except Exception:  # the fleet is torn down under it
            pass
        done.set()
    t = threading.Thread(target=long_request, daemon=True)
    t.start()
    wait_until(lambda: any(i["inflight"] for p in f.gw.status()["pools"] if p["name"] == "pool-a"
                           for i in p["instances"]) or None, timeout=10, what="pool-a busy")
    r = ask(f.gw, "basalt", injection="text")
    assert r.status_code == 200, r.text
    assert r.headers["x-cacheroute-pool"] == "pool-b", "pool-a is past the load safety window"
    d = decision(f.gw, r)
    c = {x["name"]: x for x in d["scheduling"]["pool_candidates"]}
    assert c["pool-a"]["score"] > c["pool-b"]["score"], dump(d)
    assert not c["pool-a"]["in_window"] and c["pool-b"]["in_window"], dump(d)
    assert not done.is_set()


def test_all_kdns_down_requests_still_succeed_as_text(fleet):
    f = fleet(kdns=2)
    for k in f.kdns:
        k.register("lichen")
        k.wait_kv_ready("lichen")
    wait_synced(f.gw, [k.id for k in f.kdns], blocks=1)

    def kdn_up() -> dict:
        fam = scrape(f.gw.control + "/metrics")
        return {k.id: sample_sum(fam, "cacheroute_kdn_up", lambda l, k=k: l == {"kdn": k.id}) for k in f.kdns}
    # the gauges are refreshed once a second: wait for them, then for each change
    wait_until(lambda: kdn_up() == {"kdn-1": 1, "kdn-2": 1}, timeout=10, what="cacheroute_kdn_up 1 for both")
    assert sample_sum(scrape(f.gw.control + "/metrics"), "cacheroute_knowledge_blocks") == 1
    f.kdns[0].proc.kill()
    wait_until(lambda: kdn_up() == {"kdn-1": 0, "kdn-2": 1}, timeout=10, what="cacheroute_kdn_up 0 for the dead KDN only")
    f.kdns[1].proc.kill()
    wait_synced(f.gw, [k.id for k in f.kdns], up=False)
    wait_until(lambda: kdn_up() == {"kdn-1": 0, "kdn-2": 0}, timeout=10, what="cacheroute_kdn_up 0 for both")
    r = ask(f.gw, "lichen")
    assert r.status_code == 200, r.text
    assert r.headers["x-cacheroute-knowledge"] == "lichen", "the synced catalog still retrieves"
    assert r.headers["x-cacheroute-kdn"] == "none"
    assert r.headers["x-cacheroute-injection"] == "text"
    inst = r.headers["x-cacheroute-instance"]
    sim = next(s for sims in f.pools.values() for s in sims if s.url == inst)
    first = sim.last_request()["body"]["messages"][0]
    assert first["role"] == "system" and "lichen" in first["content"]


def test_new_block_is_retrievable_within_a_sync_period(fleet):
    f = fleet(sync_ms=500)
    k = f.kdns[0]
    k.register("basalt")
    wait_synced(f.gw, [k.id], blocks=1)
    r = ask(f.gw, "tidal")
    assert r.headers.get("x-cacheroute-knowledge") != "tidal"
    t0 = time.monotonic()
    k.register("tidal", wait=False)

    def found():
        r = ask(f.gw, "tidal")
        return r if r.headers.get("x-cacheroute-knowledge") == "tidal" else None
    wait_until(found, timeout=10, interval=0.05, what="the new block is retrieved through the gateway")
    print(f"new block retrievable after {time.monotonic() - t0:.3f} s (sync period 0.5 s)")


@pytest.mark.parametrize("gateway_first", [True, False])
def test_startup_in_any_order_converges(procs, cr_bin, sim, gateway, redis_server, tmp_path, gateway_first):
    producer = sim(extra=sim_args(f"{redis_server}/0"))
    pool = sim(extra=sim_args(f"{redis_server}/1"))
    cport = free_port()
    control = f"http://127.0.0.1:{cport}"
    cfg = {"knowledge": {"sync_interval_ms": 200},
           "pools": [{"name": "pool-a", "models": [MODEL], "instances": [{"url": pool.url}]}]}
    targets = {"pool-a": (f"{redis_server}/1", None)}

    def start_gateway():
        return _gateway_on(gateway, cfg, cport)

    def start_kdn_():
        return start_kdn(procs, cr_bin, tmp_path, "kdn-1", redis_server, targets, producer.url,
                         gateways=[control])
    if gateway_first:
        gw = start_gateway()  # returns once it answers
        k = start_kdn_()
    else:
        k = start_kdn_()

        def heartbeats(result):
            return sample_sum(scrape(k.url + "/metrics"), "cacheroute_kdn_member_heartbeats_total",
                              lambda l: l == {"result": result})
        # the KDN is up and its registrations fail: no gateway listens yet
        wait_until(lambda: heartbeats("error") >= 1, timeout=15, what="a failed heartbeat")
        assert heartbeats("ok") == 0
        gw = start_gateway()
    k.register("basalt")
    k.wait_kv_ready("basalt")
    wait_synced(gw, [k.id], blocks=1)
    with client() as c:
        members = c.get(control + "/v1/members").json()["data"]
    assert [m["id"] for m in members if m["kind"] == "kdn"] == [k.id]

    def members_gauge():  # refreshed once a second
        fam = scrape(control + "/metrics")
        return [sample_sum(fam, "cacheroute_members", lambda l, k=k: l == {"kind": k}) for k in ("kdn", "agent")]
    wait_until(lambda: members_gauge() == [1, 0], timeout=10, what="cacheroute_members kdn 1, agent 0")
    # the sync that first brought the block may predate its kv_ready (warm-up is fast):
    # wait for the one that says so
    def via_the_kdn():
        r = ask(gw, "basalt", injection="text")
        assert r.status_code == 200 and r.headers["x-cacheroute-knowledge"] == "basalt"
        return r if r.headers["x-cacheroute-kdn"] == k.id else None
    wait_until(via_the_kdn, timeout=15, interval=0.1, what="the gateway schedules basalt via the KDN")

    # The gateway restarts: the KDN's heartbeat registers it again.
    gw.proc.stop()
    gw = _gateway_on(gateway, cfg, cport)
    wait_synced(gw, [k.id], blocks=1)


def _gateway_on(gateway, cfg, cport):
    """Start a gateway whose control plane is on a fixed port (members need to know it)."""
    return gateway(config=cfg, control_port=cport)


def test_multi_tier_scheduler_forwards_its_decision_to_a_proxy(fleet, gateway):
    f = fleet()
    k = f.kdns[0]
    k.register("tidal")
    k.wait_kv_ready("tidal")
    wait_synced(f.gw, [k.id], blocks=1)
    # The fleet's gateway becomes a proxy behind a scheduler whose only pool is it;
    # the two share a peer token, so the proxy trusts the scheduler's decision.
    f.config["gateway"]["role"] = "proxy"
    f.config["gateway"]["peer_token"] = "tier-s3cret"
    f.gw.write_config(f.config)
    wait_until(lambda: f.gw.status()["config_version"] >= 2 or None, timeout=10, what="proxy reload")
    sched = gateway(config={
        "gateway": {"role": "scheduler", "peer_token": "tier-s3cret"},
        "knowledge": {"sync_interval_ms": 200},
        "kdns": [{"url": k.url}],
        "pools": [{"name": "pool-a", "models": [MODEL], "instances": [{"url": f.gw.url}]}]})
    wait_synced(sched, [k.id], blocks=1)
    r = ask(sched, "tidal", injection="text")
    assert r.status_code == 200, r.text
    assert r.headers["x-cacheroute-knowledge"] == "tidal"
    assert r.headers["x-cacheroute-instance"] in [s.url for s in f.pools["pool-a"]], \
        "the proxy's headers reach the client: it chose the engine"
    assert r.headers["x-cacheroute-pool"] == "pool-a", "the proxy kept the scheduler's pool"
    d = decision(f.gw, r)
    assert d["role"] == "proxy" and d["hops"] == 1, dump(d)
    assert "upstream scheduler" in d["scheduling"]["reason"], dump(d)

    # A client sending the same decision headers without the token is not trusted:
    # the proxy decides for itself (retrieval finds the block the question is about,
    # not the one the forged header names).
    with client() as c:
        r = c.post(f.gw.v1 + "/chat/completions", headers={
            "x-cacheroute-hops": "1", "x-cacheroute-knowledge": "tidal", "x-cacheroute-pool": "pool-a",
            "x-cacheroute-kdn": "none", "x-cacheroute-peer": "guess"},
            json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    d = decision(f.gw, r)
    assert "upstream scheduler" not in d["scheduling"]["reason"], dump(d)
    assert r.headers.get("x-cacheroute-knowledge", "") == "", "no knowledge from a forged header"

    # A scheduler whose pool is itself: the hop counter stops the loop.
    loop_port = free_port()
    loop = gateway(config={
        "gateway": {"role": "scheduler", "max_hops": 3},
        "pools": [{"name": "self", "models": [MODEL], "instances": [{"url": f"http://127.0.0.1:{loop_port}"}]}]},
        port=loop_port)
    with client() as c:
        r = c.post(loop.v1 + "/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(r, 508)


def test_debug_strategy_and_decision_log(fleet, tmp_path):
    log = tmp_path / "decisions.jsonl"
    f = fleet(gateway_extra=["--log-decisions", str(log)])
    k = f.kdns[0]
    k.register("lichen")
    wait_synced(f.gw, [k.id], blocks=1)
    r = ask(f.gw, "lichen")
    assert r.status_code == 200
    d = decision(f.gw, r)
    s = d["scheduling"]
    assert s["knowledge"]["kind"] == "retrieved" and s["knowledge"]["hits"][0]["id"] == "lichen"
    assert s["knowledge"]["query"] == QUESTIONS["lichen"]
    assert {c["name"] for c in s["pool_candidates"]} == set(f.pools)
    assert all("score" in c and "load" in c for c in s["pool_candidates"])
    assert d["outcome"]["status"] == 200 and d["outcome"]["instance"] == r.headers["x-cacheroute-instance"]
    lines = wait_until(lambda: [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else None,
                       timeout=5, what="decision log written")
    assert any(x["id"] == d["id"] for x in lines)


def test_retrieval_by_embeddings(fleet):
    # The producer sim serves /v1/embeddings (a hashed bag of words).
    f = fleet(knowledge={"embeddings_model": MODEL}, embeddings=True)
    k = f.kdns[0]
    for bid in BLOCKS:
        k.register(bid, wait=False)

    def embedded():
        s = knowledge_status(f.gw)
        return s if s["blocks"] == len(BLOCKS) and s["embedded"] == len(BLOCKS) else None
    wait_until(embedded, timeout=20, what="every block embedded")
    for bid in BLOCKS:
        r = ask(f.gw, bid, injection="text")
        assert r.status_code == 200 and r.headers["x-cacheroute-knowledge"] == bid
        hits = decision(f.gw, r)["scheduling"]["knowledge"]["hits"]
        assert 0.0 < hits[0]["score"] <= 1.0 + 1e-6, hits
