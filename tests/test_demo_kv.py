"""`cacheroute demo` with its KDN: the bundled corpus is registered (warmed up
through sim 0) and injected into sim 1, so a chat request whose first system
message is a block's registered content hits the KV cache through the gateway."""

from __future__ import annotations

import json
from pathlib import Path

from crtest import MODEL, client, free_port, norm_url, wait_until
from test_demo import two_free_ports

KNOWLEDGE = Path(__file__).resolve().parent.parent / "conf" / "knowledge"


def load_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (KNOWLEDGE / name).read_text().splitlines() if line.strip()]


def test_demo_corpus_has_questions():
    blocks = load_jsonl("demo.jsonl")
    questions = {q["id"]: q["question"] for q in load_jsonl("demo-questions.jsonl")}
    assert len(blocks) >= 24
    assert len({b["id"] for b in blocks}) == len(blocks)
    for b in blocks:
        assert b["text"].strip() and b["title"]
        assert questions.get(b["id"], "").strip().endswith("?"), b["id"]
    assert set(questions) == {b["id"] for b in blocks}


def chat(c, base: str, system: str, question: str) -> tuple[dict, str, int]:
    r = c.post(base + "/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 4,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    return r.json(), norm_url(r.headers.get("x-cacheroute-instance")), gpu_hit(r)


def gpu_hit(r) -> int:
    """Prompt tokens the sim's GPU prefix cache (vLLM's APC) supplied: a prompt the sim
    already computed is a GPU hit, possibly longer than the KV that LMCache holds."""
    return int(r.headers["x-sim-cached-gpu"])


def test_demo_kv_hit(procs, cr_bin):
    port, cport, kport, sim_port = free_port(), free_port(), free_port(), two_free_ports()
    p = procs.start("demo", [cr_bin, "demo", "--listen", f"127.0.0.1:{port}", "--control", f"127.0.0.1:{cport}",
                             "--sim-port", str(sim_port), "--kdn-listen", f"127.0.0.1:{kport}",
                             "--time-scale", "50", "--injection", "kv"])
    base, kdn = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{kport}"
    p.wait_http(base + "/health")
    p.wait_http(kdn + "/health")
    assert f"127.0.0.1:{kport}" in p.logs()

    blocks = load_jsonl("demo.jsonl")
    questions = {q["id"]: q["question"] for q in load_jsonl("demo-questions.jsonl")}
    ids = {b["id"] for b in blocks}

    def all_ready():
        with client() as c:
            r = c.get(kdn + "/v1/knowledge", params={"content": "true", "text": "false"})
        r.raise_for_status()
        recs = {d["id"]: d for d in r.json()["data"]}
        if set(recs) != ids:
            return None
        for rec in recs.values():
            m = rec["models"][MODEL]
            assert m["status"] != "failed", rec
            if m["status"] != "kv_ready" or "sim-1" not in m.get("resident", []):
                return None
        return recs

    recs = wait_until(all_ready, timeout=120, interval=0.25, what="every demo block kv_ready and injected into sim-1")
    wait_until(lambda: "knowledge ready" in p.logs(), timeout=30, what="the demo says the knowledge is ready")

    hit_on = set()
    with client(timeout=30) as c:
        for bid in [b["id"] for b in blocks][:: max(1, len(blocks) // 5)]:
            m = recs[bid]["models"][MODEL]
            assert m["tokens"] == m["chunks"] * m["chunk_size"] and m["chunks"] >= 1
            # the gateway spreads requests over both sims: both hold the block's KV
            for n in range(2):
                # a different question each time: the engine's prefix cache may still hold
                # the knowledge prefix (a GPU hit at least as long), never the whole prompt
                body, inst, gpu = chat(c, base, m["content"], f"{questions[bid]} ({n})")
                u = body["usage"]
                hit_on.add(inst)
                assert u["prompt_tokens"] > m["tokens"]
                # LMCache holds exactly the knowledge's chunks; the GPU may hold more
                assert u["prompt_tokens_details"]["cached_tokens"] == max(gpu, m["tokens"]), (bid, u, m, gpu)

        # the gateway's own retrieval: "RAG": true and just the question
        wait_until(lambda: '"blocks": %d' % len(blocks) in c.get(f"http://127.0.0.1:{cport}/debug/knowledge").text,
                   timeout=30, what="the gateway synced the KDN's registry")
        def kdn_idle():
            # the gateway's view of its KDN: up, no copy pending or running (the
            # previous request's injection counts against the overload thresholds)
            ks = c.get(f"http://127.0.0.1:{cport}/debug/knowledge").json()["kdns"]
            return all(k["up"] and k["load"] and k["load"]["pending_transfers"] == 0
                       and k["load"]["active_transfers"] == 0 for k in ks) and len(ks) == 1

        for bid in [b["id"] for b in blocks][:: max(1, len(blocks) // 5)]:
            m = recs[bid]["models"][MODEL]
            wait_until(kdn_idle, timeout=30, what="the gateway sees its KDN up and idle")
            r = c.post(base + "/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 4, "RAG": True,
                "messages": [{"role": "user", "content": questions[bid]}]})
            assert r.status_code == 200, r.text
            assert r.headers["x-cacheroute-knowledge"] == bid
            # 512-token blocks sit on the per-forward floor, where adaptive may pick
            # either mode: the demo runs with `--injection kv`, so KV it must be, with
            # the handle the sim checks and every knowledge token a cache hit.
            rid = int(r.headers["x-cacheroute-decision"])
            d = wait_until(lambda: next((x for x in c.get(f"http://127.0.0.1:{cport}/debug/strategy",
                                                          params={"n": 200}).json()["data"]
                                         if x["id"] == rid), None), timeout=5, what=f"decision {rid}")
            assert r.headers["x-cacheroute-injection"] == "kv", json.dumps(d)[:3000]
            assert d["injection"]["mode"] == "kv" and d["injection"]["strategy"] == "kv", d["injection"]
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == max(gpu_hit(r), m["tokens"])

        # a system prompt the KDN never registered: no KV anywhere
        body, _, gpu = chat(c, base, f"You are a terse assistant (test {kport}-{port}). " * 40, "What is BM25?")
        u = body["usage"]
        assert gpu == 0
        assert (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0, u
    assert hit_on == {f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{sim_port + 1}"}, hit_on
