"""/v1/models is the union over pools; requests are routed by model;
/health, /healthz and /debug/status."""

from __future__ import annotations

from crtest import chat_body, client, completion_body, free_port, norm_url, pool


def model_ids(g) -> list[str]:
    with client() as c:
        r = c.get(g.url + "/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    for m in body["data"]:
        assert m["object"] == "model"
    return [m["id"] for m in body["data"]]


def test_models_union_over_pools_config(sim, gateway):
    a1, a2 = sim(model="model-a"), sim(model="model-a")
    b = sim(model="model-b")
    g = gateway(config={"pools": [pool("pool-a", [a1.url, a2.url], models=["model-a"]),
                                  pool("pool-b", [b.url], models=["model-b"])]})
    ids = model_ids(g)
    assert sorted(ids) == ["model-a", "model-b"]  # each once
    with client() as c:
        for _ in range(4):
            r = c.post(g.url + "/v1/chat/completions", json=chat_body(model="model-b", max_tokens=1))
            assert r.status_code == 200, r.text
            assert r.headers.get("x-cacheroute-pool") == "pool-b"
            assert norm_url(r.headers.get("x-cacheroute-instance")) == b.url
            assert r.json()["model"] == "model-b"
            r = c.post(g.url + "/v1/completions", json=completion_body(model="model-a", max_tokens=1))
            assert r.status_code == 200, r.text
            assert r.headers.get("x-cacheroute-pool") == "pool-a"
            assert norm_url(r.headers.get("x-cacheroute-instance")) in (a1.url, a2.url)
        assert c.get(g.url + "/health").status_code == 200
        assert c.get(g.control + "/healthz").status_code == 200


def test_models_discovered_drop_in(sim, gateway):
    """Drop-in mode: no config, model names from each upstream's /v1/models."""
    x, y = sim(model="model-x"), sim(model="model-y")
    g = gateway(upstreams=[x.url, y.url])
    assert sorted(model_ids(g)) == ["model-x", "model-y"]
    with client() as c:
        for m, s in (("model-x", x), ("model-y", y), ("model-x", x)):
            r = c.post(g.url + "/v1/chat/completions", json=chat_body(model=m, max_tokens=1))
            assert r.status_code == 200, r.text
            assert norm_url(r.headers.get("x-cacheroute-instance")) == s.url
            assert r.headers.get("x-cacheroute-pool")


def test_models_discovered_when_pool_lists_none(sim, gateway):
    s = sim(model="found-model")
    g = gateway(config={"pools": [pool("auto", [s.url], models=[])]})
    assert model_ids(g) == ["found-model"]
    with client() as c:
        r = c.post(g.url + "/v1/chat/completions", json=chat_body(model="found-model", max_tokens=1))
    assert r.status_code == 200, r.text
    assert r.headers.get("x-cacheroute-pool") == "auto"


def test_debug_status_shape(sim, gateway):
    a, b = sim(), sim()
    g = gateway(config={"upstream": {"policy": "round_robin"},
                        "pools": [pool("main", [a.url, b.url], weights=[2, 5])]})
    st = g.status()
    assert isinstance(st["config_version"], int)
    assert len(st["pools"]) == 1
    p = st["pools"][0]
    assert p["name"] == "main"
    assert p["models"] == ["llama3-8b"]
    assert p["policy"] == "round_robin"
    inst = {norm_url(i["url"]): i for i in p["instances"]}
    assert set(inst) == {a.url, b.url}
    assert inst[a.url]["weight"] == 2 and inst[b.url]["weight"] == 5
    assert all(i["healthy"] is True and i["inflight"] == 0 for i in inst.values())


def test_health_without_upstreams_up(gateway):
    """The gateway's own /health answers even when no instance is up."""
    dead = f"http://127.0.0.1:{free_port()}"
    g = gateway(config={"pools": [pool("p", [dead])]}, wait_healthy=False)
    with client() as c:
        assert c.get(g.url + "/health").status_code == 200
        assert c.get(g.control + "/healthz").status_code == 200
