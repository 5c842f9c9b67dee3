"""The `openai` npm package through `cacheroute demo`: tests/npm/compat.mjs runs a
chat completion, a streamed one with `stream_options.include_usage`,
embeddings, models.list / retrieve and a refused request, and prints what the
client parsed; here the content, the usage and the prompt token counts (the
real Llama-3 counts) are checked.

Needs node and tests/npm/node_modules: scripts/test.sh installs node/npm
(Debian `nodejs npm`) when missing and runs `npm ci` in tests/npm (the package
and its version are pinned by the committed package-lock.json)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from crtest import MODEL, sample_sum, scrape, start_demo
from llama3 import chat_tokens

NPM_DIR = Path(__file__).resolve().parent / "npm"

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  Name three uses of a KV cache.  "}]
STREAMED = [{"role": "user", "content": "Qu'est-ce qu'un cache ? 日本語, emoji 🚀."}]


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if not exe:
        pytest.fail("node is not installed (scripts/test.sh installs it: apt-get install nodejs npm)", pytrace=False)
    if not (NPM_DIR / "node_modules/openai/package.json").is_file():
        pytest.fail("the openai npm package is not installed: run `npm ci` in tests/npm (scripts/test.sh does)",
                    pytrace=False)
    return exe


def test_openai_npm_package_through_the_demo(procs, cr_bin, node):
    demo = start_demo(procs, cr_bin, "--time-scale", "50")
    p = subprocess.run([node, "compat.mjs", demo.v1, MODEL], cwd=NPM_DIR, capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin", "NO_PROXY": "127.0.0.1,localhost"})
    assert p.returncode == 0, f"node exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    out = json.loads(p.stdout.strip().splitlines()[-1])
    pinned = json.loads((NPM_DIR / "package.json").read_text())["dependencies"]["openai"]
    assert out["version"] == pinned

    chat = out["chat"]
    assert chat["content"] and chat["finish_reason"] == "length"
    assert chat["usage"]["prompt_tokens"] == chat_tokens(CHAT)
    assert chat["usage"]["completion_tokens"] == 8
    assert chat["usage"]["total_tokens"] == chat_tokens(CHAT) + 8

    stream = out["stream"]
    assert stream["content"]
    assert stream["usage_chunks"] == 1, "usage only on the last chunk without continuous_usage_stats"
    assert stream["usage"]["prompt_tokens"] == chat_tokens(STREAMED)
    assert stream["usage"]["completion_tokens"] == 6
    # role+token chunks, the finish chunk and the usage chunk
    assert stream["chunks"] == 6 + 2

    emb = out["embeddings"]
    assert emb["count"] == 2 and emb["indexes"] == [0, 1]
    assert emb["dims"][0] > 0 and emb["dims"][0] == emb["dims"][1]
    assert emb["usage"]["prompt_tokens"] > 0

    assert out["models"]["ids"] == [MODEL]
    assert out["models"]["retrieved"]["id"] == MODEL
    assert out["models"]["retrieved"]["owned_by"] == "vllm" and out["models"]["retrieved"]["created"] > 0

    refused = out["refused"]
    assert refused is not None and refused["class"] == "BadRequestError" and refused["status"] == 400
    assert "max_tokens: expected a non-negative integer, got -1" in refused["message"]

    # Every call went through the gateway's routes.
    fams = scrape(demo.control + "/metrics")
    answered = {route: sample_sum(fams, "cacheroute_requests_total",
                                  lambda l, r=route: l.get("route") == r and l.get("status") == "200")
                for route in ("chat", "embeddings")}
    assert answered == {"chat": 2, "embeddings": 1}, answered
