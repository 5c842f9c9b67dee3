"""A knowledge fleet for the scheduler and proxy end-to-end tests: a real
redis-server, sims with LMCache stores in it, KDNs (`cacheroute kdn`) and a
gateway that syncs from them. Everything is a real process on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crtest import MODEL, client, free_port, to_toml, wait_until

LMCACHE_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
SCHEME = "lmcache-0.3.15"
CHUNK = 256

# Knowledge with words no other block shares, so retrieval is unambiguous; about
# 2,000 tokens each, long enough that on the H100 profile a cold prefill clearly
# costs more than loading the KV (short prefixes sit on the per-forward floor).
BLOCKS = {
    "basalt": ("Basalt columns", "The Giant's Causeway holds about forty thousand interlocking basalt "
               "columns, the result of an ancient volcanic fissure eruption. Most columns are hexagonal; "
               "the tallest reach twelve metres. Cooling lava contracted and cracked into polygons. " * 36),
    "tidal": ("Tidal bores", "A tidal bore is a wave that travels up a river against its current when an "
              "incoming tide funnels into a narrowing estuary. The Qiantang bore in China can reach nine "
              "metres; surfers ride the Severn bore in England for kilometres. " * 36),
    "lichen": ("Lichen symbiosis", "A lichen is a partnership between a fungus and a photosynthetic "
               "partner, usually an alga or a cyanobacterium. Reindeer lichen carpets the tundra; crustose "
               "lichens etch gravestones; some lichens survive exposure to outer space. " * 36),
}

QUESTIONS = {
    "basalt": "How many basalt columns does the Giant's Causeway have?",
    "tidal": "Where can surfers ride a tidal bore wave up an estuary?",
    "lichen": "Which partners form a lichen symbiosis on the tundra?",
}


def sim_args(store: str) -> list[str]:
    return ["--kv-store", store, "--lmcache-model", LMCACHE_MODEL, "--lmcache-scheme", SCHEME,
            "--chunk-size", str(CHUNK), "--hash-seed", "0"]


def kdn_config(kid: str, port: int, redis: str, targets: dict[str, tuple[str, float | None]],
               producer: str, gateways: list[str] | None = None, template: str = "llama3", **kdn: Any) -> str:
    cfg: dict[str, Any] = {
        "kdn": {"id": kid, "listen": f"127.0.0.1:{port}", "registry": f"memory://{kid}-{port}",
                "store": f"{redis}/0", "warmup_timeout_s": 60.0, **kdn},
        "models": [{"name": MODEL, "lmcache_model": LMCACHE_MODEL, "template": template,
                    "scheme": SCHEME, "chunk_size": CHUNK, "hash_seed": "0",
                    "kv_bytes_per_token": 131072, "producer": producer}],
        "targets": [dict(name=n, store=s, **({"link_gbps": g} if g is not None else {}))
                    for n, (s, g) in targets.items()],
    }
    if gateways:
        cfg["kdn"]["gateways"] = gateways
        cfg["kdn"]["heartbeat_s"] = 1.0
    return to_toml(cfg)


class Kdn:
    def __init__(self, proc, port: int, kid: str, token: str | None = None):
        self.proc, self.port, self.id, self.token = proc, port, kid, token
        self.url = f"http://127.0.0.1:{port}"

    def auth(self) -> dict:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def register(self, bid: str, wait: bool = True) -> dict:
        title, text = BLOCKS[bid]
        with client(timeout=60) as c:
            r = c.post(self.url + "/v1/knowledge", params={"wait": "true" if wait else "false"},
                       headers=self.auth(),
                       json={"id": bid, "title": title, "text": text, "models": [MODEL]})
        assert r.status_code in (200, 201), r.text
        return r.json()

    def record(self, bid: str) -> dict:
        with client() as c:
            r = c.get(self.url + f"/v1/knowledge/{bid}", params={"content": "true"})
        assert r.status_code == 200, r.text
        return r.json()

    def wait_kv_ready(self, bid: str) -> dict:
        def ready():
            rec = self.record(bid)
            m = rec["models"][MODEL]
            assert m["status"] != "failed", rec
            return rec if m["status"] == "kv_ready" else None
        return wait_until(ready, timeout=60, interval=0.1, what=f"{bid} kv_ready on {self.id}")

    def inject(self, bid: str, target: str, wait: bool = True) -> dict:
        with client(timeout=120) as c:
            r = c.post(self.url + "/v1/inject", headers=self.auth(),
                       json={"knowledge_ids": [bid], "model": MODEL, "target": target, "wait": wait})
        assert r.status_code in (200, 202), r.text
        return r.json()

    def load(self) -> dict:
        with client() as c:
            return c.get(self.url + "/v1/load").json()


def start_kdn(procs, cr_bin, tmp_path: Path, kid: str, redis: str, targets, producer: str,
              port: int | None = None, gateways: list[str] | None = None, template: str = "llama3",
              **kdn: Any) -> Kdn:
    port = port or free_port()
    path = tmp_path / f"{kid}.toml"
    path.write_text(kdn_config(kid, port, redis, targets, producer, gateways, template, **kdn))
    p = procs.start(kid, [cr_bin, "kdn", "--config", str(path)])
    k = Kdn(p, port, kid, kdn.get("token"))
    p.wait_http(k.url + "/health")
    return k


def ask(gw, bid: str | None = None, question: str | None = None, route: str = "chat",
        timeout: float = 30, **extra: Any):
    """A RAG request through the gateway; returns the httpx response."""
    q = question or QUESTIONS[bid]
    with client(timeout=timeout) as c:
        if route == "chat":
            body = {"model": MODEL, "max_tokens": 4, "RAG": True,
                    "messages": [{"role": "user", "content": q}], **extra}
            return c.post(gw.v1 + "/chat/completions", json=body)
        body = {"model": MODEL, "max_tokens": 4, "RAG": True, "prompt": q, **extra}
        return c.post(gw.v1 + "/completions", json=body)


def strategy(gw, n: int = 20) -> list[dict]:
    with client() as c:
        r = c.get(gw.control + "/debug/strategy", params={"n": n}, headers=gw.ctl_headers())
    assert r.status_code == 200, r.text
    return r.json()["data"]


def decision(gw, response) -> dict:
    rid = int(response.headers["x-cacheroute-decision"])

    def find():
        return next((d for d in strategy(gw, 200) if d["id"] == rid), None)
    return wait_until(find, timeout=5, what=f"decision {rid} in /debug/strategy")


def knowledge_status(gw) -> dict:
    with client() as c:
        r = c.get(gw.control + "/debug/knowledge", headers=gw.ctl_headers())
    assert r.status_code == 200, r.text
    return r.json()


def wait_synced(gw, kdn_ids: list[str], blocks: int | None = None, up: bool = True) -> dict:
    def ok():
        s = knowledge_status(gw)
        live = {k["id"]: k for k in s["kdns"]}
        if any(k not in live or live[k]["up"] != up for k in kdn_ids):
            return None
        if blocks is not None and s["blocks"] != blocks:
            return None
        return s
    return wait_until(ok, timeout=30, interval=0.1,
                      what=f"gateway synced from {kdn_ids} (up={up}, blocks={blocks})")


def wait_current(gw, kdn: "Kdn") -> None:
    """Wait until the gateway holds the KDN's registry as it is now (its snapshot ETag):
    block statuses and residency included, not just the block count."""
    def current():
        with client() as c:
            etag = c.get(kdn.url + "/v1/knowledge/snapshot").headers["etag"].strip('"')
        return knowledge_status(gw)["versions"].get(kdn.id) == etag
    wait_until(current, timeout=30, interval=0.1, what=f"the gateway holds {kdn.id}'s current registry")


def dump(x: Any) -> str:
    return json.dumps(x, indent=1)[:4000]
