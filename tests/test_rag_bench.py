"""The RAG benchmark end to end (`benches/rag/rag_bench.py --small`): the whole fleet
(sims with bounded Redis stores, a producer, a KDN, agents, gateways) over the built
binary, every CacheRoute policy on one small Zipf workload, then the report.

The vllm-router policies run only when vllm-router is installed (target/bench-venv,
or VLLM_ROUTER_BIN): installing it takes minutes, so the suite does not; `python3
benches/rag/rag_bench.py --install-router` covers them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benches" / "rag" / "rag_bench.py"
CR_POLICIES = ["text", "kv", "adaptive", "iws", "hybrid", "kv@round_robin"]
ROUTER_POLICIES = ["vllm-router-round_robin", "vllm-router-cache_aware", "shared-lmcache"]


def router_installed() -> bool:
    exe = os.environ.get("VLLM_ROUTER_BIN") or str(REPO / "target" / "bench-venv" / "bin" / "vllm-router")
    return os.access(exe, os.X_OK)


def test_small_bench_runs_every_policy_and_writes_the_report(cr_bin, tmp_path):
    loadgen = Path(cr_bin).parent / "cacheroute-loadgen"
    if not os.access(loadgen, os.X_OK):
        pytest.fail(f"{loadgen} not built: cargo build -p cacheroute-benches --bin cacheroute-loadgen",
                    pytrace=False)
    policies = CR_POLICIES + (ROUTER_POLICIES if router_installed() else [])
    out = tmp_path / "results"
    cmd = [sys.executable, str(SCRIPT), "--small", "--bin", cr_bin, "--loadgen", str(loadgen),
           "--out", str(out), "--policies", ",".join(policies)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, f"rag_bench failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"

    reports = list(out.glob("rag-*-small.json"))
    assert len(reports) == 1, sorted(p.name for p in out.iterdir())
    stem = reports[0].parent / reports[0].name[: -len(".json")]
    for suffix in (".md", "-ttft.png", "-kv-reuse.png"):
        p = stem.parent / (stem.name + suffix)
        assert p.is_file() and p.stat().st_size > 0, f"{p.name} missing"
    data = json.loads(reports[0].read_text())
    md = (stem.parent / (stem.name + ".md")).read_text()
    assert "python3 benches/rag/rag_bench.py --small" in md

    rows = {row["policy"]: row for row in data["rows"]}
    assert set(rows) == set(policies), sorted(rows)
    for name, row in rows.items():
        if row.get("skipped"):
            # Only hybrid may be missing, and only from a gateway that refuses it.
            assert name == "hybrid" and "hybrid" in row["skipped"], row
            continue
        assert row["requests"] > 0 and row["statuses"] == {"200": row["requests"]}, (name, row["statuses"],
                                                                                      row["errors"])
        assert row["ok"] == row["requests"], (name, row)
    # KV injection serves the knowledge from cache; text recomputes what the store missed.
    assert rows["kv"]["kv_reuse"] > rows["text"]["kv_reuse"], (rows["kv"]["kv_reuse"], rows["text"]["kv_reuse"])
    assert rows["kv"]["modes"].get("kv", 0) > 0 and rows["text"]["modes"] == {"text": rows["text"]["ok"]}
    assert rows["kv"]["kdn_bytes"] > 0 and rows["text"]["kdn_bytes"] == 0
    # Caches start empty every run: without KDN transfers no policy reuses more than the
    # repeats of the run's own requests.
    bound = data["repeat_reuse_bound"]
    assert 0 < bound < 1 and rows["text"]["kv_reuse"] <= bound + 1e-9, (rows["text"]["kv_reuse"], bound)
    assert f"at most {bound:.2f}" in md


def test_small_bench_with_async_loading(cr_bin, tmp_path):
    """`--async-loading`: the sims prefetch remote-store hits off the step (LMCache's
    async loading) and the gateways price them so; every request still completes."""
    loadgen = Path(cr_bin).parent / "cacheroute-loadgen"
    out = tmp_path / "results"
    cmd = [sys.executable, str(SCRIPT), "--small", "--bin", cr_bin, "--loadgen", str(loadgen), "--out", str(out),
           "--policies", "text,kv,adaptive", "--async-loading", "--weigh-others", "--links", "100"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, f"rag_bench failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    (report,) = out.glob("rag-*-small.json")
    data = json.loads(report.read_text())
    assert data["params"]["async_loading"] is True and data["sim_caps"]["async_loading"] is True
    rows = {row["policy"]: row for row in data["rows"]}
    assert set(rows) == {"text", "kv", "adaptive"}
    for name, row in rows.items():
        assert row["ok"] == row["requests"] > 0, (name, row["statuses"], row["errors"])
    assert rows["kv"]["kdn_bytes"] > 0 and rows["kv"]["kv_reuse"] > rows["text"]["kv_reuse"]
    md = report.with_suffix(".md").read_text()
    assert "prefetched off the step" in md and "--async-loading" in md
