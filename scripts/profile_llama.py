"""Profile prefill / cached-prefill / decode / host->device KV load on one GPU.

Provenance: the CacheRoute project's own calibration script, kept here so that the
shipped profiles (conf/profiles/, docs/calibration.md) can be re-measured. Needs torch + CUDA.

Random weights, real architecture: latency depends on shapes, not values.
Writes JSON to $OUT (or ./out). Run: python3 profile_llama.py --model 8b
"""
import argparse, json, os, statistics, time
import torch

CONFIGS = {
    # Llama-3-8B / 3.1-8B shapes
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    # Llama-3-70B shapes, a slice of layers (scaled afterwards by 80/layers)
    "70b-slice": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=8,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}

def timed(fn, warm=2, reps=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    xs = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        xs.append(s.elapsed_time(e))
    return statistics.median(xs)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8b")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import DynamicCache
    cfg = LlamaConfig(**CONFIGS[a.model], max_position_embeddings=32768, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    init_s = time.time() - t0
    dev = torch.cuda.get_device_name(0)
    L, kvh, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    kv_bytes_per_token = 2 * L * kvh * hd * 2
    res = dict(device=dev, model=a.model, config=CONFIGS[a.model], init_s=init_s,
               kv_bytes_per_token=kv_bytes_per_token, torch=torch.__version__)
    V = cfg.vocab_size
    ids = lambda b, n: torch.randint(0, V, (b, n), device="cuda")

    @torch.inference_mode()
    def prefill(b, n):
        x = ids(b, n)
        return timed(lambda: model.model(input_ids=x, use_cache=False))  # skip lm_head over all tokens

    lens = [128, 256, 512, 1024, 2048, 4096, 8192] if not a.quick else [256, 1024]
    res["prefill_b1_ms"] = {n: prefill(1, n) for n in lens}
    print("prefill", res["prefill_b1_ms"], flush=True)
    res["prefill_batched_ms"] = {}
    for b in ([2, 4, 8, 16] if not a.quick else [4]):
        for n in [512, 2048]:
            if b * n > 32768: continue
            res["prefill_batched_ms"][f"{b}x{n}"] = prefill(b, n)
    print("batched", res["prefill_batched_ms"], flush=True)

    @torch.inference_mode()
    def cached_prefill(p, s):
        # prefix p tokens already in KV cache; compute s new tokens
        x = ids(1, p); y = ids(1, s)
        def run():
            c = DynamicCache()
            model.model(input_ids=x, past_key_values=c, use_cache=True)
            return c
        base = run()
        ks = [(layer.keys.clone(), layer.values.clone()) for layer in base.layers] if hasattr(base, "layers") else None
        def step():
            c = DynamicCache()
            for i, (k, v) in enumerate(ks):
                c.update(k, v, i)
            model.model(input_ids=y, past_key_values=c, use_cache=True)
        full = timed(step)
        # subtract cache rebuild cost (copies only)
        def rebuild():
            c = DynamicCache()
            for i, (k, v) in enumerate(ks):
                c.update(k, v, i)
        return full - timed(rebuild)
    res["cached_prefill_ms"] = {}
    for p in ([512, 1024, 2048, 4096] if not a.quick else [1024]):
        for s in [32, 128, 512]:
            try:
                res["cached_prefill_ms"][f"{p}+{s}"] = cached_prefill(p, s)
            except Exception as e:
                res["cached_prefill_ms"][f"{p}+{s}"] = f"error: {e}"
    print("cached", res["cached_prefill_ms"], flush=True)

    @torch.inference_mode()
    def decode(b, ctx):
        x = ids(b, ctx); y = ids(b, 1)
        c = DynamicCache(); model.model(input_ids=x, past_key_values=c, use_cache=True)
        ks = [(layer.keys, layer.values) for layer in c.layers]
        def step():
            c2 = DynamicCache()
            for i, (k, v) in enumerate(ks):
                c2.update(k, v, i)
            model(input_ids=y, past_key_values=c2, use_cache=True)
        def rebuild():
            c2 = DynamicCache()
            for i, (k, v) in enumerate(ks):
                c2.update(k, v, i)
        return timed(step) - timed(rebuild)
    res["decode_step_ms"] = {}
    for b in ([1, 8, 32] if not a.quick else [8]):
        for ctx in [1024, 4096]:
            try:
                res["decode_step_ms"][f"{b}x{ctx}"] = decode(b, ctx)
            except Exception as e:
                res["decode_step_ms"][f"{b}x{ctx}"] = f"error: {e}"
    print("decode", res["decode_step_ms"], flush=True)

    # host -> device copy of KV blobs (LMCache retrieve from CPU memory), pinned and pageable
    res["h2d_GBps"] = {}
    for mb in [16, 64, 256, 1024]:
        n = mb * 2**20
        for pinned in (True, False):
            h = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
            d = torch.empty(n, dtype=torch.uint8, device="cuda")
            ms = timed(lambda: d.copy_(h, non_blocking=pinned))
            res["h2d_GBps"][f"{mb}MB_{'pinned' if pinned else 'pageable'}"] = n / (ms / 1e3) / 1e9
    print("h2d", res["h2d_GBps"], flush=True)
    out = os.environ.get("OUT", "out"); os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"profile-{a.model}.json"), "w") as f:
        json.dump(res, f, indent=1)

if __name__ == "__main__":
    main()
