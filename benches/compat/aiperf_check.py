"""Checks one AIPerf run against the gateway and prints its figures.

Reads what `aiperf profile --export-level raw --artifact-dir DIR` wrote in DIR:
the summary (profile_export_aiperf.json), one record per request with its
metrics (profile_export.jsonl) and the raw exchange with the payload AIPerf sent
(profile_export_raw.jsonl). Checks that every request was answered 200 without
an error, and that the input sequence length AIPerf reports for each request
equals the real Llama-3 token count of the prompt it sent (the `tokenizers`
package on conf/tokenizers/llama3/tokenizer.json, Llama-3's chat template for
chat), and that the output length is the one asked for.

Used by tests/test_compat_aiperf.py and by benches/compat/run.sh:

    python3 benches/compat/aiperf_check.py DIR --requests 100 --osl 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent.parent
TOKENIZER = Tokenizer.from_file(str(REPO / "conf/tokenizers/llama3/tokenizer.json"))


def real_tokens(payload: dict) -> int:
    """What vLLM counts for this request body: chat through Llama-3's template
    (content trimmed, generation prompt; no extra BOS), a completion's prompt with
    BOS added."""
    if "messages" in payload:
        text = "<|begin_of_text|>"
        for m in payload["messages"]:
            text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return len(TOKENIZER.encode(text, add_special_tokens=False).ids)
    prompt = payload["prompt"]
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ValueError(f"unexpected prompt shape in an AIPerf payload: {str(prompt)[:200]}")
        prompt = prompt[0]
    return len(TOKENIZER.encode(prompt, add_special_tokens=True).ids)


def _value(metrics: dict, name: str):
    m = metrics.get(name)
    return None if m is None else m.get("value")


def check(out_dir: Path, requests: int, osl: int) -> dict:
    """Raise AssertionError naming the first thing that is wrong; return the figures."""
    summary = json.loads((out_dir / "profile_export_aiperf.json").read_text())
    records = [json.loads(line) for line in (out_dir / "profile_export.jsonl").read_text().splitlines() if line]
    raw = {}
    for line in (out_dir / "profile_export_raw.jsonl").read_text().splitlines():
        if line:
            r = json.loads(line)
            raw[r["metadata"]["x_request_id"]] = r

    assert summary.get("error_summary") in (None, []), f"AIPerf reports errors: {summary['error_summary']}"
    assert "error_request_count" not in summary or summary["error_request_count"]["avg"] == 0, summary[
        "error_request_count"]
    assert summary["request_count"]["avg"] == requests, f"request_count {summary['request_count']} != {requests}"
    assert len(records) == requests, f"{len(records)} records, expected {requests}"
    assert len(raw) == requests, f"{len(raw)} raw records, expected {requests}"

    mismatches = []
    for rec in records:
        rid = rec["metadata"]["x_request_id"]
        assert rec.get("error") is None, f"request {rid} failed: {rec['error']}"
        r = raw[rid]
        assert r["status"] == 200, f"request {rid} answered {r['status']}"
        isl = _value(rec["metrics"], "input_sequence_length")
        real = real_tokens(r["payload"])
        if isl != real:
            mismatches.append((rid, isl, real))
        got_osl = _value(rec["metrics"], "output_sequence_length")
        assert got_osl == osl, f"request {rid}: output length {got_osl}, asked {osl}"
    assert not mismatches, f"{len(mismatches)} requests whose reported ISL is not the real count " \
                           f"(id, reported, real): {mismatches[:5]}"

    def stat(name: str, key: str = "avg"):
        m = summary.get(name)
        return None if m is None else m.get(key)

    return {
        "aiperf_version": summary.get("aiperf_version"),
        "requests_ok": len(records),
        "requests_total": requests,
        "isl_avg": stat("input_sequence_length"),
        "isl_min": stat("input_sequence_length", "min"),
        "isl_max": stat("input_sequence_length", "max"),
        "osl_avg": stat("output_sequence_length"),
        "ttft_avg_ms": stat("time_to_first_token"),
        "ttft_p50_ms": stat("time_to_first_token", "p50"),
        "ttft_p99_ms": stat("time_to_first_token", "p99"),
        "latency_avg_ms": stat("request_latency"),
        "request_throughput_rps": stat("request_throughput"),
        "output_token_throughput_tps": stat("output_token_throughput"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--osl", type=int, required=True)
    args = ap.parse_args()
    try:
        figures = check(args.out_dir, args.requests, args.osl)
    except (AssertionError, OSError, KeyError, ValueError) as e:
        print(f"aiperf_check: FAILED: {e}", file=sys.stderr)
        return 1
    for k, v in figures.items():
        print(f"{k}: {round(v, 2) if isinstance(v, float) else v}")
    print(f"every request answered 200, reported ISL = real Llama-3 count for all {args.requests}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
