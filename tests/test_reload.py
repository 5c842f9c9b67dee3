"""Hot reload: a valid config swapped in under load loses no request and
re-routes; an invalid one is rejected with a reason and changes nothing;
reload by admin call, by file change and by SIGHUP."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import httpx
import pytest

from crtest import chat_body, client, norm_url, pool, sample_sum, scrape, wait_until

N_REQUESTS = 2000
CONCURRENCY = 32
RELOAD_AFTER = 600  # completed requests before the reload is triggered


def cfg_for(url: str, watch: bool = False, **upstream) -> dict:
    up = {"policy": "round_robin"}
    up.update(upstream)
    return {"gateway": {"watch_config": watch}, "upstream": up, "pools": [pool("main", [url])]}


def reload_errors(g) -> float:
    return sample_sum(scrape(g.control + "/metrics"), "cacheroute_config_reload_total",
                      lambda l: l.get("result") == "error")


def instance_now(g) -> str:
    with client() as c:
        r = c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=1))
    assert r.status_code == 200, r.text[:300]
    return norm_url(r.headers.get("x-cacheroute-instance"))


async def load_with_reload(g, new_cfg: dict):
    results: list[tuple[int, str, str]] = []  # (status, instance, error)
    reload_resp: list[httpx.Response] = []
    done = 0
    reloaded = asyncio.Event()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(N_REQUESTS):
        queue.put_nowait(i)

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=30, trust_env=False, limits=limits) as c:

        async def worker():
            nonlocal done
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = chat_body(f"request {i}", max_tokens=2, stream=(i % 4 == 0))
                try:
                    r = await c.post(g.url + "/v1/chat/completions", json=body)
                    err = ""
                    if r.status_code != 200:
                        err = r.text[:200]
                    elif body["stream"] and not r.text.rstrip().endswith("data: [DONE]"):
                        err = "stream did not end with [DONE]"
                    elif not body["stream"] and not r.json()["choices"][0]["message"]["content"]:
                        err = "empty content"
                    results.append((r.status_code, norm_url(r.headers.get("x-cacheroute-instance")), err))
                except Exception as e:  # a transport error is a failed request
                    results.append((0, "", repr(e)))
                done += 1
                if done == RELOAD_AFTER and not reloaded.is_set():
                    reloaded.set()
                    g.write_config(new_cfg)
                    async with httpx.AsyncClient(timeout=30, trust_env=False) as ctl:
                        reload_resp.append(await ctl.post(g.control + "/admin/reload", headers=g.ctl_headers()))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results, reload_resp


def test_reload_under_load(sim, gateway):
    a, b = sim(), sim()
    g = gateway(config=cfg_for(a.url))
    v0 = g.status()["config_version"]
    ok_before = sample_sum(scrape(g.control + "/metrics"), "cacheroute_config_reload_total",
                           lambda l: l.get("result") == "ok")

    results, reload_resp = asyncio.run(load_with_reload(g, cfg_for(b.url)))

    assert len(results) == N_REQUESTS
    failed = [r for r in results if r[0] != 200 or r[2]]
    assert not failed, f"{len(failed)} failed requests, e.g. {failed[:5]}"
    assert len(reload_resp) == 1
    rr = reload_resp[0]
    assert rr.status_code == 200, rr.text
    assert rr.json()["ok"] is True
    assert rr.json()["version"] == v0 + 1
    seen = Counter(inst for _, inst, _ in results)
    assert set(seen) == {a.url, b.url}, seen  # routing changed in the middle of the load
    assert seen[a.url] >= RELOAD_AFTER

    st = g.status()
    assert st["config_version"] == v0 + 1
    assert [norm_url(i["url"]) for i in st["pools"][0]["instances"]] == [b.url]
    for _ in range(10):
        assert instance_now(g) == b.url
    fams = scrape(g.control + "/metrics")
    assert sample_sum(fams, "cacheroute_config_version") == v0 + 1
    assert sample_sum(fams, "cacheroute_config_reload_total", lambda l: l.get("result") == "ok") == ok_before + 1


BAD_TOML = '[gateway]\nwatch_config = false\n[[pools]\nname = "main"\n'


@pytest.mark.parametrize("kind", ["bad-toml", "negative-weight", "unknown-policy", "no-instances-url"])
def test_invalid_config_rejected(sim, gateway, kind):
    a, b = sim(), sim()
    g = gateway(config=cfg_for(a.url))
    g.write_config(cfg_for(b.url))
    r = g.reload()
    assert r.status_code == 200, r.text
    v = g.status()["config_version"]
    assert instance_now(g) == b.url
    errors_before = reload_errors(g)

    expect_word = None
    if kind == "bad-toml":
        bad: dict | str = BAD_TOML
    elif kind == "negative-weight":
        bad = cfg_for(a.url)
        bad["pools"][0]["instances"][0]["weight"] = -1
        expect_word = "weight"
    elif kind == "unknown-policy":
        bad = cfg_for(a.url, policy="random_magic")
        expect_word = "policy"
    else:
        bad = cfg_for(a.url)
        bad["pools"][0]["instances"][0]["url"] = "not a url"
        expect_word = "url"
    g.write_config(bad)
    r = g.reload()
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["ok"] is False
    assert isinstance(body["error"], str) and body["error"].strip()
    if expect_word:
        assert expect_word in body["error"].lower(), body["error"]

    assert reload_errors(g) == errors_before + 1
    assert g.status()["config_version"] == v
    for _ in range(5):
        assert instance_now(g) == b.url  # the old config keeps serving

    # and a good config afterwards is taken again
    g.write_config(cfg_for(a.url))
    r = g.reload()
    assert r.status_code == 200 and r.json()["version"] == v + 1, r.text
    assert instance_now(g) == a.url


def test_reload_on_file_change(sim, gateway):
    a, b = sim(), sim()
    g = gateway(config=cfg_for(a.url, watch=True))
    v0 = g.status()["config_version"]
    assert instance_now(g) == a.url
    g.write_config(cfg_for(b.url, watch=True))
    wait_until(lambda: g.status()["config_version"] > v0, timeout=20, what="reload after the file changed")
    assert [norm_url(i["url"]) for i in g.status()["pools"][0]["instances"]] == [b.url]
    for _ in range(5):
        assert instance_now(g) == b.url
    # a broken file on disk is rejected and counted; the old config stays
    errors_before = reload_errors(g)
    v1 = g.status()["config_version"]
    g.write_config(BAD_TOML.replace("watch_config = false", "watch_config = true"))
    wait_until(lambda: reload_errors(g) > errors_before, timeout=20, what="reload error counted for the bad file")
    assert g.status()["config_version"] == v1
    assert instance_now(g) == b.url


def test_reload_on_sighup(sim, gateway):
    a, b = sim(), sim()
    g = gateway(config=cfg_for(a.url))
    v0 = g.status()["config_version"]
    g.write_config(cfg_for(b.url))
    g.proc.signal(signal.SIGHUP)
    wait_until(lambda: g.status()["config_version"] == v0 + 1, timeout=20, what="reload after SIGHUP")
    assert g.proc.alive()
    for _ in range(5):
        assert instance_now(g) == b.url


def test_reload_changes_pools_and_models(sim, gateway):
    """A reload can add a pool serving a new model: it shows in /v1/models
    and is routed; removing it makes the model unknown (404) again."""
    a = sim()
    m = sim(model="other-model")
    g = gateway(config=cfg_for(a.url))
    with client() as c:
        assert c.post(g.url + "/v1/chat/completions", json=chat_body(model="other-model")).status_code == 404
        cfg = cfg_for(a.url)
        cfg["pools"].append(pool("second", [m.url], models=["other-model"]))
        g.write_config(cfg)
        assert g.reload().status_code == 200
        ids = {x["id"] for x in c.get(g.url + "/v1/models").json()["data"]}
        assert ids == {"llama3-8b", "other-model"}
        g.wait_healthy([m.url])
        r = c.post(g.url + "/v1/chat/completions", json=chat_body(model="other-model"))
        assert r.status_code == 200, r.text
        assert norm_url(r.headers.get("x-cacheroute-instance")) == m.url
        assert r.headers.get("x-cacheroute-pool") == "second"
        g.write_config(cfg_for(a.url))
        assert g.reload().status_code == 200
        assert c.post(g.url + "/v1/chat/completions", json=chat_body(model="other-model")).status_code == 404
