"""Ready-release policies, injection strategies and instance policies that
read knowledge, end to end against a real KDN and sims with Redis stores:
`ordered`, `wait` and `text_bypass` with a KV request stuck on a slow link;
`iws`; `least_loaded` with an agent's counts; the RAG branch of
`prefix_affinity`; one injection shared by concurrent requests; the prefix
check (another template, another token count); per-model templates."""

from __future__ import annotations

import json
import threading

import pytest

from crtest import MODEL, client, free_port, sample_sum, scrape, wait_until
from kfleet import QUESTIONS, ask, decision, dump, knowledge_status
from test_proxy import cached, pfleet  # noqa: F401  (pfleet is a fixture)


class Bg:
    """A request sent from a thread; .response once it is back."""

    def __init__(self, fn):
        self.response = None
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.response = fn()
        except Exception as e:  # reported by join()
            self.error = e

    def join(self, timeout: float = 120):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request did not come back"
        assert self.error is None, repr(self.error)
        return self.response


def inst_status(gw) -> dict:
    [i] = [i for p in gw.status()["pools"] for i in p["instances"]]
    return i


def last_content(sim) -> str:
    """The text of the last request the sim received (its messages, joined)."""
    body = sim.last_request()["body"]
    body = body if isinstance(body, dict) else json.loads(body)
    return json.dumps(body.get("messages") or body.get("prompt"))


def release(fam, policy: str, outcome: str) -> float:
    return sample_sum(fam, "cacheroute_ready_release_total", lambda l: l == {"policy": policy, "outcome": outcome})


# --------------------------------------------------------------------------
# ready-release: a KV request whose KV crawls over a 1 Mb/s link, then a text one


STUCK = {"injection": "kv", "kv_deadline_ms": 4000}


@pytest.mark.parametrize("policy", ["text_bypass", "wait"])
def test_text_request_passes_a_kv_request_waiting_for_its_kv(pfleet, policy):
    f = pfleet(link_gbps=0.001, proxy=dict(STUCK, release=policy), pool={"max_inflight": 1},
               blocks=("basalt", "tidal"))
    kv = Bg(lambda: ask(f.gw, "basalt"))
    wait_until(lambda: inst_status(f.gw)["kv_waiting"] == 1, timeout=10, what="the KV request waiting outside the queue")
    assert inst_status(f.gw)["inflight"] == 0, "it holds no slot while it waits"
    r = ask(f.gw, "tidal", injection="text")
    assert r.status_code == 200 and r.headers["x-cacheroute-injection"] == "text", r.text
    assert "Tidal" in last_content(f.sims[0]) or "tidal" in last_content(f.sims[0])
    k = kv.join()
    # the KV request reached the engine after the text one, as text once its deadline passed
    assert k.status_code == 200 and k.headers["x-cacheroute-injection"] == "text"
    assert decision(f.gw, k)["injection"]["reason"] == "kv_deadline"
    assert "basalt" in last_content(f.sims[0])
    fam = scrape(f.gw.control + "/metrics")
    assert release(fam, policy, "deadline_text") == 1
    assert release(fam, policy, "bypassed_by_text") == (1 if policy == "text_bypass" else 0)


def test_ordered_kv_request_holds_its_slot_and_the_text_request_waits(pfleet):
    f = pfleet(link_gbps=0.001, proxy=dict(STUCK, release="ordered"),
               pool={"max_inflight": 1, "queue_timeout_ms": 60000}, blocks=("basalt", "tidal"))
    kv = Bg(lambda: ask(f.gw, "basalt"))
    # the gateway takes the slot as it asks the KDN for the injection (in the background)
    wait_until(lambda: sample_sum(scrape(f.kdn.url + "/metrics"), "cacheroute_kdn_injection_active") >= 1,
               timeout=10, what="the KDN copying the KV")
    assert inst_status(f.gw)["kv_waiting"] == 0, "ordered waits inside its slot, not outside the queue"
    text = Bg(lambda: ask(f.gw, "tidal", injection="text"))
    wait_until(lambda: inst_status(f.gw)["queued"] == 1, timeout=10, what="the text request queued behind it")
    k, t = kv.join(), text.join()
    assert k.status_code == 200 and t.status_code == 200
    assert k.headers["x-cacheroute-injection"] == "text" and decision(f.gw, k)["injection"]["reason"] == "kv_deadline"
    # order kept: the text request reached the engine last
    assert "idal" in last_content(f.sims[0]) and "basalt" not in last_content(f.sims[0])
    fam = scrape(f.gw.control + "/metrics")
    assert release(fam, "ordered", "deadline_text") == 1
    assert release(fam, "ordered", "bypassed_by_text") == 0
    assert sample_sum(fam, "cacheroute_queue_wait_seconds_count", lambda l: l == {"pool": "pool-a"}) == 1


# --------------------------------------------------------------------------
# strategies and instance policies


def test_iws_decides_and_overrides_the_client(pfleet):
    f = pfleet(link_gbps=2.0, proxy={"injection": "iws"})
    r = ask(f.gw, "basalt", injection="kv")
    assert r.status_code == 200, r.text
    d = decision(f.gw, r)["injection"]
    assert d["strategy"] == "iws", dump(d)
    # a 2 Gb/s link for 320 MiB of KV against an idle instance: text, whatever the client said
    assert d["mode"] == "text" == r.headers["x-cacheroute-injection"], dump(d)
    assert d["predicted_kv_ms"] > d["predicted_text_ms"], dump(d)
    # the original's rule: KV's score (its total plus the 100 ms margin) loses to text's
    assert d["client_overridden"] is True
    assert d["iws"]["kv_score"] > d["iws"]["text_total"] and d["iws"]["kv_queue_wait"] == 0, dump(d)
    assert d["reason"] in ("text_score_better", "text_despite_active_kv_wait"), dump(d)
    fam = scrape(f.gw.control + "/metrics")
    assert sample_sum(fam, "cacheroute_injection_decisions_total", lambda l: l.get("mode") == "text") == 1


def _agents(procs, cr_bin, f, residency: bool = False) -> None:
    for i, s in enumerate(f.sims):
        port = free_port()
        args = [cr_bin, "agent", "--engine", s.url, "--listen", f"127.0.0.1:{port}", "--gateway", f.gw.control,
                "--heartbeat-s", "0.5", "--scrape-ms", "100"]
        p = procs.start(f"agent-{i}", args)
        p.wait_http(f"http://127.0.0.1:{port}/health")
    wait_until(lambda: all(knowledge_status(f.gw)["agents"].get(s.url, {}).get("up") for s in f.sims),
               timeout=15, what="both agents seen by the gateway")


def test_least_loaded_follows_an_agents_higher_counts(pfleet, procs, cr_bin):
    f = pfleet(sims=2, time_scale=1.0, pool={"policy": "least_loaded"})
    _agents(procs, cr_bin, f)
    busy, idle = f.sims
    # load sims[0] behind the gateway's back: only its agent can tell
    for i in range(3):
        Bg(lambda i=i: client(timeout=120).post(busy.url + "/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 4000, "messages": [{"role": "user", "content": f"busy {i}"}]}))

    def agent_running():
        return knowledge_status(f.gw)["agents"][busy.url]["load"]["running"] >= 3
    wait_until(agent_running, timeout=15, what="the gateway sees the busy sim's agent report 3 running")
    for i in range(6):
        with client(timeout=60) as c:
            r = c.post(f.gw.v1 + "/chat/completions", json={
                "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": f"q{i}"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-cacheroute-instance"] == idle.url, f"request {i} went to the busy instance"


def test_prefix_affinity_sends_rag_requests_where_their_kv_is(pfleet):
    # the residency comes from KDN injections alone (a text prefill does not count)
    f = pfleet(sims=2, pool={"policy": "prefix_affinity"}, proxy={"engine_stores_prefix": False},
               blocks=("basalt", "tidal"))
    assert f.kdn.inject("basalt", "inst-1")["status"] == "done"
    assert f.kdn.inject("tidal", "inst-0")["status"] == "done"
    where = {"basalt": f.sims[1].url, "tidal": f.sims[0].url}

    recs = {b: f.kdn.record(b)["models"][MODEL].get("resident", []) for b in where}
    assert recs == {"basalt": ["inst-1"], "tidal": ["inst-0"]}, recs

    def synced():  # the gateway holds the registry version that has both injections
        with client() as c:
            etag = c.get(f.kdn.url + "/v1/knowledge/snapshot").headers["etag"].strip('"')
        return knowledge_status(f.gw)["versions"].get(f.kdn.id) == etag
    wait_until(synced, timeout=10, what="the gateway synced the registry with both injections")
    for rnd in range(3):
        for bid, url in where.items():
            r = ask(f.gw, bid, question=f"{QUESTIONS[bid]} (round {rnd})")
            assert r.status_code == 200, r.text
            assert r.headers["x-cacheroute-knowledge"] == bid
            assert r.headers["x-cacheroute-instance"] == url, f"{bid} round {rnd}"


def test_one_kv_injection_is_shared_by_concurrent_requests(pfleet):
    f = pfleet(link_gbps=1.0, proxy={"injection": "kv", "kv_deadline_ms": 60000}, kdn_proxy=True)
    n = 4
    go = threading.Event()

    def one(i):
        go.wait()
        return ask(f.gw, "basalt", question=f"{QUESTIONS['basalt']} (asker {i})", timeout=120)
    reqs = [Bg(lambda i=i: one(i)) for i in range(n)]
    go.set()
    rs = [b.join() for b in reqs]
    rec = f.kdn.record("basalt")["models"][MODEL]
    for r in rs:
        assert r.status_code == 200 and r.headers["x-cacheroute-injection"] == "kv", r.text
        assert cached(r) == rec["tokens"]
    assert f.kdn_proxy.count("POST", "/v1/inject") == 1, f.kdn_proxy.seen
    fam = scrape(f.kdn.url + "/metrics")
    assert sample_sum(fam, "cacheroute_kdn_injection_jobs_total") == 1
    f.kdn_proxy.close()


# --------------------------------------------------------------------------
# the prefix check and per-model templates

WORDS_TOKENIZER = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
    "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
    "model": {"type": "WordLevel", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"},
}


@pytest.mark.parametrize("how", ["template", "token_count"])
def test_prefix_mismatch_goes_as_text_and_is_counted(pfleet, tmp_path, how):
    proxy = {"injection": "kv"}
    if how == "template":
        proxy["templates"] = {MODEL: "chatml"}  # the KDN registered it for llama3
    else:
        # a word-level tokenizer: the rendered prefix counts words, not the registered tokens
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(WORDS_TOKENIZER))
        proxy["tokenizer"] = str(path)
    f = pfleet(link_gbps=100.0, proxy=proxy)
    for i in range(2):
        r = ask(f.gw, "basalt", question=f"{QUESTIONS['basalt']} ({i})")
        assert r.status_code == 200, r.text
        assert r.headers["x-cacheroute-injection"] == "text"
        assert decision(f.gw, r)["injection"]["reason"] == "prefix_mismatch"
    fam = scrape(f.gw.control + "/metrics")
    assert sample_sum(fam, "cacheroute_prefix_mismatch_total") == 2
    assert sample_sum(fam, "cacheroute_kv_injections_total") == 0, "no KDN was asked"
    assert sample_sum(fam, "cacheroute_injection_decisions_total",
                      lambda l: l == {"mode": "text", "reason": "prefix_mismatch"}) == 2


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_per_model_template_goes_as_kv_and_hits(pfleet, template):
    f = pfleet(link_gbps=100.0, proxy={"injection": "kv", "templates": {MODEL: template}},
               kdn_kw={"template": template})
    rec = f.kdn.record("basalt")["models"][MODEL]
    r = ask(f.gw, "basalt", route="completions")
    assert r.status_code == 200, r.text
    assert r.headers["x-cacheroute-injection"] == "kv", dump(decision(f.gw, r))
    body = f.sims[0].last_request()["body"]
    head = {"chatml": "<|im_start|>system\n", "plain": ""}[template]
    assert body["prompt"].startswith(head + rec["content"]), "the block leads the prompt, in the model's template"
    # the engine finds every chunk the KDN wrote: its tokens of this prompt begin with
    # the KDN's tokens of the block, in either template
    assert cached(r) == rec["tokens"], dump(f.sims[0].last_request().get("kv_handle"))
    fam = scrape(f.sims[0].url + "/metrics")
    assert sample_sum(fam, "sim:kv_handle_checks_total", lambda l: l.get("result") == "ok") == 1
    fam = scrape(f.gw.control + "/metrics")
    assert sample_sum(fam, "cacheroute_prefix_mismatch_total") == 0


def test_hybrid_alternates_kv_and_text(pfleet):
    f = pfleet(link_gbps=100.0, proxy={"injection": "hybrid", "engine_stores_prefix": False})
    modes = []
    for i in range(4):
        r = ask(f.gw, "basalt", question=f"{QUESTIONS['basalt']} ({i})")
        assert r.status_code == 200, r.text
        modes.append(r.headers["x-cacheroute-injection"])
        assert decision(f.gw, r)["injection"]["strategy"] == "hybrid"
    assert modes == ["kv", "text", "kv", "text"], modes
    fam = scrape(f.gw.control + "/metrics")
    for mode in ("kv", "text"):
        assert sample_sum(fam, "cacheroute_injection_decisions_total", lambda l, m=mode: l.get("mode") == m) == 2


def test_rag_always_retrieves_for_plain_requests_and_counts_the_decision(pfleet):
    f = pfleet(link_gbps=100.0, pool={"rag_always": True})
    with client(timeout=30) as c:
        r = c.post(f.gw.v1 + "/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": QUESTIONS["basalt"]}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-cacheroute-knowledge"] == "basalt", "retrieved without \"RAG\": true"
    assert r.headers["x-cacheroute-kdn"] == f.kdn.id
    fam = scrape(f.gw.control + "/metrics")
    assert sample_sum(fam, "cacheroute_scheduling_decisions_total",
                      lambda l: l == {"pool": "pool-a", "knowledge": "retrieved", "kdn": "yes"}) == 1, \
        [s for s in __import__("crtest").samples(fam) if s[0].startswith("cacheroute_scheduling")]
    assert sample_sum(fam, "cacheroute_scheduling_decisions_total") == 1
