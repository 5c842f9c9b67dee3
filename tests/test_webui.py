"""The dashboard at /ui (in a real headless Chromium driven by Selenium), its
token, and the Grafana dashboard under conf/grafana checked against the metrics
a running demo, KDN and agent expose.

With CACHEROUTE_SCREENSHOTS=DIR (e.g. docs/img) the browser test saves a
screenshot of each view as DIR/ui-VIEW.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from crtest import MODEL, client, free_port, wait_until
from test_demo import two_free_ports

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "conf" / "grafana" / "cacheroute-dashboard.json"
PROMETHEUS = REPO / "conf" / "prometheus" / "prometheus.yml"
VIEWS = ["fleet", "kdns", "knowledge", "decisions", "playground"]


class Demo:
    def __init__(self, proc, port: int, cport: int, kport: int, sim_port: int):
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.control = f"http://127.0.0.1:{cport}"
        self.kdn = f"http://127.0.0.1:{kport}"
        self.sims = [f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{sim_port + 1}"]

    def config_path(self) -> Path:
        m = re.search(r"^\s*config\s+(\S+)", self.proc.logs(), re.M)
        assert m, self.proc.logs()
        return Path(m.group(1))


def start_demo(procs, cr_bin, time_scale: float = 50, injection: str = "adaptive") -> Demo:
    port, cport, kport, sim_port = free_port(), free_port(), free_port(), two_free_ports()
    p = procs.start("demo", [cr_bin, "demo", "--listen", f"127.0.0.1:{port}", "--control", f"127.0.0.1:{cport}",
                             "--sim-port", str(sim_port), "--kdn-listen", f"127.0.0.1:{kport}",
                             "--time-scale", str(time_scale), "--injection", injection])
    d = Demo(p, port, cport, kport, sim_port)
    p.wait_http(d.url + "/health")
    p.wait_http(d.control + "/healthz")
    wait_until(lambda: "knowledge ready" in p.logs(), timeout=120, what="the demo's knowledge is ready")
    assert f"{d.control}/ui" in p.logs()  # the banner names the dashboard
    wait_until(lambda: client().get(d.control + "/debug/knowledge").json()["blocks"] >= 24,
               timeout=30, what="the gateway synced the KDN's registry")
    return d


def start_agent(procs, cr_bin, d: Demo, engine: str) -> str:
    """An instance agent beside `engine`, registered with the demo's gateway; its URL."""
    port = free_port()
    p = procs.start("agent", [cr_bin, "agent", "--engine", engine, "--listen", f"127.0.0.1:{port}",
                              "--gateway", d.control, "--kdn", d.kdn])
    url = f"http://127.0.0.1:{port}"
    p.wait_http(url + "/health")
    wait_until(lambda: client().get(d.control + "/debug/knowledge").json()["agents"], timeout=30,
               what="the agent registered with the demo's gateway")
    return url


def rag(base: str, question: str, **extra) -> httpx.Response:
    with client(timeout=60) as c:
        r = c.post(base + "/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 8, "RAG": True,
            "messages": [{"role": "user", "content": question}], **extra})
    assert r.status_code == 200, r.text
    return r


# --------------------------------------------------------------------------
# the browser


@pytest.fixture
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("chromium and chromium-driver are not installed (scripts/test.sh installs them)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1440,1000", "--no-proxy-server"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def console_errors(drv) -> list[dict]:
    return [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]


def screenshot(drv, view: str) -> None:
    out = os.environ.get("CACHEROUTE_SCREENSHOTS")
    if not out:
        return
    d = Path(out)
    if not d.is_absolute():
        d = REPO / d
    d.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(d / f"ui-{view}.png"))


def by_id(drv, el_id: str):
    from selenium.webdriver.common.by import By
    return drv.find_element(By.ID, el_id)


def show(drv, view: str) -> None:
    drv.execute_script("location.hash = arguments[0]", view)
    wait_until(lambda: "active" in by_id(drv, f"view-{view}").get_attribute("class"), timeout=5,
               what=f"the {view} view shows")


def test_dashboard_shows_the_fleet_the_decisions_and_the_playground(procs, cr_bin, browser):
    from selenium.webdriver.common.by import By

    # `kv`: a fixed strategy that follows the client's "injection" (both modes show)
    d = start_demo(procs, cr_bin, injection="kv")
    start_agent(procs, cr_bin, d, d.sims[1])
    # some traffic first, so every view has something to show
    for q, mode in (("What is paged attention?", "kv"), ("How does speculative decoding work?", "text"),
                    ("What is a KV cache?", "kv")):
        rag(d.url, q, injection=mode)
    # A block registered now is in no instance's store as far as the gateway knows: a
    # KV request for it makes the gateway ask the KDN to inject it (a job in the journal).
    with client(timeout=60) as c:
        r = c.post(d.kdn + "/v1/knowledge", params={"wait": "true"}, json={
            "id": "aurora-borealis", "title": "Aurora borealis", "models": [MODEL],
            "text": "An aurora borealis glows when charged solar wind particles strike oxygen and "
                    "nitrogen high in the ionosphere; green light comes from oxygen near one hundred "
                    "kilometres up, crimson from oxygen higher still. " * 12})
        assert r.status_code in (200, 201), r.text

    def injected():
        rag(d.url, "Why does an aurora borealis glow green in the ionosphere?", injection="kv")
        jobs = client().get(d.control + "/ui/api/state").json()["injections"]
        return [j for j in jobs if j["block"] == "aurora-borealis" and j["state"] == "done"]

    job = wait_until(injected, timeout=30, interval=0.2, what="the gateway injected the new block")[0]
    assert job["target"] in ("sim-0", "sim-1") and job["bytes"] > 0 and job["bandwidth_bytes_per_s"] > 0, job
    browser.get(d.control + "/ui")
    wait_until(lambda: "live" in by_id(browser, "conn").text, timeout=15, what="the page's first poll")

    # Fleet: both sims, healthy, with the knowledge resident in their stores
    wait_until(lambda: all(s in by_id(browser, "fleet-pools").text for s in d.sims), timeout=10,
               what="both instances in the fleet view")
    assert "healthy" in by_id(browser, "fleet-pools").text
    wait_until(lambda: "no agent" in by_id(browser, "fleet-pools").text and "%" in by_id(browser, "fleet-pools").text,
               timeout=15, what="sim 1's agent (GPU KV usage) in the fleet view, none beside sim 0")
    wait_until(lambda: "bm25" in by_id(browser, "fleet-pools").text, timeout=10,
               what="the knowledge resident in the sims' stores (from the KDN's registry)")
    screenshot(browser, "fleet")

    show(browser, "kdns")
    wait_until(lambda: "up" in by_id(browser, "kdn-list").text and "sim-1" in by_id(browser, "kdn-list").text,
               timeout=10, what="the KDN and its targets")
    wait_until(lambda: "aurora-borealis" in by_id(browser, "jobs").text and "done" in by_id(browser, "jobs").text,
               timeout=10, what="the injection job with its bandwidth")
    screenshot(browser, "kdns")

    show(browser, "knowledge")
    wait_until(lambda: "speculative-decoding" in by_id(browser, "blocks").text, timeout=10, what="the blocks")
    # the table is redrawn on every poll: read it in one go
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#blocks tbody tr')].map(r => [...r.cells].map(c => c.innerText))")
    assert len(rows) >= 24
    used = [r for r in rows if r[0] == "paged-attention"]
    assert used and used[0][3] == "kv_ready" and int(used[0][4].replace(",", "")) >= 256, used
    assert int(used[0][-1]) >= 1, used  # the request above needed it
    screenshot(browser, "knowledge")

    # Decisions: a request sent now appears in the stream
    show(browser, "decisions")
    r = rag(d.url, "How does continuous batching schedule requests?")
    rid = r.headers["x-cacheroute-decision"]
    row = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, f'#stream tr[data-id="{rid}"]'),
                     timeout=10, what=f"decision {rid} in the stream")[0]
    assert "continuous-batching" in row.text and r.headers["x-cacheroute-instance"] in row.text
    assert r.headers["x-cacheroute-injection"] in row.text
    row.click()
    wait_until(lambda: f'"id": {rid}' in by_id(browser, "decision-detail").text, timeout=10,
               what="the decision's whole record")
    screenshot(browser, "decisions")

    # Playground: a curl line, streamed through the service plane, with its decision
    show(browser, "playground")
    box = by_id(browser, "pg-input")
    box.clear()
    box.send_keys(f"curl -s {d.url}/v1/chat/completions -H 'content-type: application/json' "
                  f"-d '{{\"model\":\"{MODEL}\",\"max_tokens\":24,\"messages\":[{{\"role\":\"user\","
                  f"\"content\":\"What is prefix caching?\"}}]}}'")
    browser.execute_script("document.getElementById('pg-mode').value = 'auto'")
    by_id(browser, "pg-send").click()
    wait_until(lambda: "done" in by_id(browser, "pg-status").text, timeout=30, what="the playground's answer")
    assert by_id(browser, "pg-status").text.startswith("HTTP 200"), by_id(browser, "pg-status").text
    assert not by_id(browser, "pg-error").is_displayed(), by_id(browser, "pg-error").text
    answer = by_id(browser, "pg-answer").text
    assert len(answer.split()) >= 5, answer  # the sim's words, assembled from the SSE chunks
    timings = wait_until(lambda: "TTFT (gateway)" in by_id(browser, "pg-timings").text and by_id(browser, "pg-timings").text,
                         timeout=10, what="the playground's decision")
    assert "prefix-caching" in timings  # RAG on: retrieval found the block
    rec = json.loads(by_id(browser, "pg-decision").text)
    assert rec["scheduling"]["knowledge"]["kind"] == "retrieved"
    assert rec["injection"]["client_preference"] == "auto"
    screenshot(browser, "playground")

    errors = console_errors(browser)
    assert not errors, errors


# --------------------------------------------------------------------------
# the token


def test_ui_needs_the_control_token(gateway, sim):
    s = sim()
    token = "ui-secret-token"
    g = gateway(config={"gateway": {"control_token": token},
                        "pools": [{"name": "p", "models": [MODEL], "instances": [{"url": s.url}]}]}, token=token)
    with client(follow_redirects=False) as c:
        for path in ("/ui", "/ui/app.js", "/ui/api/state", "/ui/api/decisions"):
            r = c.get(g.control + path)
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get(g.control + "/ui", params={"token": "wrong"}).status_code == 401
        assert c.get(g.control + "/ui", headers={"cookie": "cacheroute_ui=wrong"}).status_code == 401
        assert c.post(g.control + "/ui/api/send", json={"body": {}}).status_code == 401
        # an anonymous caller gets the small body limit, not the relay's 1 MiB
        r = c.post(g.control + "/ui/api/send", content=b"{" + b" " * (200 << 10))
        assert r.status_code == 413, r.status_code

        r = c.get(g.control + "/ui", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "/ui/app.js" in r.text
        # a browser's way in: the token once in the URL, then a cookie
        r = c.get(g.control + "/ui", params={"token": token})
        assert r.status_code == 303 and r.headers["location"] == "/ui"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
        jar = {"cookie": cookie.split(";")[0]}
        r = c.get(g.control + "/ui/api/state", headers=jar)
        assert r.status_code == 200 and r.json()["pools"][0]["instances"][0]["url"].rstrip("/") == s.url
        # the cookie opens /ui only, not the rest of the control plane
        assert c.get(g.control + "/debug/status", headers=jar).status_code == 401

        # the playground relays to the service plane only, with bounded, checked input
        r = c.post(g.control + "/ui/api/send", headers=jar, json={"path": "/admin/reload", "body": {}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_path"
        r = c.post(g.control + "/ui/api/send", headers=jar, content=b"{" + b" " * (2 << 20))
        assert r.status_code == 413
        r = c.post(g.control + "/ui/api/send", headers=jar, json={
            "body": {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        assert r.headers["x-cacheroute-instance"].rstrip("/") == s.url


# --------------------------------------------------------------------------
# Grafana


PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "by", "without", "rate", "irate", "increase", "histogram_quantile",
    "clamp_min", "clamp_max", "topk", "bottomk", "on", "ignoring", "group_left", "group_right", "and", "or",
    "unless", "offset", "abs", "vector", "scalar", "time", "label_replace", "delta", "deriv", "sum_over_time",
    "avg_over_time", "max_over_time", "min_over_time", "bool",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)       # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                      # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                     # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)                     # dashboard variables
    names = set()
    for tok in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if tok in PROMQL_WORDS or re.fullmatch(r"\d+\w*", tok):
            continue
        names.add(tok)
    return names


def test_promql_metric_names_are_parsed():
    expr = ('histogram_quantile(0.95, sum by (le, mode) (rate(cacheroute_ttft_by_mode_seconds_bucket'
            '{job="gw",mode=~"kv|text"}[1m]))) / on (mode) clamp_min(sum(cacheroute_x_total), 1)')
    assert metric_names(expr) == {"cacheroute_ttft_by_mode_seconds_bucket", "cacheroute_x_total"}


def exposed(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def dashboard_exprs() -> list[str]:
    dash = json.loads(GRAFANA.read_text())
    assert dash["title"] and dash["panels"] and dash.get("uid")
    exprs = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t.get("expr"), (p["title"], t)
            exprs.append(t["expr"])
    return exprs


def test_grafana_dashboard_queries_only_metrics_that_exist(procs, cr_bin):
    exprs = dashboard_exprs()
    wanted = set().union(*(metric_names(e) for e in exprs))
    assert all(n.startswith("cacheroute_") for n in wanted), sorted(wanted)
    # the scrape config names the demo's ports
    prom = PROMETHEUS.read_text()
    for port in ("7002", "9101", "9001"):
        assert f"127.0.0.1:{port}" in prom

    d = start_demo(procs, cr_bin, time_scale=1)
    agent = start_agent(procs, cr_bin, d, d.sims[1])

    # Traffic that exercises every panel: RAG requests in both modes, then a queue
    # and 429s (one slot and one queue place per instance, set by a config reload).
    rag(d.url, "What is paged attention?", injection="kv")
    rag(d.url, "How does speculative decoding work?", injection="text")
    cfg = d.config_path()
    cfg.write_text(cfg.read_text().replace("[upstream]\n", "[upstream]\nmax_inflight = 1\nqueue_size = 1\n", 1))
    with client() as c:
        r = c.post(d.control + "/admin/reload")
    assert r.status_code == 200 and r.json()["ok"], r.text

    def burst() -> bool:
        def one():
            try:
                with client(timeout=60) as c:
                    c.post(d.url + "/v1/chat/completions", json={
                        "model": MODEL, "max_tokens": 300, "messages": [{"role": "user", "content": "hi"}]})
            except httpx.HTTPError:
                pass
        ts = [threading.Thread(target=one) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        text = client().get(d.control + "/metrics").text
        return "cacheroute_admission_rejected_total{" in text and "cacheroute_queue_length{" in text

    wait_until(burst, timeout=120, interval=0.1, what="a queue and a 429 on the demo")

    with client() as c:
        have = (exposed(c.get(d.control + "/metrics").text) | exposed(c.get(d.kdn + "/metrics").text)
                | exposed(c.get(agent + "/metrics").text))
    missing = sorted(wanted - have)
    assert not missing, f"the dashboard queries metrics nobody exposes: {missing}"
