#!/usr/bin/env python3
"""RAG benchmark: every knowledge-serving policy over the same workload, side by side.

One command starts a loopback fleet (pools × instances of `cacheroute sim` with LMCache
stores in bounded redis-servers, a producer sim, a KDN with shaped links, an instance
agent per sim), registers a corpus, and for each policy, link speed and arrival rate
replays the same open-loop schedule with `cacheroute-loadgen` (Rust, one thread), then
writes a Markdown report, the raw JSON and PNG plots.

    python3 benches/rag/rag_bench.py                 # the default sweep (< 15 min, 2 cores)
    python3 benches/rag/rag_bench.py --small         # seconds: the test suite's configuration
    python3 benches/rag/rag_bench.py --rates 10,40 --links 10 --policies text,kv,adaptive

Policies (same schedule and seed; instance stores flushed and sims restarted per run):
  text, kv, hybrid, iws, adaptive      CacheRoute, `[proxy] injection = ...`, knowledge_affinity
  kv@round_robin, kv@least_loaded      CacheRoute KV with another instance policy (routing)
  vllm-router-cache_aware              vllm-router 0.1.17 --policy cache_aware, knowledge as text
  vllm-router-round_robin              vllm-router 0.1.17 --policy round_robin, knowledge as text
  shared-lmcache                       every sim on ONE LMCache store, vllm-router round_robin

Every time in the report is GPU time (wall time × --time-scale): the fleet runs X times
faster than an H100 would, through a scaled profile, scaled link speeds and arrivals.
See benches/rag/README.md for how to read the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def ensure_packages() -> None:
    """httpx, matplotlib and tqdm, installed with pip when missing (the bench's only deps)."""
    missing = []
    for mod, pkg in (("httpx", "httpx"), ("matplotlib", "matplotlib"), ("tqdm", "tqdm")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        print(f"installing {' '.join(missing)} (pip)", flush=True)
        base = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing]
        if subprocess.run(base).returncode != 0:
            subprocess.run([*base, "--break-system-packages"], check=True)


ensure_packages()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ports import free_port  # noqa: E402

import httpx  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = "llama3-8b"
LMCACHE_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
SCHEME = "lmcache-0.3.15"
CHUNK = 256
VLLM_ROUTER_VERSION = "0.1.17"

# Loopback only: never route bench traffic through a proxy from the environment.
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(x for x in ("127.0.0.1,localhost", os.environ.get(_var, "")) if x)

CR_INJECTIONS = ("text", "kv", "hybrid", "iws", "adaptive")
ROUTING = ("round_robin", "least_loaded")
ALL_POLICIES = (*CR_INJECTIONS, *(f"kv@{r}" for r in ROUTING),
                "vllm-router-cache_aware", "vllm-router-round_robin", "shared-lmcache")
DEFAULT_POLICIES = ALL_POLICIES

# Word list for generated knowledge text (no file needed; deterministic by seed).
WORDS = ("atlas basin cobalt delta ember fjord granite harbor island juniper kelp lagoon meadow "
         "nebula orchid prairie quartz reef savanna tundra umber valley willow xenon yarrow zephyr "
         "anchor beacon canyon dune estuary forest glacier highland inlet jungle knoll ledge mesa "
         "river summit timber upland vapor wharf alloy barley cedar dynamo engine filter gasket "
         "hinge iron joist kernel lever magnet nozzle oxide piston quarry rotor sensor turbine "
         "valve winch yield zinc across before during within between against without through "
         "measure record report observe compare predict explain describe estimate increase "
         "reduce maintain support provide require include produce consider develop").split()


# --------------------------------------------------------------------------- utilities


def client(timeout: float = 10.0) -> httpx.Client:
    return httpx.Client(timeout=timeout, trust_env=False)


class Procs:
    """Processes started by the bench, each in its own session, killed at the end."""

    def __init__(self, work: Path):
        self.work, self.procs = work, []
        self.counts: dict[str, int] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        n = self.counts.get(name, 0)
        self.counts[name] = n + 1
        log = open(self.work / "logs" / f"{name}{'-' + str(n) if n else ''}.log", "wb")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        p.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
            except ProcessLookupError:
                pass
        if p in self.procs:
            self.procs.remove(p)

    def cpu_s(self) -> float:
        """User + system CPU seconds of the live processes (USER_HZ = 100)."""
        total = 0.0
        for p in self.procs:
            try:
                f = Path(f"/proc/{p.pid}/stat").read_text()
                rest = f[f.rfind(")") + 2:].split()
                total += (int(rest[11]) + int(rest[12])) / 100.0
            except (OSError, ValueError, IndexError):
                pass
        return total

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)


def log_tail(p: subprocess.Popen, n: int = 2000) -> str:
    try:
        return Path(p.log_path).read_text(errors="replace")[-n:]  # type: ignore[attr-defined]
    except OSError:
        return ""


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0,
              ok=lambda r: r.status_code < 500) -> httpx.Response:
    end = time.monotonic() + timeout
    last = ""
    with client(2.0) as c:
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: the process exited ({proc.returncode}):\n{log_tail(proc)}")
            try:
                r = c.get(url)
                if ok(r):
                    return r
                last = f"HTTP {r.status_code}: {r.text[:300]}"
            except httpx.HTTPError as e:
                last = str(e)
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last})"
                       + (f"\n{log_tail(proc)}" if proc is not None else ""))


def redis_cmd(port: int, *args: str) -> bytes:
    """One RESP command over a raw socket (no client library needed)."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload.encode())
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def prom_sum(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Sum of a Prometheus metric's samples (optionally matching some labels); None if absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name):]
        if rest[:1] not in ("{", " "):
            continue
        if labels:
            lab = rest[rest.find("{") + 1:rest.find("}")] if rest.startswith("{") else ""
            kv = dict(re.findall(r'(\w+)="([^"]*)"', lab))
            if any(kv.get(k) != v for k, v in labels.items()):
                continue
        try:
            total += float(line.rsplit(" ", 1)[1])
            seen = True
        except ValueError:
            pass
    return total if seen else None


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round((len(s) - 1) * q)))]


def fmt(v, digits: int = 0, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.{digits}f}{unit}"


def fmt_bytes(b) -> str:
    if b is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000.0
    return str(b)


# --------------------------------------------------------------------------- workload

def lognormal_bytes(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """Clipped log-normal over bytes: NQ documents span 378–20,714 B, median ≈ 6.3 kB."""
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def make_corpus(n: int, rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> list[dict]:
    blocks = []
    for i in range(n):
        key = f"{WORDS[i % len(WORDS)]}{i}"
        target = lognormal_bytes(rng, median, sigma, lo, hi)
        parts = [f"These notes are about {key}."]
        size = len(parts[0])
        while size < target:
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
            parts.append(sentence)
            size += len(sentence) + 1
        text = " ".join(parts)[:target].rstrip()
        blocks.append({"id": f"kb-{i:04d}", "title": f"Notes on {key}", "text": text, "key": key})
    return blocks


def zipf_cdf(n: int, alpha: float) -> list[float]:
    w = [1.0 / (k ** alpha) for k in range(1, n + 1)]
    total, acc, cdf = sum(w), 0.0, []
    for x in w:
        acc += x / total
        cdf.append(acc)
    return cdf


def make_requests(blocks: list[dict], n: int, alpha: float, q_words: int, rng: random.Random) -> list[tuple[str, str]]:
    """(block id, question) pairs, Zipf over a seeded permutation of the blocks (so that
    popularity is independent of the block's length)."""
    order = list(range(len(blocks)))
    rng.shuffle(order)
    cdf = zipf_cdf(len(blocks), alpha)
    out = []
    for i in range(n):
        u = rng.random()
        lo, hi = 0, len(cdf) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cdf[mid] < u:
                lo = mid + 1
            else:
                hi = mid
        b = blocks[order[lo]]
        filler = " ".join(rng.choice(WORDS) for _ in range(max(0, q_words - 8)))
        out.append((b["id"], f"Question {i}: what do the notes say about {b['key']}? Context: {filler}"))
    return out


def arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """Poisson arrival times (GPU seconds) of n requests at `rate` req/s, unit-rate
    exponentials scaled so that every rate replays the same sequence, compressed."""
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(1.0)
        out.append(t / rate)
    return out


def load_trace(path: Path, max_requests: int) -> tuple[list[dict], list[tuple[str, str]], list[float]]:
    """A user's trace: {knowledge_id | knowledge_text, question, arrival_s} per line."""
    blocks: dict[str, dict] = {}
    reqs, times = [], []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if len(reqs) >= max_requests:
            sys.exit(f"{path}: more than {max_requests} requests (raise --max-trace-requests)")
        try:
            r = json.loads(line)
            q = str(r["question"])
            at = float(r["arrival_s"])
        except (ValueError, KeyError, TypeError) as e:
            sys.exit(f"{path}:{ln}: need question and arrival_s ({e})")
        if not (math.isfinite(at) and at >= 0):
            sys.exit(f"{path}:{ln}: arrival_s must be a number ≥ 0")
        if "knowledge_text" in r:
            text = str(r["knowledge_text"])
            bid = r.get("knowledge_id") or "kt-" + hashlib.sha256(text.encode()).hexdigest()[:16]
        elif "knowledge_id" in r:
            bid, text = str(r["knowledge_id"]), None
        else:
            sys.exit(f"{path}:{ln}: need knowledge_id or knowledge_text")
        if bid not in blocks:
            if text is None:
                sys.exit(f"{path}:{ln}: knowledge_id {bid!r} has no knowledge_text on an earlier line")
            blocks[bid] = {"id": bid, "title": None, "text": text, "key": bid}
        reqs.append((bid, q))
        times.append(at)
    if not reqs:
        sys.exit(f"{path}: no requests")
    t0 = min(times)
    return list(blocks.values()), reqs, [t - t0 for t in times]


# --------------------------------------------------------------------------- fleet

def scaled_profile(src: Path, x: float, dst: Path) -> dict:
    """The profile with every ms figure ÷ X and every GB/s × X: an X-times faster GPU."""
    prof = json.loads(src.read_text())
    for k, v in prof.items():
        if k.endswith("_ms") and isinstance(v, dict):
            prof[k] = {kk: vv / x for kk, vv in v.items()}
        elif k.endswith("_GBps") and isinstance(v, dict):
            prof[k] = {kk: vv * x for kk, vv in v.items()}
    dst.write_text(json.dumps(prof, indent=1))
    return prof


@dataclass
class SimCaps:
    """What `cacheroute sim --help` offers (the tiered-cache flags land separately)."""
    local_cpu: bool = False
    kv_store_gbps: bool = False
    no_apc: bool = False
    async_loading: bool = False

    @staticmethod
    def detect(bin_: str) -> "SimCaps":
        h = subprocess.run([bin_, "sim", "--help"], capture_output=True, text=True).stdout
        return SimCaps("--lmcache-local-cpu-size" in h, "--kv-store-gbps" in h,
                       "--no-enable-prefix-caching" in h, "--lmcache-async-loading" in h)


@dataclass
class Sizing:
    corpus_tokens: int
    corpus_chunks: int
    gpu_blocks: int
    cpu_gb: float
    store_bytes: int
    lines: list[str] = field(default_factory=list)


@dataclass
class Fleet:
    a: argparse.Namespace
    work: Path
    procs: Procs
    profile: Path
    caps: SimCaps
    redis_exe: str
    kdn_redis: int = 0
    inst_redis: list[int] = field(default_factory=list)
    shared_redis: int = 0
    producer: str = ""
    sizing: Sizing | None = None

    # names ---------------------------------------------------------------
    @property
    def n_inst(self) -> int:
        return self.a.pools * self.a.instances

    def inst_name(self, i: int) -> str:
        return f"p{i // self.a.instances}-i{i % self.a.instances}"

    # redis ---------------------------------------------------------------
    def redis(self, name: str, maxmemory: int | None) -> int:
        port = free_port()
        args = [self.redis_exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.work)]
        if maxmemory:
            args += ["--maxmemory", str(maxmemory), "--maxmemory-policy", "allkeys-lru"]
        p = self.procs.start(name, args)
        end = time.monotonic() + 20
        while True:
            try:
                if b"PONG" in redis_cmd(port, "PING"):
                    return port
            except OSError:
                pass
            if p.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"redis-server {name} did not start:\n{log_tail(p)}")
            time.sleep(0.05)

    def start_stores(self) -> None:
        s = self.sizing
        assert s is not None
        self.inst_redis = [self.redis(f"redis-{self.inst_name(i)}", s.store_bytes) for i in range(self.n_inst)]
        self.shared_redis = self.redis("redis-shared", s.store_bytes * self.n_inst)

    def flush_stores(self) -> None:
        for port in (*self.inst_redis, self.shared_redis):
            redis_cmd(port, "FLUSHALL")

    def store_used(self, port: int) -> int:
        info = redis_cmd(port, "INFO", "memory").decode(errors="replace")
        m = re.search(r"used_memory:(\d+)", info)
        return int(m.group(1)) if m else 0

    # sims ----------------------------------------------------------------
    def sim_args(self, port: int, store: str, seed: int, gpu_blocks: int | None, tiers: bool = True) -> list[str]:
        """A sim's command line; `tiers`: with the cache-tier flags (not the producer's,
        whose only job is to fill the KDN store)."""
        args = [self.a.bin, "sim", "--listen", f"127.0.0.1:{port}", "--model", MODEL,
                "--profile", str(self.profile), "--time-scale", "1", "--kv-store", store,
                "--lmcache-model", LMCACHE_MODEL, "--lmcache-scheme", SCHEME,
                "--chunk-size", str(CHUNK), "--hash-seed", "0", "--seed", str(seed)]
        if gpu_blocks:
            args += ["--num-gpu-blocks", str(gpu_blocks)]
        if tiers and self.caps.local_cpu and self.sizing is not None:
            gb = self.sizing.cpu_gb
            args += ["--lmcache-local-cpu-size", str(int(gb)) if self.cpu_gb_integer else f"{gb:.4f}"]
        if tiers and self.caps.kv_store_gbps:
            # always passed (0 = a free link): the sim's own default is not time-scaled
            args += ["--kv-store-gbps", str(self.a.kv_store_gbps * self.a.time_scale)]
        if tiers and self.a.async_loading:
            args += ["--lmcache-async-loading"]
        return args

    def start_producer(self) -> None:
        port = free_port()
        p = self.procs.start("producer", self.sim_args(port, f"redis://127.0.0.1:{self.kdn_redis}/0", 0, None,
                                                            tiers=False))
        self.producer = f"http://127.0.0.1:{port}"
        wait_http(self.producer + "/health", p)

    def start_sims(self, shared: bool) -> list[tuple[str, subprocess.Popen]]:
        assert self.sizing is not None
        out = []
        for i in range(self.n_inst):
            port = free_port()
            rport = self.shared_redis if shared else self.inst_redis[i]
            p = self.procs.start(f"sim-{self.inst_name(i)}",
                                 self.sim_args(port, f"redis://127.0.0.1:{rport}", 1 + i, self.sizing.gpu_blocks))
            out.append((f"http://127.0.0.1:{port}", p))
        for url, p in out:
            wait_http(url + "/health", p)
        return out

    # KDN -----------------------------------------------------------------
    def kdn_toml(self, port: int, link_gbps: float | None) -> str:
        x = self.a.time_scale
        targets = ""
        for i in range(len(self.inst_redis)):
            targets += (f'[[targets]]\nname = "{self.inst_name(i)}"\n'
                        f'store = "redis://127.0.0.1:{self.inst_redis[i]}"\n')
            if link_gbps:
                # The link runs X times faster, like everything else in the fleet.
                targets += f"link_gbps = {link_gbps * x}\n"
            targets += "\n"
        return f"""[kdn]
id = "kdn-1"
listen = "127.0.0.1:{port}"
registry = "redis://127.0.0.1:{self.kdn_redis}/1"
store = "redis://127.0.0.1:{self.kdn_redis}/0"
max_concurrent_injections = {self.a.kdn_concurrency}
max_queue = 4096
max_concurrent_warmups = 2
warmup_timeout_s = 600.0
max_bulk_bytes = 268435456

[[models]]
name = "{MODEL}"
lmcache_model = "{LMCACHE_MODEL}"
template = "llama3"
scheme = "{SCHEME}"
chunk_size = {CHUNK}
hash_seed = "0"
kv_bytes_per_token = {self.kv_bytes_per_token}
producer = "{self.producer}"

{targets}"""

    kv_bytes_per_token: int = 131072
    cpu_gb_integer: bool = False

    def start_kdn(self, link_gbps: float | None, tag: str) -> tuple[str, subprocess.Popen]:
        port = free_port()
        cfg = self.work / f"kdn-{tag}.toml"
        cfg.write_text(self.kdn_toml(port, link_gbps))
        p = self.procs.start(f"kdn-{tag}", [self.a.bin, "kdn", "--config", str(cfg)])
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", p)
        return url, p


def size_caches(a: argparse.Namespace, tokens: dict[str, int], prompt_max: int, kvbpt: int) -> Sizing:
    """Per-instance cache sizes as fractions of the corpus, so that the corpus exceeds
    what the instances hold (all of them together, each tier), with a GPU cache large
    enough for a few of the longest prompts at once."""
    corpus_tokens = sum(tokens.values())
    corpus_chunks = corpus_tokens // CHUNK
    gpu_blocks = max(int(a.gpu_cache_frac * corpus_tokens / 16), 4 * math.ceil(prompt_max / 16))
    cpu_gb = a.cpu_cache_frac * corpus_tokens * kvbpt / 2 ** 30
    # A stored chunk: the scaled blob (real bytes / 1024) + LMCache's header and the keys.
    chunk_bytes = CHUNK * kvbpt // 1024 + 400
    store_bytes = int(a.store_frac * corpus_chunks * chunk_bytes) + 3 * 2 ** 20
    s = Sizing(corpus_tokens, corpus_chunks, gpu_blocks, cpu_gb, store_bytes)
    n = a.pools * a.instances
    real_corpus = corpus_tokens * kvbpt
    s.lines = [
        f"corpus: {len(tokens)} blocks, {corpus_tokens:,} knowledge tokens, {corpus_chunks:,} chunks, "
        f"{real_corpus / 1e9:.1f} GB of real KV ({real_corpus / 1024 / 1e6:.1f} MB scaled 1/1024)",
        f"per instance ({n} instances): GPU KV cache {gpu_blocks:,} blocks = {gpu_blocks * 16:,} tokens "
        f"({gpu_blocks * 16 / corpus_tokens:.0%} of the corpus; prefix-cache eviction only once the sim "
        f"has vLLM APC), LMCache CPU tier {cpu_gb:.2f} GB = {a.cpu_cache_frac:.0%} of the corpus "
        f"(when the sim has --lmcache-local-cpu-size), remote store redis maxmemory "
        f"{store_bytes / 1e6:.1f} MB ≈ {a.store_frac:.0%} of the corpus (allkeys-lru), "
        f"loaded over a {a.kv_store_gbps:g} Gb/s link (`--kv-store-gbps`, GPU time; the gateway's `store_gbps`)"
        + (", prefetched off the step (LMCache async loading, `--async-loading`)" if a.async_loading else
           ", in the step that admits the request (LMCache's default blocking load)"),
        f"all instances together hold at most {n * a.store_frac:.0%} of the corpus in their stores",
    ]
    return s


def repeat_reuse_bound(reqs: list[tuple[str, str]], tokens: dict[str, int]) -> float:
    """The most KV reuse any cache can give without the KDN: the share of knowledge tokens
    sent for a block that an earlier request of the run already asked for."""
    seen: set[str] = set()
    total = repeat = 0
    for bid, _ in reqs:
        t = tokens.get(bid, 0)
        total += t
        if bid in seen:
            repeat += t
        seen.add(bid)
    return repeat / total if total else 0.0


# --------------------------------------------------------------------------- policies

@dataclass(frozen=True)
class Policy:
    name: str
    kind: str                 # cacheroute | router | shared
    injection: str = ""       # cacheroute
    upstream: str = "knowledge_affinity"
    router_policy: str = ""   # router | shared

    @property
    def uses_kdn(self) -> bool:
        return self.kind == "cacheroute" and self.injection != "text"

    @property
    def routing_only(self) -> bool:
        """Only run at the routing rate (the instance-policy comparison)."""
        return "@" in self.name


def policy(name: str) -> Policy:
    if name in CR_INJECTIONS:
        return Policy(name, "cacheroute", injection=name)
    if name.startswith("kv@"):
        up = name[3:]
        if up not in ROUTING + ("knowledge_affinity",):
            raise ValueError(name)
        return Policy(name, "cacheroute", injection="kv", upstream=up)
    if name.startswith("vllm-router-"):
        return Policy(name, "router", router_policy=name[len("vllm-router-"):])
    if name == "shared-lmcache":
        return Policy(name, "shared", router_policy="round_robin")
    raise ValueError(name)


def gateway_toml(a, fleet: Fleet, pol: Policy, port: int, cport: int, kdn: str, sims: list[str]) -> str:
    x = a.time_scale
    # the sims' store link as the gateway's cost model sees it (wall time, like the profile)
    store_gbps = a.kv_store_gbps * x if fleet.caps.kv_store_gbps else 0.0
    pools = ""
    for p in range(a.pools):
        pools += f'\n[[pools]]\nname = "pool-{p}"\nmodels = ["{MODEL}"]\npolicy = "{pol.upstream}"\n'
        for j in range(a.instances):
            i = p * a.instances + j
            pools += f'\n  [[pools.instances]]\n  url = "{sims[i]}"\n  kv_target = "{fleet.inst_name(i)}"\n'
    return f"""[gateway]
listen = "127.0.0.1:{port}"
control = "127.0.0.1:{cport}"
threads = {a.gateway_threads}
watch_config = false
decision_history = 64

[knowledge]
sync_interval_ms = 200

[proxy]
injection = "{pol.injection}"
release = "ordered"
profile = "{fleet.profile}"
kv_deadline_ms = {max(1, round(5000 / x))}
link_rtt_ms = {0.5 / x:.4f}
store_gbps = {store_gbps}
store_async_loading = {str(a.async_loading).lower()}
weigh_others = {str(a.weigh_others).lower()}

[upstream]
read_timeout_ms = 600000
queue_timeout_ms = 600000

[[kdns]]
url = "{kdn}"
{pools}"""


# --------------------------------------------------------------------------- one run

@dataclass
class RunSpec:
    policy: Policy
    rate: float               # GPU req/s
    link: float | None        # Gb/s (None: no KDN involved)


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.work = Path(tempfile.mkdtemp(prefix="cacheroute-rag-"))
        (self.work / "logs").mkdir()
        self.procs = Procs(self.work)
        self.caps = SimCaps.detect(a.bin)
        if a.async_loading and not self.caps.async_loading:
            raise SystemExit(f"--async-loading: {a.bin} sim has no --lmcache-async-loading (rebuild it)")
        self.hybrid_ok: bool | None = None

    # setup -----------------------------------------------------------------
    def setup(self) -> None:
        a = self.a
        redis_exe = shutil.which("redis-server")
        if not redis_exe:
            sys.exit("redis-server is needed (apt-get install -y redis-server)")
        profile = self.work / f"profile-x{a.time_scale:g}.json"
        prof = scaled_profile(Path(a.profile), a.time_scale, profile)
        self.fleet = f = Fleet(a, self.work, self.procs, profile, self.caps, redis_exe)
        f.kv_bytes_per_token = int(prof.get("kv_bytes_per_token", 131072))
        f.kdn_redis = f.redis("redis-kdn", None)
        f.start_producer()

        rng = random.Random(a.seed)
        if a.trace:
            blocks, reqs, times = load_trace(Path(a.trace), a.max_trace_requests)
            self.trace_times = times
        else:
            blocks = make_corpus(a.blocks, rng, a.doc_median_bytes, a.doc_sigma, a.doc_min_bytes, a.doc_max_bytes)
            reqs = make_requests(blocks, a.requests, a.zipf, a.question_words, rng)
            self.trace_times = None
        self.blocks, self.reqs = blocks, reqs
        self.unit_arrivals = arrivals(len(reqs), 1.0, random.Random(a.seed + 1))

        # Register the corpus once (the producer computes each block's KV into the KDN
        # store); later KDNs reuse the registry and store in Redis.
        kdn, kp = f.start_kdn(None, "register")
        jsonl = "\n".join(json.dumps({k: b[k] for k in ("id", "title", "text") if b.get(k) is not None})
                          for b in blocks)
        t = time.monotonic()
        with client(timeout=3600) as c:
            r = c.post(kdn + "/v1/knowledge/bulk", params={"wait": "true"}, content=jsonl.encode())
            if r.status_code >= 300:
                sys.exit(f"registering the corpus: HTTP {r.status_code}: {r.text[:500]}")
            listed = c.get(kdn + "/v1/knowledge", params={"text": "false", "content": "true"}).json()["data"]
        self.tokens = {d["id"]: d["models"][MODEL]["tokens"] for d in listed}
        self.content = {d["id"]: d["models"][MODEL]["content"] for d in listed}
        status = {d["id"]: d["models"][MODEL]["status"] for d in listed}
        not_ready = [k for k, v in status.items() if v not in ("ready", "kv_ready")]
        if not_ready:
            print(f"warning: {len(not_ready)} blocks not KV-ready (status {status[not_ready[0]]}): "
                  "they go as text", file=sys.stderr)
        f.procs.stop(kp)
        q_tokens = max(len(q) for _, q in reqs) // 2 + 64
        prompt_max = max(self.tokens.values()) + q_tokens + a.max_tokens
        f.sizing = size_caches(a, self.tokens, prompt_max, f.kv_bytes_per_token)
        self.probe_sim_flags()
        f.start_stores()
        lens = sorted(len(b["text"]) for b in blocks)
        toks = sorted(self.tokens.values())
        print(f"registered {len(blocks)} blocks in {time.monotonic() - t:.1f} s: text {lens[0]:,}–{lens[-1]:,} B "
              f"(median {lens[len(lens) // 2]:,}), {toks[0]:,}–{toks[-1]:,} tokens (median {toks[len(toks) // 2]:,})")
        for line in f.sizing.lines:
            print(line)
        caps = ", ".join(k for k, v in vars(self.caps).items() if v) or "none"
        print(f"sim tier flags detected: {caps}; work dir {self.work}", flush=True)

    def probe_sim_flags(self) -> None:
        """Start one sim with the tier flags the help listed: a flag whose value this
        sim refuses (another unit or type than assumed) is rounded, then dropped with a
        warning, rather than failing every run."""
        f = self.fleet
        for attempt in range(3):
            if not (self.caps.local_cpu or self.caps.kv_store_gbps):
                return
            port = free_port()
            args = f.sim_args(port, "memory://probe", 0, f.sizing.gpu_blocks if f.sizing else None)
            p = self.procs.start("sim-probe", args)
            try:
                wait_http(f"http://127.0.0.1:{port}/health", p, timeout=20)
                return
            except RuntimeError as e:
                lines = str(e).splitlines()
                why = next((x for x in lines if x.startswith("error")), lines[-1] if lines else "")
                print(f"warning: the sim refused the tier flags ({why[:200]})", file=sys.stderr)
                if attempt == 0 and f.sizing is not None and self.caps.local_cpu:
                    f.sizing.cpu_gb = float(max(1, round(f.sizing.cpu_gb)))
                    f.cpu_gb_integer = True
                else:
                    self.caps.local_cpu = self.caps.kv_store_gbps = False
            finally:
                self.procs.stop(p)

    # schedules -------------------------------------------------------------
    def schedule(self, pol: Policy, rate: float, path: Path) -> None:
        a, x = self.a, self.a.time_scale
        times = self.trace_times if self.trace_times is not None else [t / rate for t in self.unit_arrivals]
        with path.open("w") as fh:
            for i, ((bid, q), t) in enumerate(zip(self.reqs, times)):
                body = {"model": MODEL, "max_tokens": a.max_tokens, "stream": True,
                        "stream_options": {"include_usage": True}, "temperature": 0}
                if pol.kind == "cacheroute":
                    body["messages"] = [{"role": "user", "content": q}]
                    body["knowledge_ids"] = [bid]
                else:
                    # Exactly what the gateway sends in text mode: the registered content
                    # as the first system message (decisions/src/prompt.rs).
                    body["messages"] = [{"role": "system", "content": self.content[bid]},
                                        {"role": "user", "content": q}]
                fh.write(json.dumps({"at_ms": t / x * 1e3, "body": body, "tag": {"i": i, "block": bid}}) + "\n")

    # one run ---------------------------------------------------------------
    def run(self, spec: RunSpec, bar_desc: str) -> dict:
        a, f, pol = self.a, self.fleet, spec.policy
        x = a.time_scale
        tag = f"{pol.name.replace('@', '-')}-r{spec.rate:g}-l{spec.link or 0:g}"
        f.flush_stores()
        run_procs: list[subprocess.Popen] = []
        row: dict = {"policy": pol.name, "rate": spec.rate, "link_gbps": spec.link,
                     "kind": pol.kind, "flags": []}
        try:
            sims = f.start_sims(shared=pol.kind == "shared")
            run_procs += [p for _, p in sims]
            urls = [u for u, _ in sims]
            kdn_url, kdn_p, declog = None, None, None
            if pol.kind == "cacheroute":
                kdn_url, kdn_p = f.start_kdn(spec.link, tag)
                run_procs.append(kdn_p)
                port, cport = free_port(), free_port()
                cfg = self.work / f"gw-{tag}.toml"
                cfg.write_text(gateway_toml(a, f, pol, port, cport, kdn_url, urls))
                declog = self.work / f"decisions-{tag}.jsonl"
                gw = self.procs.start(f"gateway-{tag}", [a.bin, "gateway", "--config", str(cfg),
                                                         "--log-decisions", str(declog)])
                run_procs.append(gw)
                base, ctl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{cport}"
                try:
                    wait_http(base + "/health", gw, timeout=30)
                except RuntimeError as e:
                    if pol.injection == "hybrid" and gw.poll() is not None:
                        self.hybrid_ok = False
                        row["skipped"] = "this gateway does not support injection = \"hybrid\""
                        return row
                    raise e
                for i, u in enumerate(urls):
                    ap = free_port()
                    run_procs.append(self.procs.start(f"agent-{tag}-{i}", [
                        a.bin, "agent", "--engine", u, "--listen", f"127.0.0.1:{ap}", "--gateway", ctl,
                        "--kdn", kdn_url, "--kv-store", f"redis://127.0.0.1:{f.inst_redis[i]}",
                        "--model", MODEL, "--residency-ms", str(a.residency_ms), "--heartbeat-s", "1"]))
                n_blocks = len(self.blocks)

                def synced(r: httpx.Response) -> bool:
                    if r.status_code != 200:
                        return False
                    d = r.json()
                    agents = d.get("agents") or {}
                    return d.get("blocks") == n_blocks and sum(1 for v in agents.values() if v.get("up")) == len(urls)
                wait_http(ctl + "/debug/knowledge", gw, timeout=60, ok=synced)
            else:
                port = free_port()
                rp = self.procs.start(f"vllm-router-{tag}", [
                    a.vllm_router, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
                    "--policy", pol.router_policy, "--prometheus-host", "127.0.0.1",
                    "--prometheus-port", str(free_port()), "--request-timeout-secs", "600"])
                run_procs.append(rp)
                base = f"http://127.0.0.1:{port}"
                wait_http(base + "/health", rp, timeout=60, ok=lambda r: r.status_code == 200)

            sched = self.work / f"schedule-{tag}.jsonl"
            self.schedule(pol, spec.rate, sched)
            out, summ = self.work / f"results-{tag}.jsonl", self.work / f"summary-{tag}.json"
            cpu0 = self.procs.cpu_s()
            summary = self.loadgen(base, sched, out, summ, bar_desc)
            fleet_cpu = self.procs.cpu_s() - cpu0
            records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]

            # What the engines and the KDN say, before they stop.
            prefill_s, tiers, busy = 0.0, {}, 0.0
            have_prefill_metric = True
            with client() as c:
                for u in urls:
                    m = c.get(u + "/metrics").text
                    v = prom_sum(m, "sim_gpu_prefill_seconds_total")
                    if v is None:
                        have_prefill_metric = False
                    else:
                        prefill_s += v
                    for tier in ("gpu", "cpu", "remote"):
                        t = prom_sum(m, "sim_cached_tokens_total", {"tier": tier})
                        if t is not None:
                            tiers[tier] = tiers.get(tier, 0) + t
                    eng = c.get(u + "/debug/engine").json()
                    busy += _find_number(eng, "busy_ms") or 0.0
                kdn_bytes = None
                if kdn_url:
                    km = c.get(kdn_url + "/metrics").text
                    kdn_bytes = prom_sum(km, "cacheroute_kdn_injected_bytes_total") or 0.0
            store_used = [f.store_used(p) for p in (f.inst_redis if pol.kind != "shared" else [f.shared_redis])]
            gw_ttft = self.gateway_ttfts(declog) if declog else {}
            row.update(self.measure(records, summary, gw_ttft))
            # Engine figures are GPU time already (the profile is scaled, so × X).
            row["prefill_s"] = prefill_s * x if have_prefill_metric else None
            row["engine_busy_s"] = busy / 1e3 * x
            row["gpu_s"] = row["prefill_s"] if row["prefill_s"] is not None else row["engine_busy_s"]
            row["gpu_s_source"] = "sim_gpu_prefill_seconds_total" if have_prefill_metric else "engine busy_ms"
            row["cached_tokens_by_tier"] = tiers or None
            row["kdn_bytes"] = kdn_bytes
            row["store_used_bytes"] = store_used
            # The fleet's own share of the host (all cores = 1.0): tells a run that
            # saturated the host itself from one that shared it with other work.
            wall = summary.get("wall_s") or 0
            row["fleet_cpu_util"] = (fleet_cpu + (summary.get("loadgen_cpu_s") or 0)) / (wall * (os.cpu_count() or 1)) \
                if wall > 0 else None
            row["work_files"] = {"results": out.name, "schedule": sched.name,
                                 "decisions": declog.name if declog else None}
            return row
        finally:
            for p in reversed(run_procs):
                self.procs.stop(p)

    def loadgen(self, base: str, sched: Path, out: Path, summ: Path, desc: str) -> dict:
        n = len(self.reqs)
        cmd = [self.a.loadgen, "--url", base, "--schedule", str(sched), "--out", str(out),
               "--summary", str(summ), "--progress", "--timeout-s", "600"]
        # The summary goes to a file: stdout is not read (so it cannot fill a pipe).
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        bar = tqdm(total=n, desc=desc, unit="req", leave=False, position=1, dynamic_ncols=True)
        err_tail: list[str] = []

        def follow() -> None:
            assert p.stderr is not None
            for line in p.stderr:
                if line.startswith("progress "):
                    try:
                        done = int(line.split()[2])
                        bar.update(done - bar.n)
                    except (IndexError, ValueError):
                        pass
                else:
                    err_tail.append(line)
                    del err_tail[:-20]
        th = threading.Thread(target=follow, daemon=True)
        th.start()
        p.wait()
        th.join(10)
        bar.update(n - bar.n)
        bar.close()
        if p.returncode != 0:
            raise RuntimeError(f"loadgen failed ({p.returncode}): {''.join(err_tail)}")
        return json.loads(summ.read_text())

    @staticmethod
    def gateway_ttfts(path: Path) -> dict[str, float]:
        out: dict[str, float] = {}
        if not path.exists():
            return out
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            t = (d.get("outcome") or {}).get("ttft_ms")
            if t is not None:
                out[str(d.get("id"))] = t
        return out

    def measure(self, records: list[dict], summary: dict, gw_ttft: dict[str, float]) -> dict:
        a, x = self.a, self.a.time_scale
        ok = [r for r in records if r["status"] == 200 and r["ttft_ms"] is not None and not r.get("error")]
        ttft = [r["ttft_ms"] * x for r in ok]
        e2e = [r["e2e_ms"] * x for r in ok]
        first = min((r["at_ms"] + r["lag_ms"] for r in records), default=0.0)
        last = max((r["at_ms"] + r["lag_ms"] + (r["e2e_ms"] or 0) for r in records), default=0.0)
        span_s = max(1e-9, (last - first) / 1e3 * x)
        sent_span_s = max(1e-9, (max(r["at_ms"] for r in records) - min(r["at_ms"] for r in records)) / 1e3 * x) \
            if len(records) > 1 else None
        ktoks = cached = 0
        for r in ok:
            k = self.tokens.get(r["tag"]["block"], 0)
            ktoks += k
            cached += min(r.get("cached_tokens") or 0, k)
        modes: dict[str, int] = {}
        for r in ok:
            m = r["headers"].get("x-cacheroute-injection", "none")
            modes[m] = modes.get(m, 0) + 1
        gw = [gw_ttft[r["headers"]["x-cacheroute-decision"]] * x for r in ok
              if r["headers"].get("x-cacheroute-decision") in gw_ttft]
        client_on_gw = [r["ttft_ms"] * x for r in ok if r["headers"].get("x-cacheroute-decision") in gw_ttft]
        lag99 = summary.get("send_lag_p99_ms")
        cpu = summary.get("host_cpu_util")
        flags = []
        if cpu is not None and cpu >= a.cpu_saturated:
            flags.append(f"host CPU {cpu:.0%}")
        if lag99 is not None and lag99 > a.max_send_lag_ms:
            flags.append(f"send lag p99 {lag99:.0f} ms")
        statuses: dict[str, int] = {}
        for r in records:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        mean = statistics.fmean(ttft) if ttft else None
        gw_mean = statistics.fmean(gw) if gw else None
        return {
            "requests": len(records), "ok": len(ok), "statuses": statuses,
            "errors": sorted({(r.get("error") or "")[:200] for r in records if r.get("error")})[:5],
            "ttft_mean_ms": mean, "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "e2e_mean_ms": statistics.fmean(e2e) if e2e else None, "e2e_p99_ms": pct(e2e, 0.99),
            "throughput_rps": len(ok) / span_s,
            # Completions over the arrival window plus one typical request: ≈ λ while the
            # fleet keeps up, less once a backlog builds (the knee test uses it, since on
            # a short run the plain figure is cut by the last requests' latency alone).
            "sustained_rps": len(ok) / max(1e-9, span_s - (pct(e2e, 0.5) or 0.0) / 1e3),
            "offered_rps": (len(records) - 1) / sent_span_s if sent_span_s else None,
            "goodput_rps": sum(1 for t in ttft if t <= a.slo_ms) / span_s,
            "slo_attainment": sum(1 for t in ttft if t <= a.slo_ms) / len(records) if records else None,
            "kv_reuse": cached / ktoks if ktoks else 0.0,
            "knowledge_tokens": ktoks, "knowledge_tokens_cached": cached,
            "modes": modes,
            "gateway_ttft_mean_ms": gw_mean,
            "gateway_ttft_p50_ms": pct(gw, 0.5), "gateway_ttft_p99_ms": pct(gw, 0.99),
            "client_over_gateway": (statistics.fmean(client_on_gw) / gw_mean) if gw and gw_mean else None,
            "send_lag_p99_ms": lag99, "send_lag_max_ms": summary.get("send_lag_max_ms"),
            "host_cpu_util": cpu, "host_cpu_util_peak": summary.get("host_cpu_util_peak"),
            "loadgen_cpu_s": summary.get("loadgen_cpu_s"), "wall_s": summary.get("wall_s"),
            "flags": flags,
        }

    def close(self) -> None:
        self.procs.stop_all()
        if not self.a.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


def _find_number(v, key: str):
    """The first number under `key` anywhere in a JSON value."""
    if isinstance(v, dict):
        if isinstance(v.get(key), (int, float)):
            return float(v[key])
        for x in v.values():
            r = _find_number(x, key)
            if r is not None:
                return r
    elif isinstance(v, list):
        for x in v:
            r = _find_number(x, key)
            if r is not None:
                return r
    return None


# --------------------------------------------------------------------------- plan + report

def plan(a, policies: list[Policy]) -> list[RunSpec]:
    """Link-independent policies (text, the routers) run once per rate; the rest per
    link; the routing variants only at the routing rate."""
    specs = []
    for rate in a.rates:
        for p in policies:
            if p.routing_only and rate != a.routing_rate:
                continue
            if p.uses_kdn:
                specs += [RunSpec(p, rate, link) for link in a.links]
            else:
                specs.append(RunSpec(p, rate, None))
    return specs


def eta_s(a, specs: list[RunSpec], n: int) -> float:
    # Start-up and scrape of one run on 2 cores, plus the schedule's own length (wall)
    # and a drain allowance.
    return sum(a.run_overhead_s + n / (s.rate * a.time_scale) * 1.15 for s in specs)


def knees(a, rows: list[dict], links: list) -> dict:
    """Per policy and link: the first rate whose mean TTFT exceeds k × the lowest rate's,
    or whose throughput falls below 90 % of the offered rate."""
    out = {}
    for link in links:
        for pol in sorted({r["policy"] for r in rows}):
            rs = sorted((r for r in rows if r["policy"] == pol and r.get("link_gbps") in (link, None)
                         and r.get("ttft_mean_ms") is not None), key=lambda r: r["rate"])
            if len(rs) < 2:
                continue
            base = rs[0]["ttft_mean_ms"]
            knee = None
            for r in rs[1:]:
                offered = r.get("offered_rps") or r["rate"]
                sustained = r.get("sustained_rps", r["throughput_rps"])
                if r["ttft_mean_ms"] > a.knee_k * base or sustained < 0.9 * offered:
                    knee = r["rate"]
                    break
            out[f"{pol}|{link}"] = {"policy": pol, "link_gbps": link, "knee_rate": knee,
                                    "max_rate": rs[-1]["rate"], "low_load_ttft_ms": base}
    return out


def report(a, bench: Bench, rows: list[dict], cmd: str, started: float) -> Path:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    params = (f"b{len(bench.blocks)}-z{a.zipf:g}-n{len(bench.reqs)}-x{a.time_scale:g}"
              + (f"-trace-{Path(a.trace).stem}" if a.trace else f"-s{a.seed}") + ("-small" if a.small else ""))
    stem = out / f"rag-{params}"
    links = a.links
    kn = knees(a, rows, links)
    data = {"command": cmd, "params": {k: v for k, v in vars(a).items() if k not in ("bin", "loadgen", "vllm_router")},
            "sizing": vars(bench.fleet.sizing) if bench.fleet.sizing else None,
            "sim_caps": vars(bench.caps), "rows": rows, "knees": list(kn.values()),
            "repeat_reuse_bound": repeat_reuse_bound(bench.reqs, bench.tokens),
            "elapsed_s": time.time() - started, "host_cores": os.cpu_count()}
    Path(f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))

    done = [r for r in rows if not r.get("skipped")]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    # --- plots: TTFT vs load, one panel per link
    fig, axes = plt.subplots(1, len(links), figsize=(4.6 * len(links), 4.0), squeeze=False, sharey=True)
    for ax, link in zip(axes[0], links):
        for pol in policies:
            rs = sorted((r for r in done if r["policy"] == pol and r.get("link_gbps") in (link, None)
                         and r.get("ttft_mean_ms") is not None and "@" not in pol), key=lambda r: r["rate"])
            if rs:
                ax.plot([r["rate"] for r in rs], [r["ttft_mean_ms"] for r in rs], marker="o", label=pol,
                        linestyle="--" if rs[0]["kind"] != "cacheroute" else "-")
        ax.set_title(f"link {link:g} Gb/s")
        ax.set_xlabel("arrival rate λ (req/s, GPU time)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("mean TTFT (GPU ms)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Mean TTFT vs load per policy")
    fig.tight_layout()
    ttft_png = stem.parent / (stem.name + "-ttft.png")
    fig.savefig(ttft_png, dpi=110)
    plt.close(fig)
    # --- plots: KV reuse per routing policy (at the routing rate), per link
    routing = [p for p in ("kv@round_robin", "kv@least_loaded", "kv") if p in policies]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(links) * max(1, len(routing)) / 2, 3.8))
    width = 0.8 / max(1, len(routing))
    for j, pol in enumerate(routing):
        vals = []
        for link in links:
            r = next((r for r in done if r["policy"] == pol and r.get("link_gbps") == link
                      and r["rate"] == a.routing_rate), None)
            vals.append(r["kv_reuse"] if r else 0.0)
        label = "kv@knowledge_affinity" if pol == "kv" else pol
        ax.bar([i + j * width for i in range(len(links))], vals, width, label=label)
    ax.set_xticks([i + width * (len(routing) - 1) / 2 for i in range(len(links))])
    ax.set_xticklabels([f"{lk:g} Gb/s" for lk in links])
    ax.set_ylabel("KV reuse (knowledge tokens from cache)")
    ax.set_ylim(0, 1)
    ax.set_title(f"KV reuse per instance policy, injection=kv, λ={a.routing_rate:g}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    reuse_png = stem.parent / (stem.name + "-kv-reuse.png")
    fig.savefig(reuse_png, dpi=110)
    plt.close(fig)

    # --- markdown
    md = [f"# RAG benchmark: {params}", "", "```sh", cmd, "```", ""]
    s = bench.fleet.sizing
    md += [f"Fleet: {a.pools} pools × {a.instances} instances of `cacheroute sim` (profile "
           f"`{Path(a.profile).name}`, time scale X={a.time_scale:g}: every time below is GPU time = "
           f"wall × X), a KDN, an instance agent per sim, a producer sim, redis-server stores. "
           f"Workload: {len(bench.blocks)} blocks, Zipf α={a.zipf:g}, {len(bench.reqs)} requests per run, "
           f"Poisson arrivals, max_tokens {a.max_tokens}, seed {a.seed}"
           + (f", trace `{a.trace}`" if a.trace else "") + ".", ""]
    md += [f"- {line}" for line in (s.lines if s else [])]
    md += [f"- KV reuse without KDN transfers is at most {data['repeat_reuse_bound']:.2f}: the share of "
           f"knowledge tokens whose block an earlier request of the same run already asked for (every run "
           f"starts with empty caches)"]
    caps = [k for k, v in vars(bench.caps).items() if v]
    md += [f"- sim tier flags detected: {', '.join(caps) if caps else 'none (no GPU prefix cache, no CPU tier: every hit is a remote-store hit)'}",
           f"- TTFT SLO for goodput: {a.slo_ms:g} GPU-ms; knee: mean TTFT > {a.knee_k:g}× the lowest rate's, "
           f"or sustained throughput < 90 % of the offered rate",
           f"- run took {(time.time() - started) / 60:.1f} min on {os.cpu_count()} cores", ""]
    hi = max((r["rate"] for r in done), default=None)
    ratios = [r["client_over_gateway"] for r in done if r["rate"] == hi and r.get("client_over_gateway")]
    if ratios:
        worst = max(ratios)
        md += [f"- client vs gateway mean TTFT at the highest rate (λ={hi:g}): {min(ratios):.2f}–{worst:.2f}× "
               f"({'within' if worst <= 1.10 else 'NOT within'} the 10 % the client may add)"]
    flagged = sum(1 for r in done if r.get("flags"))
    if flagged:
        md += [f"- ⚠ {flagged} of {len(done)} runs flagged (host CPU saturated or send lag p99 > "
               f"{a.max_send_lag_ms:g} ms): see the flags column"]
    md += [""]
    md += ["![TTFT vs load](" + ttft_png.name + ")", "", "![KV reuse per routing policy](" + reuse_png.name + ")", ""]
    hdr = ("| policy | λ | ok | mean TTFT | p50 | p99 | gw mean | client/gw | e2e mean | thr | goodput | "
           "KV reuse | modes | GPU s | KDN bytes | lag p99 | CPU | flags |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"
    for link in links:
        md += [f"## Link {link:g} Gb/s", "", hdr, sep]
        for pol in policies:
            for r in sorted((r for r in rows if r["policy"] == pol and r.get("link_gbps") in (link, None)),
                            key=lambda r: r["rate"]):
                if r.get("skipped"):
                    md.append(f"| {pol} | {r['rate']:g} | skipped: {r['skipped']} |" + " |" * 15)
                    continue
                modes = " ".join(f"{k}:{v}" for k, v in sorted(r["modes"].items()))
                md.append(
                    f"| {pol}{'' if r.get('link_gbps') is not None else ' ⁽*⁾'} | {r['rate']:g} | {r['ok']}/{r['requests']} | "
                    f"{fmt(r['ttft_mean_ms'])} | {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} | "
                    f"{fmt(r['gateway_ttft_mean_ms'])} | {fmt(r['client_over_gateway'], 2)} | "
                    f"{fmt(r['e2e_mean_ms'])} | {fmt(r['throughput_rps'], 1)} | {fmt(r['goodput_rps'], 1)} | "
                    f"{fmt(r['kv_reuse'], 2)} | {modes} | {fmt(r['gpu_s'], 2)} | {fmt_bytes(r['kdn_bytes'])} | "
                    f"{fmt(r['send_lag_p99_ms'], 1)} | {fmt(r['host_cpu_util'] and r['host_cpu_util'] * 100)}% "
                    f"({fmt(r.get('fleet_cpu_util') and r['fleet_cpu_util'] * 100)}%) | "
                    f"{'⚠ ' + '; '.join(r['flags']) if r['flags'] else ''} |")
        md.append("")
        kl = [k for k in kn.values() if k["link_gbps"] == link]
        if kl:
            md += ["Knees: " + ", ".join(
                f"{k['policy']} {'λ=' + format(k['knee_rate'], 'g') if k['knee_rate'] else '> λ=' + format(k['max_rate'], 'g')}"
                for k in kl), ""]
    md += ["⁽*⁾ link-independent policy (no KDN transfer): the same run is shown under every link.", "",
           "Columns: TTFT mean/p50/p99 measured by the client (`cacheroute-loadgen`), GPU-ms; "
           "`gw mean` the gateway's own TTFT from its `--log-decisions` log and `client/gw` the ratio "
           "of the client's mean to it over the same requests; `thr` completed req/s and `goodput` "
           "req/s within the SLO (GPU time); KV reuse = knowledge tokens served from cache / knowledge "
           "tokens sent; modes = the gateway's `x-cacheroute-injection` per request; GPU s = the sims' "
           "prefill seconds (or engine busy time), GPU time; KDN bytes = logical KV bytes the KDN "
           "injected; lag p99 = the loadgen's send lag (wall ms); CPU = host CPU utilisation over "
           "the run (in brackets: the bench's own processes' share: fleet, gateway, loadgen). A ⚠ flag marks a run whose host was saturated or whose send lag p99 > "
           f"{a.max_send_lag_ms:g} ms: its TTFTs include the host's own queueing.", ""]
    Path(f"{stem}.md").write_text("\n".join(md))
    return stem


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="seconds-long configuration for the test suite")
    ap.add_argument("--blocks", type=int, default=160, help="knowledge blocks in the corpus")
    ap.add_argument("--requests", type=int, default=160, help="requests per run")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf popularity exponent α")
    ap.add_argument("--rates", default="10,30,60,90", help="arrival rates λ, req/s of GPU time")
    ap.add_argument("--routing-rate", type=float, default=None, help="rate of the routing comparison (default: the middle rate)")
    ap.add_argument("--links", default="1,10,25,100", help="KDN → instance link speeds, Gb/s")
    ap.add_argument("--pools", type=int, default=2)
    ap.add_argument("--instances", type=int, default=2, help="instances per pool")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help=f"any of {', '.join(ALL_POLICIES)}")
    ap.add_argument("--time-scale", type=float, default=2.0, help="run the fleet X times faster than an H100")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--question-words", type=int, default=24)
    ap.add_argument("--doc-median-bytes", type=float, default=6300.0)
    ap.add_argument("--doc-sigma", type=float, default=0.75, help="log-normal σ of block sizes")
    ap.add_argument("--doc-min-bytes", type=int, default=378)
    ap.add_argument("--doc-max-bytes", type=int, default=20714)
    ap.add_argument("--trace", help="JSONL {knowledge_id | knowledge_text, question, arrival_s} instead of the generator")
    ap.add_argument("--max-trace-requests", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--slo-ms", type=float, default=2000.0, help="TTFT SLO for goodput, GPU ms")
    ap.add_argument("--knee-k", type=float, default=3.0, help="knee: mean TTFT > k × its low-load value")
    ap.add_argument("--gpu-cache-frac", type=float, default=0.05, help="per-instance GPU KV cache / corpus")
    ap.add_argument("--cpu-cache-frac", type=float, default=0.10, help="per-instance LMCache CPU tier / corpus")
    ap.add_argument("--store-frac", type=float, default=0.20, help="per-instance remote store bound / corpus")
    ap.add_argument("--kv-store-gbps", type=float, default=25.0,
                    help="each sim's link to its LMCache remote store, Gb/s of GPU time (the sim's default; 0 = free); the gateway is told it")
    ap.add_argument("--async-loading", action="store_true",
                    help="the sims load remote-store hits as LMCache's enable_async_loading does (off the step); "
                         "the gateway's store_async_loading")
    ap.add_argument("--weigh-others", action="store_true",
                    help="the gateway's [proxy] weigh_others: adaptive charges a mode the step time it adds to others")
    ap.add_argument("--kdn-concurrency", type=int, default=8)
    ap.add_argument("--residency-ms", type=int, default=300, help="agent residency check interval")
    ap.add_argument("--gateway-threads", type=int, default=2)
    ap.add_argument("--profile", default=str(ROOT / "conf/profiles/h100-llama3-8b.json"))
    ap.add_argument("--bin", default=os.environ.get("CACHEROUTE_BIN", str(ROOT / "target/release/cacheroute")))
    ap.add_argument("--loadgen", help="cacheroute-loadgen binary (default: beside --bin)")
    ap.add_argument("--vllm-router", default=os.environ.get("VLLM_ROUTER_BIN"),
                    help="vllm-router binary (default: target/bench-venv/bin/vllm-router)")
    ap.add_argument("--install-router", action="store_true",
                    help=f"pip install vllm-router=={VLLM_ROUTER_VERSION} into target/bench-venv when missing")
    ap.add_argument("--cpu-saturated", type=float, default=0.95, help="flag runs with host CPU ≥ this")
    ap.add_argument("--max-send-lag-ms", type=float, default=50.0, help="flag runs with send lag p99 above this")
    ap.add_argument("--run-overhead-s", type=float, default=2.5, help="start-up per run, for the ETA")
    ap.add_argument("--out", default=str(ROOT / "benches/results"))
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder (configs, logs, raw results)")
    a = ap.parse_args(argv)
    if a.small:
        # Seconds-long defaults; options given on the command line still win.
        given = {x.split("=")[0] for x in (argv if argv is not None else sys.argv[1:]) if x.startswith("--")}
        small = {"blocks": 12, "requests": 24, "rates": "6", "links": "10", "time_scale": 10.0,
                 "doc_median_bytes": 3000.0, "doc_max_bytes": 8000, "run_overhead_s": 2.5,
                 "policies": "text,kv,adaptive,hybrid,kv@round_robin,vllm-router-round_robin,shared-lmcache"}
        for k, v in small.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(a, k, v)
    try:
        a.rates = [float(x) for x in str(a.rates).split(",") if x.strip()]
        a.links = [float(x) for x in str(a.links).split(",") if x.strip()]
    except ValueError:
        ap.error("--rates and --links are comma-separated numbers")
    if not a.rates or any(not (r > 0 and math.isfinite(r)) for r in a.rates):
        ap.error("--rates must be positive numbers")
    if not a.links or any(not (x > 0 and math.isfinite(x)) for x in a.links):
        ap.error("--links must be positive numbers")
    if not (a.time_scale > 0 and math.isfinite(a.time_scale)):
        ap.error("--time-scale must be > 0")
    for k in ("blocks", "requests", "pools", "instances", "max_tokens"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be ≥ 1")
    a.rates = sorted(set(a.rates))
    if a.routing_rate is None:
        a.routing_rate = a.rates[len(a.rates) // 2]
    elif a.routing_rate not in a.rates:
        ap.error("--routing-rate must be one of --rates")
    if a.loadgen is None:
        a.loadgen = str(Path(a.bin).parent / "cacheroute-loadgen")
    return a


def find_router(a) -> str | None:
    if a.vllm_router:
        return a.vllm_router if os.access(a.vllm_router, os.X_OK) else None
    venv = ROOT / "target/bench-venv"
    exe = venv / "bin/vllm-router"
    if not exe.exists() and a.install_router:
        print(f"installing vllm-router=={VLLM_ROUTER_VERSION} into {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check",
                        f"vllm-router=={VLLM_ROUTER_VERSION}"], check=True)
    return str(exe) if exe.exists() else None


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cmd = "python3 benches/rag/rag_bench.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    for exe, what in ((a.bin, "cargo build --release"),
                      (a.loadgen, "cargo build --release -p cacheroute-benches --bin cacheroute-loadgen")):
        if not os.access(exe, os.X_OK):
            sys.exit(f"{exe} not found: {what} (or set --bin / --loadgen)")
    try:
        policies = [policy(p.strip()) for p in a.policies.split(",") if p.strip()]
    except ValueError as e:
        sys.exit(f"unknown policy {e}: use {', '.join(ALL_POLICIES)}")
    if any(p.kind != "cacheroute" for p in policies):
        a.vllm_router = find_router(a)
        if not a.vllm_router:
            dropped = [p.name for p in policies if p.kind != "cacheroute"]
            print(f"vllm-router not found (pass --install-router or --vllm-router): skipping {', '.join(dropped)}",
                  file=sys.stderr)
            policies = [p for p in policies if p.kind == "cacheroute"]
    started = time.time()
    bench = Bench(a)
    rows: list[dict] = []
    try:
        bench.setup()
        specs = plan(a, policies)
        eta = eta_s(a, specs, len(bench.reqs))
        print(f"{len(specs)} runs, ETA {eta / 60:.1f} min", flush=True)
        bar = tqdm(specs, desc="runs", unit="run", position=0, dynamic_ncols=True)
        for spec in bar:
            desc = f"{spec.policy.name} λ={spec.rate:g}" + (f" {spec.link:g}Gb/s" if spec.link else "")
            bar.set_postfix_str(desc)
            if spec.policy.injection == "hybrid" and bench.hybrid_ok is False:
                rows.append({"policy": spec.policy.name, "rate": spec.rate, "link_gbps": spec.link,
                             "kind": "cacheroute", "flags": [],
                             "skipped": "this gateway does not support injection = \"hybrid\""})
                continue
            try:
                row = bench.run(spec, desc)
            except (RuntimeError, OSError, httpx.HTTPError, ValueError) as e:
                # One failed run (a process that died, a full disk) costs its row, not the
                # sweep: the report shows it, and the exit status says so.
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                tqdm.write(f"{desc}: FAILED: {first}")
                row = {"policy": spec.policy.name, "rate": spec.rate, "link_gbps": spec.link,
                       "kind": spec.policy.kind, "flags": [], "skipped": f"failed: {first}", "failed": True}
            rows.append(row)
            if not row.get("skipped"):
                tqdm.write(f"{desc}: ok {row['ok']}/{row['requests']} mean TTFT {fmt(row['ttft_mean_ms'])} ms "
                           f"p99 {fmt(row['ttft_p99_ms'])} ms reuse {row['kv_reuse']:.2f} "
                           f"cpu {fmt((row['host_cpu_util'] or 0) * 100)}%"
                           + (f" ⚠ {'; '.join(row['flags'])}" if row["flags"] else ""))
        bar.close()
        stem = report(a, bench, rows, cmd, started)
        print(f"\nreport: {stem}.md (+ .json, -ttft.png, -kv-reuse.png); took {(time.time() - started) / 60:.1f} min")
        top = [r for r in rows if not r.get("skipped")]
        if top:
            hi = max(r["rate"] for r in top)
            ratios = [r["client_over_gateway"] for r in top if r["rate"] == hi and r.get("client_over_gateway")]
            if ratios:
                print(f"client/gateway mean TTFT at λ={hi:g}: {min(ratios):.2f}–{max(ratios):.2f}")
        failed = [r for r in rows if r.get("failed")]
        if failed:
            print(f"{len(failed)} runs failed: see the report", file=sys.stderr)
            return 1
        return 0
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())
