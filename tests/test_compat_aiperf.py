"""A load tool of the ecosystem, really run: AIPerf (NVIDIA's successor to
GenAI-Perf) against `cacheroute demo`, a short fixed run per endpoint (chat
streamed with per-chunk usage, completions whole), with the server's token
counts. Every request succeeds, and the input length AIPerf reports for each
request is the real Llama-3 token count of the prompt it sent
(benches/compat/aiperf_check.py reads AIPerf's own output files).

AIPerf runs offline: HF_HUB_OFFLINE=1, the repo's Llama-3 tokenizer laid out as
a Hub cache entry of meta-llama/Meta-Llama-3-8B-Instruct in a temporary
HF_HUB_CACHE (AIPerf's offline mode reads tokenizers only from the Hub cache).

scripts/test.sh installs AIPerf into its own virtual environment
(target/compat-venv); the test is skipped only when that is missing, i.e. when
the install failed (AIPERF_BIN names another executable)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from crtest import MODEL, sample_sum, scrape, start_demo
from llama3 import TOKENIZER_DIR

REPO = Path(__file__).resolve().parent.parent
AIPERF_VERSION = "0.13.0"
# Meta's revision whose tokenizer files the repo's copy equals (conf/tokenizers/llama3/NOTICE.md).
HUB_REPO, HUB_REVISION = "meta-llama/Meta-Llama-3-8B-Instruct", "8afb486c1db24fe5011ec46dfbe5b5dccdb575c2"

_spec = importlib.util.spec_from_file_location("aiperf_check", REPO / "benches/compat/aiperf_check.py")
aiperf_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aiperf_check)


@pytest.fixture(scope="module")
def aiperf() -> str:
    path = os.environ.get("AIPERF_BIN") or str(REPO / "target/compat-venv/bin/aiperf")
    if not os.access(path, os.X_OK):
        pytest.skip(f"AIPerf is not installed at {path}: scripts/test.sh installs it "
                    f"(python3 -m venv target/compat-venv && target/compat-venv/bin/pip install "
                    f"aiperf=={AIPERF_VERSION}); the install failed or was not run")
    return path


def hub_cache(root: Path) -> Path:
    """The repo's tokenizer as the Hub cache entry AIPerf's offline mode looks up."""
    entry = root / ("models--" + HUB_REPO.replace("/", "--"))
    snap = entry / "snapshots" / HUB_REVISION
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(HUB_REVISION)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_DIR / name, snap / name)
    return root


# (endpoint type, streamed, requests, input tokens, output tokens)
RUNS = [("chat", True, 50, 256, 32), ("completions", False, 50, 200, 16)]


def test_aiperf_against_the_demo_every_request_ok_and_real_input_lengths(procs, cr_bin, aiperf, tmp_path):
    demo = start_demo(procs, cr_bin, "--time-scale", "20")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache(tmp_path / "hub")),
           "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost"}
    for endpoint, streamed, requests, isl, osl in RUNS:
        out = tmp_path / f"aiperf-{endpoint}"
        cmd = [aiperf, "profile", "--model", MODEL, "--url", demo.url, "--endpoint-type", endpoint,
               "--tokenizer", HUB_REPO,
               "--synthetic-input-tokens-mean", str(isl), "--synthetic-input-tokens-stddev", "0",
               "--output-tokens-mean", str(osl), "--output-tokens-stddev", "0",
               "--request-count", str(requests), "--concurrency", "4", "--random-seed", "7",
               "--use-server-token-count", "--export-level", "raw", "--artifact-dir", str(out),
               "--no-auto-plot"]
        if streamed:
            cmd += ["--streaming", "--per-chunk-usage"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert p.returncode == 0, f"aiperf exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        figures = aiperf_check.check(out, requests, osl)
        assert figures["aiperf_version"] == AIPERF_VERSION
        print(endpoint, figures)
    # The gateway answered them all (and nothing else through these routes).
    fams = scrape(demo.control + "/metrics")
    for endpoint, _, requests, _, _ in RUNS:
        ok = sample_sum(fams, "cacheroute_requests_total", lambda l: l.get("route") == endpoint and l.get("status") == "200")
        bad = sample_sum(fams, "cacheroute_requests_total", lambda l: l.get("route") == endpoint and l.get("status") != "200")
        assert (ok, bad) == (requests, 0), (endpoint, ok, bad)
