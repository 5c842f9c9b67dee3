"""The control plane's /metrics: valid Prometheus text whose counters move
exactly as requests pass; the bearer token guards the control plane."""

from __future__ import annotations

from crtest import chat_body, client, completion_body, is_upstream, pool, sample_names, sample_sum, scrape


def is_chat(labels: dict) -> bool:
    return "chat" in labels.get("route", "")


def is_completions(labels: dict) -> bool:
    r = labels.get("route", "")
    return "completions" in r and "chat" not in r


def requests_total(fams, route_pred, status: str) -> float:
    return sample_sum(fams, "cacheroute_requests_total",
                      lambda l: route_pred(l) and l.get("status") == status)


def test_metrics_parse_and_counters_move(sim, gateway):
    s = sim()
    g = gateway(upstreams=[s.url])
    with client() as c:
        r = c.get(g.control + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    before = scrape(g.control + "/metrics")
    names = sample_names(before)
    for want in ("cacheroute_upstream_inflight", "cacheroute_upstream_healthy",
                 "cacheroute_config_version"):
        assert want in names, f"{want} missing; have {sorted(names)}"
    assert any(n.startswith("cacheroute_config_reload_total") for n in names), sorted(names)

    n_chat, n_chat_stream, n_compl, n_compl_stream, n_404, n_400 = 5, 3, 2, 2, 2, 1
    with client() as c:
        for _ in range(n_chat):
            assert c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200
        for _ in range(n_chat_stream):
            assert c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=3, stream=True)).status_code == 200
        for _ in range(n_compl):
            assert c.post(g.url + "/v1/completions", json=completion_body(max_tokens=2)).status_code == 200
        for _ in range(n_compl_stream):
            assert c.post(g.url + "/v1/completions", json=completion_body(max_tokens=3, stream=True)).status_code == 200
        for _ in range(n_404):
            assert c.post(g.url + "/v1/chat/completions", json=chat_body(model="nope")).status_code == 404
        for _ in range(n_400):
            assert c.post(g.url + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
    after = scrape(g.control + "/metrics")

    def delta(route_pred, status):
        return requests_total(after, route_pred, status) - requests_total(before, route_pred, status)

    assert delta(is_chat, "200") == n_chat + n_chat_stream
    assert delta(is_completions, "200") == n_compl + n_compl_stream
    assert delta(is_chat, "404") == n_404
    assert delta(is_completions, "400") == n_400
    total = sample_sum(after, "cacheroute_requests_total") - sample_sum(before, "cacheroute_requests_total")
    assert total == n_chat + n_chat_stream + n_compl + n_compl_stream + n_404 + n_400

    # the 200s are labelled with the upstream that served them
    served = sample_sum(after, "cacheroute_requests_total",
                        lambda l: l.get("status") == "200" and is_upstream(l, s.url))
    assert served == n_chat + n_chat_stream + n_compl + n_compl_stream

    proxied = n_chat + n_chat_stream + n_compl + n_compl_stream
    dur = sample_sum(after, "cacheroute_request_duration_seconds_count") - sample_sum(before, "cacheroute_request_duration_seconds_count")
    assert proxied <= dur <= proxied + n_404 + n_400
    ttft = sample_sum(after, "cacheroute_ttft_seconds_count") - sample_sum(before, "cacheroute_ttft_seconds_count")
    assert n_chat_stream + n_compl_stream <= ttft <= proxied

    # histograms are consistent: +Inf bucket == count, buckets cumulative
    for fam in after:
        if fam.type != "histogram":
            continue
        by_series: dict = {}
        for smp in fam.samples:
            key = tuple(sorted((k, v) for k, v in smp.labels.items() if k != "le"))
            by_series.setdefault(key, {"buckets": []})
            if smp.name.endswith("_bucket"):
                by_series[key]["buckets"].append((float(smp.labels["le"]), smp.value))
            elif smp.name.endswith("_count"):
                by_series[key]["count"] = smp.value
        for key, ser in by_series.items():
            bk = sorted(ser["buckets"])
            assert bk and bk[-1][0] == float("inf"), (fam.name, key)
            assert bk[-1][1] == ser.get("count"), (fam.name, key)
            assert all(x[1] <= y[1] for x, y in zip(bk, bk[1:])), (fam.name, key)

    # nothing left in flight, the upstream is healthy, the version matches
    assert sample_sum(after, "cacheroute_upstream_inflight") == 0
    assert sample_sum(after, "cacheroute_upstream_healthy", lambda l: is_upstream(l, s.url)) == 1
    assert sample_sum(after, "cacheroute_config_version") == g.status()["config_version"]


TOKEN = "s3cret-token"


def test_control_token(sim, gateway):
    s = sim()
    g = gateway(config={"gateway": {"control_token": TOKEN}, "pools": [pool("p", [s.url])]}, token=TOKEN)
    with client() as c:
        for method, path in (("GET", "/metrics"), ("GET", "/debug/status"), ("POST", "/admin/reload")):
            r = c.request(method, g.control + path)
            assert r.status_code == 401, f"{method} {path} without token: {r.status_code}"
            r = c.request(method, g.control + path, headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401, f"{method} {path} with a wrong token: {r.status_code}"
            r = c.request(method, g.control + path, headers={"authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200, f"{method} {path} with the token: {r.status_code} {r.text[:200]}"
        assert c.get(g.control + "/healthz").status_code == 200  # always open
        # the service plane does not ask for the control token
        assert c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=1)).status_code == 200
    v = g.status()["config_version"]
    assert g.reload().status_code == 200
    assert g.status()["config_version"] == v + 1
