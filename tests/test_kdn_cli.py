"""`cacheroute knowledge list|show|search|delete` against a real `cacheroute kdn`:
the output the README promises (each block's id, title and per-model status;
one block as JSON; ranked search hits) is checked, not just the exit code."""

from __future__ import annotations

import json
import subprocess

from crtest import MODEL
from kfleet import BLOCKS, sim_args, start_kdn


def run_cli(cr_bin: str, kdn_url: str, *args: str) -> str:
    p = subprocess.run([cr_bin, "knowledge", "--kdn", kdn_url, *args], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, f"cacheroute knowledge {' '.join(args)}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_knowledge_cli_prints_what_the_kdn_holds(procs, cr_bin, sim, redis_server, tmp_path):
    producer = sim(extra=sim_args(f"{redis_server}/0"))
    kdn = start_kdn(procs, cr_bin, tmp_path, "kdn-cli", redis_server, {"t": (f"{redis_server}/1", None)},
                    producer.url)
    assert run_cli(cr_bin, kdn.url, "list").strip() == "no knowledge registered"
    title, text = BLOCKS["tidal"]
    out = run_cli(cr_bin, kdn.url, "register", "--text", text, "--id", "tidal", "--title", title,
                  "--tag", "water", "--wait")
    assert out.splitlines()[0] == f"tidal  {title}", out
    kdn.register("lichen")
    rec = {b: kdn.wait_kv_ready(b)["models"][MODEL] for b in ("tidal", "lichen")}

    # list: one header line per block, then one status line per model
    out = run_cli(cr_bin, kdn.url, "list")
    lines = out.splitlines()
    for bid in ("tidal", "lichen"):
        head = f"{bid}  {BLOCKS[bid][0]}"
        assert head in lines, out
        status = lines[lines.index(head) + 1]
        m = rec[bid]
        assert status.startswith(f"    {MODEL}: kv_ready, {m['tokens']} tokens, {m['chunks']} chunks, "), out
    assert len([ln for ln in lines if not ln.startswith(" ")]) == 2, out

    # show: the record as JSON, with its keys on request
    shown = json.loads(run_cli(cr_bin, kdn.url, "show", "tidal", "--keys"))
    assert shown["id"] == "tidal" and shown["title"] == title and shown["tags"] == ["water"], shown
    m = shown["models"][MODEL]
    assert m["status"] == "kv_ready" and m["tokens"] == rec["tidal"]["tokens"]
    assert len(m["keys"]) == m["chunks"] == rec["tidal"]["chunks"], m

    # search: score, id and title per hit, best first; the matching block leads
    out = run_cli(cr_bin, kdn.url, "search", "surfers", "estuary", "bore")
    hits = [ln.split() for ln in out.splitlines() if not ln.startswith("         ")]
    assert hits and hits[0][1] == "tidal", out
    assert float(hits[0][0]) > 0
    assert [h[1] for h in hits].count("lichen") <= 1
    assert all(float(a[0]) >= float(b[0]) for a, b in zip(hits, hits[1:])), out
    assert run_cli(cr_bin, kdn.url, "search", "zzqx-no-such-word").strip() == "no match"

    # delete, then list no longer shows it
    out = run_cli(cr_bin, kdn.url, "delete", "tidal")
    assert out.startswith("deleted tidal ("), out
    out = run_cli(cr_bin, kdn.url, "list")
    assert "tidal" not in out and f"lichen  {BLOCKS['lichen'][0]}" in out.splitlines(), out
