"""`cacheroute demo`: a gateway and two sims in one process, usable with
the openai client as printed."""

from __future__ import annotations

from collections import Counter

import openai

from crtest import free_port, norm_url, two_free_ports


def test_demo(procs, cr_bin):
    port, cport, kport, sim_port = free_port(), free_port(), free_port(), two_free_ports()
    p = procs.start("demo", [cr_bin, "demo", "--listen", f"127.0.0.1:{port}", "--control", f"127.0.0.1:{cport}",
                             "--sim-port", str(sim_port), "--kdn-listen", f"127.0.0.1:{kport}",
                             "--time-scale", "50"])
    base = f"http://127.0.0.1:{port}"
    p.wait_http(base + "/health")
    p.wait_http(f"http://127.0.0.1:{cport}/healthz")
    oa = openai.OpenAI(base_url=base + "/v1", api_key="demo", max_retries=0, timeout=30)
    seen = Counter()
    for _ in range(6):
        raw = oa.chat.completions.with_raw_response.create(
            model="llama3-8b", messages=[{"role": "user", "content": "hello demo"}], max_tokens=4)
        assert raw.parse().choices[0].message.content
        seen[norm_url(raw.headers.get("x-cacheroute-instance"))] += 1
    assert set(seen) == {f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{sim_port + 1}"}, seen
    # it says how to call it
    assert f"127.0.0.1:{port}" in p.logs()
