#!/usr/bin/env python3
"""Measure a TTFT calibration profile of a running vLLM (+ LMCache) server.

Writes the JSON format of conf/profiles/*.json (read by `cacheroute calibrate fit`,
`cacheroute sim --profile` and the gateway's TTFT predictor), measured end to end over
the OpenAI API of YOUR model on YOUR GPUs, instead of the shipped eager-PyTorch
profiles of Llama-3 shapes:

  prefill_b1_ms      {"n": ms}     TTFT of one fresh n-token prompt (no cache hit)
  prefill_batched_ms {"BxN": ms}   B fresh N-token prompts sent at once: time until the
                                   last first token (one or more batched forwards)
  cached_prefill_ms  {"P+S": ms}   TTFT of P cached tokens (vLLM's GPU prefix cache,
                                   warmed by an identical prefix just before) + S new
  decode_step_ms     {"BxC": ms}   inter-token time of B streams at context ~C, measured
                                   while all B decode together
  h2d_GBps           {"<n>MB_pinned": GB/s}
                                   KV load bandwidth: with LMCache and vLLM's
                                   /reset_prefix_cache (VLLM_SERVER_DEV_MODE=1), the
                                   extra TTFT of a prefix loaded from LMCache over the
                                   same prefix in GPU cache; else a local torch
                                   pinned/pageable copy if torch+CUDA are importable.

Prompts are random token ids (`"prompt": [ids]`), fresh for every request, so no
measurement hits a cache it should not. Times include the server's own overheads
(HTTP, scheduling, sampling): they are what the gateway predicts. Run it on an idle
server: other traffic lands in the numbers.

  python3 scripts/calibrate_profile.py --url http://127.0.0.1:8000 --out my.json
  cacheroute calibrate fit my.json        # fitted curves and their error

`--dry-run` needs no server: it runs the same sweep against a synthetic model and
validates and writes the result (a format check, not a measurement).
Standard library only.
"""
import argparse
import datetime
import glob
import http.client
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

# Sweeps: (full, --quick). Points longer than the server's max_model_len are skipped.
PREFILL_LENS = ([128, 256, 512, 1024, 2048, 4096, 8192, 16384], [256, 1024, 4096])
BATCHED = ([(b, n) for b in (2, 4, 8, 16) for n in (512, 2048) if b * n <= 32768],
           [(4, 512), (4, 2048)])
CACHED = ([(p, s) for p in (512, 1024, 2048, 4096) for s in (32, 128, 512)],
          [(1024, 32), (1024, 512), (4096, 128)])
DECODE = ([(b, c) for b in (1, 8, 32) for c in (1024, 4096)],
          [(1, 1024), (8, 1024), (8, 4096)])
H2D_TOKENS = ([1024, 4096, 16384], [4096])
DECODE_TOKENS = (64, 32)  # tokens generated per stream while timing decode
H2D_SUFFIX = 32  # new tokens after a prefix loaded from LMCache

KEY_PATTERNS = {
    "prefill_b1_ms": re.compile(r"^\d+$"),
    "prefill_batched_ms": re.compile(r"^\d+x\d+$"),
    "cached_prefill_ms": re.compile(r"^\d+\+\d+$"),
    "decode_step_ms": re.compile(r"^\d+x\d+$"),
    "h2d_GBps": re.compile(r"^\d+(KB|MB|GB)_(pinned|pageable)$"),
}
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "vocab_size")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the real server

class Stream:
    """One streamed completion: send time, time of each content chunk, usage."""

    def __init__(self):
        self.t0 = None
        self.chunks = []
        self.usage = {}

    @property
    def ttft_ms(self):
        return (self.chunks[0] - self.t0) * 1e3


class Server:
    def __init__(self, url, model, api_key, timeout, id_range, seed):
        u = urllib.parse.urlsplit(url.rstrip("/"))
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.base = u.path
        self.model = model
        self.timeout = timeout
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.lo, self.hi = id_range
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def _conn(self):
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def request(self, method, path, body=None):
        c = self._conn()
        try:
            c.request(method, self.base + path,
                      body=None if body is None else json.dumps(body),
                      headers=self.headers)
            r = c.getresponse()
            data = r.read()
            return r.status, data
        finally:
            c.close()

    def get_json(self, path):
        status, data = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {data[:200]!r}")
        return json.loads(data)

    def fresh(self, n):
        """n random token ids: a prompt no cache has seen."""
        with self.lock:
            return [self.rng.randrange(self.lo, self.hi) for _ in range(n)]

    def stream(self, ids, max_tokens, start=None):
        """Stream a completion of `ids`; `start` (a Barrier) lines up concurrent sends."""
        s = Stream()
        body = {"model": self.model, "prompt": ids, "max_tokens": max_tokens,
                "stream": True, "stream_options": {"include_usage": True},
                "temperature": 0.0, "ignore_eos": True, "min_tokens": max_tokens}
        payload = json.dumps(body)
        c = self._conn()
        try:
            if start is not None:
                start.wait()
            s.t0 = time.perf_counter()
            c.request("POST", self.base + "/v1/completions", body=payload, headers=self.headers)
            r = c.getresponse()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
            for raw in r:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                ev = json.loads(data)
                if ev.get("usage"):
                    s.usage = ev["usage"]
                if ev.get("choices"):
                    s.chunks.append(time.perf_counter())
        finally:
            c.close()
        if not s.chunks:
            raise RuntimeError("the stream carried no token")
        return s

    def concurrent(self, prompts, max_tokens):
        """Send all prompts at once; returns their Streams (raises the first error)."""
        out = [None] * len(prompts)
        errs = []
        start = threading.Barrier(len(prompts))

        def run(i):
            try:
                out[i] = self.stream(prompts[i], max_tokens, start)
            except Exception as e:  # noqa: BLE001 - reported below
                errs.append(e)
                start.abort()

        ts = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errs:
            raise errs[0]
        return out

    # -- the measured primitives (one sample each)

    def prefill(self, b, n):
        if b == 1:
            return self.stream(self.fresh(n), 1).ttft_ms
        ss = self.concurrent([self.fresh(n) for _ in range(b)], 1)
        return (max(s.chunks[0] for s in ss) - min(s.t0 for s in ss)) * 1e3

    def cached(self, p, s):
        prefix = self.fresh(p)
        self.stream(prefix, 1)  # puts the prefix in the GPU prefix cache
        return self.stream(prefix + self.fresh(s), 1).ttft_ms

    def decode(self, b, c, gen):
        ss = self.concurrent([self.fresh(c) for _ in range(b)], gen)
        # the window where every stream is past its prefill and none has finished
        lo = max(s.chunks[0] for s in ss)
        hi = min(s.chunks[-1] for s in ss)
        steps = []
        for s in ss:
            inside = [t for t in s.chunks if lo <= t <= hi]
            if len(inside) < 3:
                inside = s.chunks  # too short a window: this stream's own decode
            if len(inside) < 2:
                continue
            # a chunk may carry several tokens (vLLM's stream interval)
            per_chunk = max(1.0, s.usage.get("completion_tokens", len(s.chunks)) / len(s.chunks))
            steps.append((inside[-1] - inside[0]) * 1e3 / ((len(inside) - 1) * per_chunk))
        if not steps:
            raise RuntimeError("no decode interval observed")
        return statistics.median(steps)

    def reset_prefix_cache(self):
        status, _ = self.request("POST", "/reset_prefix_cache")
        return status == 200

    def lmcache_load(self, p):
        """(ms to load p tokens from LMCache, same prompt's TTFT fully recomputed) or None."""
        prefix = self.fresh(p)
        self.stream(prefix, 1)  # stored in LMCache (and the GPU prefix cache)
        if not self.reset_prefix_cache():
            return None
        from_lmcache = self.stream(prefix + self.fresh(H2D_SUFFIX), 1).ttft_ms
        in_gpu = self.stream(prefix + self.fresh(H2D_SUFFIX), 1).ttft_ms
        recompute = self.stream(self.fresh(p + H2D_SUFFIX), 1).ttft_ms
        return from_lmcache - in_gpu, recompute - in_gpu


def torch_h2d(quick):
    """Local pinned/pageable host-to-GPU copy bandwidth (GB/s), or {} without torch+CUDA."""
    try:
        import torch  # noqa: PLC0415 - optional
        if not torch.cuda.is_available():
            return {}
    except Exception:  # noqa: BLE001 - any import trouble means "not available"
        return {}
    out = {}
    for mb in ([16, 64] if quick else [16, 64, 256]):
        n = mb << 20
        for pinned in (True, False):
            key = f"{mb}MB_{'pinned' if pinned else 'pageable'}"
            try:
                h = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
                d = torch.empty(n, dtype=torch.uint8, device="cuda")
                xs = []
                for i in range(7):
                    a = torch.cuda.Event(enable_timing=True)
                    e = torch.cuda.Event(enable_timing=True)
                    a.record()
                    d.copy_(h, non_blocking=pinned)
                    e.record()
                    torch.cuda.synchronize()
                    if i >= 2:  # warm-ups
                        xs.append(a.elapsed_time(e))
                out[key] = n / (statistics.median(xs) / 1e3) / 1e9
                del h, d
            except Exception as e:  # noqa: BLE001 - e.g. no GPU memory left beside vLLM
                out[key] = f"error: {e}"
    return out


# ---------------------------------------------------------------- the synthetic model

class Synthetic:
    """--dry-run: a closed-form GPU (ms) with 2% deterministic noise, no server."""

    A, LIN, ATTN, FLOOR = 4.0, 0.025, 1.0e-6, 12.0
    CTX, DA, DB, DC, GBPS = 4.0e-6, 7.0, 0.08, 2.0e-5, 25.0

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def _noisy(self, ms):
        return ms * (1.0 + self.rng.uniform(-0.02, 0.02))

    def prefill(self, b, n):
        return self._noisy(max(self.FLOOR, self.A + self.LIN * b * n + self.ATTN * b * n * n / 2))

    def cached(self, p, s):
        return self._noisy(max(self.FLOOR, self.A + self.LIN * s + self.ATTN * s * s / 2
                               + self.CTX * s * p))

    def decode(self, b, c, gen):
        return self._noisy(self.DA + self.DB * b + self.DC * b * c)


# ---------------------------------------------------------------- the sweep

def median_of(fn, reps, warmup):
    """Median of `reps` samples after `warmup` discarded ones; "error: ..." if it fails."""
    try:
        for _ in range(warmup):
            fn()
        return statistics.median(fn() for _ in range(reps))
    except Exception as e:  # noqa: BLE001 - recorded in the profile, the fitter skips it
        return f"error: {e}"


def fits(max_len, tokens):
    return max_len is None or tokens < max_len


def sweep(backend, a, max_len, kvb):
    q = 1 if a.quick else 0
    reps, warm = a.reps, a.warmup
    res = {}

    def run(name, points, key, fn):
        res[name] = {}
        for pt in points:
            res[name][key(pt)] = v = median_of(lambda: fn(*pt), reps, warm)
            log(f"  {name} {key(pt)}: {v if isinstance(v, str) else round(v, 3)}")

    log("prefill (fresh prompts)")
    run("prefill_b1_ms", [(n,) for n in PREFILL_LENS[q] if fits(max_len, n + 1)],
        lambda p: str(p[0]), lambda n: backend.prefill(1, n))
    log("batched prefill")
    run("prefill_batched_ms", [p for p in BATCHED[q] if fits(max_len, p[1] + 1)],
        lambda p: f"{p[0]}x{p[1]}", backend.prefill)
    log("cached prefill (prefix in the GPU prefix cache)")
    run("cached_prefill_ms", [p for p in CACHED[q] if fits(max_len, p[0] + p[1] + 1)],
        lambda p: f"{p[0]}+{p[1]}", backend.cached)
    gen = DECODE_TOKENS[q]
    log(f"decode ({gen} tokens per stream)")
    run("decode_step_ms", [p for p in DECODE[q] if fits(max_len, p[1] + gen)],
        lambda p: f"{p[0]}x{p[1]}", lambda b, c: backend.decode(b, c, gen))
    res["h2d_GBps"], res["h2d_method"] = measure_h2d(backend, a, max_len, kvb)
    return res


def size_key(nbytes):
    # the fitter reads integer KB/MB/GB sizes (only the bandwidth values matter to it)
    return f"{nbytes >> 20}MB" if nbytes >= 1 << 20 else f"{max(1, nbytes >> 10)}KB"


def measure_h2d(backend, a, max_len, kvb):
    q = 1 if a.quick else 0
    if a.h2d == "none":
        return {}, "none"
    if isinstance(backend, Synthetic):
        out = {f"{size_key(p * kvb)}_pinned": backend.GBPS * (1 + backend.rng.uniform(-0.02, 0.02))
               for p in H2D_TOKENS[q]}
        return out, "synthetic"
    if a.h2d in ("auto", "lmcache") and kvb:
        log("KV load from LMCache (prefix cache reset between store and load)")
        out = {}
        for p in H2D_TOKENS[q]:
            if not fits(max_len, p + H2D_SUFFIX + 1):
                continue
            try:
                samples = [backend.lmcache_load(p) for _ in range(a.reps)]
            except Exception as e:  # noqa: BLE001 - the point is recorded as an error
                out[f"{size_key(p * kvb)}_pinned"] = f"error: {e}"
                continue
            if any(s is None for s in samples):
                log("  POST /reset_prefix_cache refused: start vLLM with VLLM_SERVER_DEV_MODE=1 "
                    "to measure LMCache loads")
                out = {}
                break
            load = statistics.median(s[0] for s in samples)
            saved = statistics.median(s[1] for s in samples)
            if load <= 0 or load > 0.7 * saved:
                # as slow as recomputing: LMCache did not serve the prefix
                log(f"  {p} tokens: no LMCache hit visible (load {load:.1f} ms vs "
                    f"recompute {saved:.1f} ms); is LMCache configured?")
                continue
            gbps = p * kvb / (load * 1e6)
            out[f"{size_key(p * kvb)}_pinned"] = gbps
            log(f"  {p} tokens ({p * kvb >> 20} MiB): {load:.2f} ms, {gbps:.1f} GB/s")
        if any(isinstance(v, float) for v in out.values()):
            return out, "lmcache-ttft"
        if a.h2d == "lmcache":
            return out, "lmcache-ttft (failed)"
    if a.h2d in ("auto", "torch"):
        log("host-to-device copy (local torch)")
        out = torch_h2d(a.quick)
        if out:
            return out, "torch-copy"
    log("  no h2d measurement: the fitter will use its default bandwidth")
    return {}, "none"


# ---------------------------------------------------------------- model shape

def hf_config_path(explicit, names):
    if explicit:
        return explicit
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    for name in names:
        if not name:
            continue
        if os.path.isfile(os.path.join(name, "config.json")):
            return os.path.join(name, "config.json")
        snaps = glob.glob(os.path.join(hub, "models--" + name.replace("/", "--"),
                                       "snapshots", "*", "config.json"))
        if snaps:
            return max(snaps, key=os.path.getmtime)
    return None


def model_shape(path, kv_dtype_bytes):
    """(ModelConfig fields, KV bytes per token) from a HuggingFace config.json."""
    with open(path) as f:
        c = json.load(f)
    c = c.get("text_config", c)  # multimodal wrappers keep the LM's shape here
    cfg = {k: int(c.get(k) or 0) for k in CONFIG_FIELDS}
    if not cfg["num_key_value_heads"]:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    head_dim = int(c.get("head_dim") or 0) or (
        cfg["hidden_size"] // cfg["num_attention_heads"] if cfg["num_attention_heads"] else 0)
    kvb = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * kv_dtype_bytes
    return cfg, kvb


def gpu_name():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        names = [x.strip() for x in out.splitlines() if x.strip()]
        if len(names) == 1:
            return names[0]
        if names:
            return f"{len(names)}x {names[0]}"
    except Exception:  # noqa: BLE001 - no nvidia-smi: say so
        pass
    return "unknown"


# ---------------------------------------------------------------- format check

def validate(profile):
    """The checks `cacheroute calibrate fit` applies, plus sanity. Raises ValueError."""
    errs = []
    for field in ("device", "model"):
        if not isinstance(profile.get(field), str):
            errs.append(f"{field} must be a string")
    cfg = profile.get("config", {})
    if not isinstance(cfg, dict):
        errs.append("config must be an object")
    else:
        for k in CONFIG_FIELDS:
            if not (isinstance(cfg.get(k, 0), int) and cfg.get(k, 0) >= 0):
                errs.append(f"config.{k} must be a non-negative integer")
    kvb = profile.get("kv_bytes_per_token")
    if kvb is not None and not (isinstance(kvb, int) and kvb >= 0):
        errs.append("kv_bytes_per_token must be a non-negative integer")
    numeric = {}
    for field, pat in KEY_PATTERNS.items():
        m = profile.get(field, {})
        if not isinstance(m, dict):
            errs.append(f"{field} must be an object")
            continue
        numeric[field] = 0
        for k, v in m.items():
            if not pat.match(k):
                errs.append(f"{field}: bad key {k!r}")
            if isinstance(v, str) and v.startswith("error"):
                continue  # a failed point, skipped by the fitter
            if isinstance(v, bool) or not isinstance(v, (int, float)) \
                    or not math.isfinite(v) or v <= 0:
                errs.append(f"{field}[{k!r}] = {v!r} is not a positive number")
            else:
                numeric[field] += 1
    if numeric.get("prefill_b1_ms", 0) + numeric.get("prefill_batched_ms", 0) < 3:
        errs.append("fewer than 3 measured prefill points: the cost model cannot be fitted")
    if errs:
        raise ValueError("invalid profile:\n  " + "\n  ".join(errs))
    return numeric


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Measure a TTFT calibration profile (conf/profiles/*.json format) of a "
                    "running vLLM (+LMCache) server.",
        epilog="Then: cacheroute calibrate fit OUT.json")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="vLLM server base URL")
    ap.add_argument("--model", help="served model name (default: the server's only/first model)")
    ap.add_argument("--out", default="profile.json", help="output JSON (default profile.json)")
    ap.add_argument("--quick", action="store_true", help="a few points, 3 samples each")
    ap.add_argument("--dry-run", action="store_true",
                    help="no server: sweep a synthetic model, validate and write the format")
    ap.add_argument("--reps", type=int, help="samples per point, median kept (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, help="discarded samples per point (default 2, quick 1)")
    ap.add_argument("--hf-config", help="the model's HuggingFace config.json (default: looked "
                                        "up from the model path or the HF cache)")
    ap.add_argument("--kv-dtype-bytes", type=int, default=2,
                    help="bytes per KV element (2: bf16/fp16, 1: fp8)")
    ap.add_argument("--kv-bytes-per-token", type=int, help="override the computed KV size")
    ap.add_argument("--device", help="device name to record (default: nvidia-smi)")
    ap.add_argument("--h2d", choices=["auto", "lmcache", "torch", "none"], default="auto",
                    help="how to measure KV loading (default: LMCache if the server allows "
                         "/reset_prefix_cache, else a local torch copy)")
    ap.add_argument("--token-range", default="1000:30000",
                    help="random prompt token ids are drawn in LO:HI (default 1000:30000)")
    ap.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY")
                    or os.environ.get("OPENAI_API_KEY"), help="bearer token, if the server wants one")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.reps = a.reps or (3 if a.quick else 5)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    lo, _, hi = a.token_range.partition(":")
    id_range = (int(lo), int(hi))
    if not 0 <= id_range[0] < id_range[1]:
        ap.error("--token-range must be LO:HI with 0 <= LO < HI")

    info = {}
    if a.dry_run:
        backend = Synthetic(a.seed)
        model = a.model or "dry-run"
        # Llama-3-8B's shape, so the sim can also run the result
        cfg = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
        kvb = a.kv_bytes_per_token or 2 * 32 * 8 * 128 * a.kv_dtype_bytes
        max_len, device, method = 131072, a.device or "synthetic (dry run)", "dry-run"
    else:
        probe = Server(a.url, a.model, a.api_key, a.timeout, id_range, a.seed)
        try:
            models = probe.get_json("/v1/models").get("data", [])
        except (OSError, RuntimeError, ValueError) as e:
            sys.exit(f"cannot list the models of {a.url}: {e}")
        if not models:
            sys.exit(f"{a.url}/v1/models lists no model")
        entry = next((m for m in models if m.get("id") == a.model), None) if a.model else models[0]
        if entry is None:
            sys.exit(f"model {a.model!r} not served; the server has "
                     f"{[m.get('id') for m in models]}")
        model = entry["id"]
        max_len = entry.get("max_model_len")
        try:
            info["version"] = probe.get_json("/version").get("version")
        except Exception:  # noqa: BLE001 - optional
            pass
        path = hf_config_path(a.hf_config, [entry.get("root"), model])
        cfg, kvb = {k: 0 for k in CONFIG_FIELDS}, 0
        if path:
            cfg, kvb = model_shape(path, a.kv_dtype_bytes)
            log(f"model shape from {path}: {cfg}, {kvb} KV bytes/token")
        elif not a.kv_bytes_per_token:
            # without the KV size every KV load estimate would be wrong: stop before measuring
            sys.exit(f"no config.json found for {entry.get('root') or model!r}: pass "
                     "--hf-config PATH/config.json, or at least --kv-bytes-per-token N")
        else:
            log("no config.json found: the profile records no model shape")
        kvb = a.kv_bytes_per_token or kvb
        if cfg.get("vocab_size"):
            id_range = (min(id_range[0], cfg["vocab_size"] - 2), min(id_range[1], cfg["vocab_size"]))
        backend = Server(a.url, model, a.api_key, a.timeout, id_range, a.seed)
        device, method = a.device or gpu_name(), "vllm-openai-ttft"
        log(f"profiling {model} at {a.url} (max_model_len {max_len}, device {device})")

    t0 = time.time()
    measured = sweep(backend, a, max_len, kvb)
    profile = {
        "device": device,
        "model": model,
        "config": cfg,
        "kv_bytes_per_token": kvb,
        "prefill_b1_ms": measured["prefill_b1_ms"],
        "prefill_batched_ms": measured["prefill_batched_ms"],
        "cached_prefill_ms": measured["cached_prefill_ms"],
        "decode_step_ms": measured["decode_step_ms"],
        "h2d_GBps": measured["h2d_GBps"],
        # extra fields: ignored by the fitter, kept for whoever reads the file
        "method": method,
        "h2d_method": measured["h2d_method"],
        "server": {"url": None if a.dry_run else a.url, "max_model_len": max_len, **info},
        "reps": a.reps,
        "warmup": a.warmup,
        "elapsed_s": round(time.time() - t0, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if not kvb:
        del profile["kv_bytes_per_token"]
    try:
        counts = validate(profile)
    except ValueError as e:
        # keep what was measured for inspection, but fail
        with open(a.out + ".invalid", "w") as f:
            json.dump(profile, f, indent=1)
        sys.exit(f"{e}\n(what was measured is in {a.out}.invalid)")
    with open(a.out, "w") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")
    log(f"wrote {a.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f" points ({profile['elapsed_s']} s); next: cacheroute calibrate fit {a.out}")


if __name__ == "__main__":
    main()
