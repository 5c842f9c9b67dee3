#!/usr/bin/env python3
"""Zipf knowledge workload: mean TTFT of the injection strategies side by side.

One run starts a real redis-server, a producer sim, N sims with LMCache stores in
Redis (H100 Llama-3-8B timing, real time), a KDN whose links to the sims are shaped,
and registers a corpus. Then, for each strategy (text, kv, iws, adaptive), it
flushes the sims' stores, starts a gateway with that `[proxy] injection`, and sends
the same workload: Poisson arrivals, each request a RAG question about a block drawn
from a Zipf distribution. TTFT is measured by the client (first streamed token).
An instance agent runs beside each sim. The KV reuse ratio is the knowledge tokens
the engines served from cache (usage.prompt_tokens_details.cached_tokens, at most
the block's prefix) over all knowledge tokens sent. Text-mode requests can reuse KV
too: LMCache stores a prefix after computing it, and the sim does the same.

    python3 benches/zipf/zipf.py [--requests 300] [--rate 12] [--blocks 40] [--zipf 1.1]
                                 [--sims 2] [--link-gbps 10] [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ports import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = "llama3-8b"
LMCACHE_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
WORDS = ("atlas basin cobalt delta ember fjord granite harbor island juniper kelp lagoon meadow "
         "nebula orchid prairie quartz reef savanna tundra umber valley willow xenon yarrow zephyr "
         "anchor beacon canyon dune estuary forest glacier highland inlet jungle knoll ledge mesa").split()


class Procs:
    def __init__(self, work: Path):
        self.work, self.procs = work, []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


def wait_http(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def corpus(n: int, rng: random.Random) -> list[dict]:
    blocks = []
    for i in range(n):
        key = f"{WORDS[i % len(WORDS)]}{i}"
        body = " ".join(rng.choice(WORDS) for _ in range(1500))
        blocks.append({"id": f"kb-{i:03d}", "title": f"Notes on {key}",
                       "text": f"These notes are about {key}. {body}", "key": key})
    return blocks


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def run_workload(base: str, schedule: list[tuple[float, dict]], timeout: float) -> list[dict]:
    results: list[dict] = [None] * len(schedule)  # type: ignore
    t0 = time.monotonic() + 0.2

    def one(i: int, at: float, block: dict) -> None:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        body = {"model": MODEL, "max_tokens": 8, "stream": True, "RAG": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"What do the notes say about {block['key']}?"}]}
        start = time.monotonic()
        ttft, status, mode, knowledge, cached = None, 0, "", "", 0
        try:
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=timeout,
                              trust_env=False) as r:
                status = r.status_code
                mode = r.headers.get("x-cacheroute-injection", "")
                knowledge = r.headers.get("x-cacheroute-knowledge", "")
                for line in r.iter_lines():
                    if line.startswith("data:") and '"content"' in line and ttft is None:
                        ttft = time.monotonic() - start
                    if line.startswith("data:") and '"usage"' in line:
                        try:
                            u = json.loads(line[5:]).get("usage") or {}
                            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                        except ValueError:
                            pass
                    if line.strip() == "data: [DONE]":
                        break
        except httpx.HTTPError as e:
            status = -1
            mode = str(e)[:80]
        results[i] = {"block": block["id"], "status": status, "ttft_ms": ttft and ttft * 1e3,
                      "mode": mode, "retrieved": knowledge == block["id"], "cached": cached}

    threads = [threading.Thread(target=one, args=(i, at, b)) for i, (at, b) in enumerate(schedule)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rate", type=float, default=12.0, help="mean arrivals per second")
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--sims", type=int, default=2)
    ap.add_argument("--link-gbps", type=float, default=10.0)
    ap.add_argument("--strategies", default="text,kv,iws,adaptive")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--bin", default=os.environ.get("CACHEROUTE_BIN", str(ROOT / "target/release/cacheroute")))
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    a = ap.parse_args()
    redis_exe = shutil.which("redis-server")
    if not redis_exe:
        sys.exit("redis-server is needed (apt-get install -y redis-server)")
    if not Path(a.bin).exists():
        sys.exit(f"{a.bin} not found: cargo build --release first")
    work = Path(tempfile.mkdtemp(prefix="cacheroute-zipf-"))
    procs = Procs(work)
    rng = random.Random(a.seed)
    try:
        rport = free_port()
        procs.start("redis", [redis_exe, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(work)])
        redis = f"redis://127.0.0.1:{rport}"
        time.sleep(0.5)

        def sim(name: str, db: int) -> str:
            port = free_port()
            procs.start(name, [a.bin, "sim", "--listen", f"127.0.0.1:{port}", "--model", MODEL,
                               "--time-scale", "1", "--kv-store", f"{redis}/{db}",
                               "--lmcache-model", LMCACHE_MODEL, "--lmcache-scheme", "lmcache-0.3.15",
                               "--chunk-size", "256", "--hash-seed", "0"])
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health")
            return url

        producer = sim("producer", 0)
        sims = [sim(f"sim-{i}", 1 + i) for i in range(a.sims)]
        kport = free_port()
        targets = "".join(f'[[targets]]\nname = "inst-{i}"\nstore = "{redis}/{1 + i}"\nlink_gbps = {a.link_gbps}\n\n'
                          for i in range(a.sims))
        (work / "kdn.toml").write_text(f"""[kdn]
id = "kdn-1"
listen = "127.0.0.1:{kport}"
registry = "memory://zipf"
store = "{redis}/0"
max_concurrent_injections = 8

[[models]]
name = "{MODEL}"
lmcache_model = "{LMCACHE_MODEL}"
template = "llama3"
scheme = "lmcache-0.3.15"
chunk_size = 256
hash_seed = "0"
kv_bytes_per_token = 131072
producer = "{producer}"

{targets}""")
        procs.start("kdn", [a.bin, "kdn", "--config", str(work / "kdn.toml")])
        kdn = f"http://127.0.0.1:{kport}"
        wait_http(kdn + "/health")
        blocks = corpus(a.blocks, rng)
        jsonl = "\n".join(json.dumps({k: b[k] for k in ("id", "title", "text")}) for b in blocks)
        r = httpx.post(kdn + "/v1/knowledge/bulk", params={"wait": "true"}, content=jsonl.encode(),
                       timeout=600, trust_env=False)
        r.raise_for_status()
        listed = httpx.get(kdn + "/v1/knowledge", params={"text": "false"}, trust_env=False).json()["data"]
        tokens = {d["id"]: d["models"][MODEL]["tokens"] for d in listed}
        print(f"registered {len(blocks)} blocks of {statistics.fmean(tokens.values()):.0f} tokens; "
              f"work dir {work}", flush=True)

        weights = zipf_weights(len(blocks), a.zipf)
        t, schedule = 0.0, []
        for _ in range(a.requests):
            t += rng.expovariate(a.rate)
            schedule.append((t, rng.choices(blocks, weights)[0]))

        rows = []
        for strategy in a.strategies.split(","):
            # Same starting point for every strategy: empty instance stores.
            for i in range(a.sims):
                with socket.create_connection(("127.0.0.1", rport)) as s:
                    s.sendall(f"SELECT {1 + i}\r\nFLUSHDB\r\n".encode())
                    s.recv(64)
            port, cport = free_port(), free_port()
            inst = "".join(f'  [[pools.instances]]\n  url = "{u}"\n  kv_target = "inst-{i}"\n'
                           for i, u in enumerate(sims))
            (work / f"gw-{strategy}.toml").write_text(f"""[gateway]
listen = "127.0.0.1:{port}"
control = "127.0.0.1:{cport}"
threads = 2

[knowledge]
sync_interval_ms = 200

[proxy]
injection = "{strategy}"
release = "ordered"

[[kdns]]
url = "{kdn}"

[[pools]]
name = "pool"
models = ["{MODEL}"]
policy = "knowledge_affinity"
{inst}""")
            gw = procs.start(f"gateway-{strategy}", [a.bin, "gateway", "--config", str(work / f"gw-{strategy}.toml"),
                                                     "--log-decisions", str(work / f"decisions-{strategy}.jsonl")])
            base, ctl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{cport}"
            wait_http(base + "/health")
            agents = []
            for i, u in enumerate(sims):
                ap_ = free_port()
                agents.append(procs.start(f"agent-{strategy}-{i}", [
                    a.bin, "agent", "--engine", u, "--listen", f"127.0.0.1:{ap_}", "--gateway", ctl,
                    "--kdn", kdn, "--kv-store", f"{redis}/{1 + i}", "--model", MODEL,
                    "--residency-ms", "500"]))
            end = time.monotonic() + 30
            while time.monotonic() < end:
                if f'"blocks": {len(blocks)}' in httpx.get(ctl + "/debug/knowledge", trust_env=False).text:
                    break
                time.sleep(0.1)
            res = run_workload(base, schedule, timeout=120)
            ok = [x for x in res if x and x["status"] == 200 and x["ttft_ms"] is not None]
            ttfts = sorted(x["ttft_ms"] for x in ok)
            ktoks = sum(tokens[x["block"]] for x in ok)
            cached = sum(min(x["cached"], tokens[x["block"]]) for x in ok)
            row = {
                "strategy": strategy, "requests": len(res), "ok": len(ok),
                "mean_ttft_ms": statistics.fmean(ttfts) if ttfts else None,
                "p50_ttft_ms": ttfts[len(ttfts) // 2] if ttfts else None,
                "p90_ttft_ms": ttfts[int(len(ttfts) * 0.9)] if ttfts else None,
                "kv_share": sum(1 for x in ok if x["mode"] == "kv") / max(1, len(ok)),
                "retrieval_hit": sum(1 for x in ok if x["retrieved"]) / max(1, len(ok)),
                "kv_reuse_ratio": cached / ktoks if ktoks else 0.0,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            procs.stop(gw)
            for ag in agents:
                procs.stop(ag)

        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        params = {k: getattr(a, k) for k in ("requests", "rate", "blocks", "zipf", "sims", "link_gbps", "seed")}
        (out / f"zipf-{stamp}.json").write_text(json.dumps({"params": params, "rows": rows}, indent=1))
        lines = ["| strategy | ok | mean TTFT | p50 | p90 | KV share | KV reuse ratio |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            f = lambda v: f"{v:.1f} ms" if v is not None else "-"
            lines.append(f"| {r['strategy']} | {r['ok']}/{r['requests']} | {f(r['mean_ttft_ms'])} | "
                         f"{f(r['p50_ttft_ms'])} | {f(r['p90_ttft_ms'])} | {r['kv_share']:.0%} | "
                         f"{r['kv_reuse_ratio']:.2f} |")
        table = "\n".join(lines)
        (out / f"zipf-{stamp}.md").write_text(f"params: {params}\n\n{table}\n")
        print(f"\nparams: {params}\n\n{table}")
        return 0
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
