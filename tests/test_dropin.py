"""Drop-in: through the gateway a client sees what vLLM would answer. vLLM's
other routes pass through (routed by model, counted in metrics), /v1/models
carries the engines' cards, the gateway's own errors say which field is wrong
and what was expected, the engine's errors arrive untouched; and the sim
answers /tokenize, /detokenize, logprobs, echo and continuous usage as vLLM."""

from __future__ import annotations

import json

import pytest

from crtest import MODEL, assert_openai_error, chat_body, client, completion_body, norm_url, pool, sample_sum, scrape, sse_events


@pytest.fixture
def fleet(sim, gateway):
    a, b = sim(model="llama3-a"), sim(model="llama3-b", extra=["--lmcache-model", "meta-llama/Meta-Llama-3-8B-Instruct",
                                                           "--max-model-len", "8192"])
    g = gateway(config={"pools": [pool("pa", [a.url], models=["llama3-a"]),
                                  pool("pb", [b.url], models=["llama3-b"])]})
    return a, b, g


@pytest.mark.parametrize("path,body", [
    ("/v1/embeddings", {"input": "hello"}),
    ("/tokenize", {"prompt": "hello"}),
    ("/detokenize", {"tokens": [128000, 9906]}),
])
def test_pass_through_routes_go_to_the_models_instance(fleet, path, body):
    a, b, g = fleet
    with client() as c:
        for model, inst in (("llama3-a", a), ("llama3-b", b), ("llama3-a", a)):
            r = c.post(g.url + path, json={"model": model, **body})
            assert r.status_code == 200, r.text
            assert norm_url(r.headers.get("x-cacheroute-instance")) == inst.url
        r = c.post(g.url + path, json={"model": "no-such", **body})
        assert assert_openai_error(r, 404)["code"] == "model_not_found"
        r = c.get(g.url + path)
        assert_openai_error(r, 405)
        assert r.headers.get("allow") == "POST"
    label = path.strip("/").split("/")[-1]
    fams = scrape(g.control + "/metrics")
    assert sample_sum(fams, "cacheroute_requests_total",
                      lambda l: l.get("route") == label and l.get("status") == "200") == 3


def test_model_less_get_goes_to_any_healthy_instance(fleet):
    a, b, g = fleet
    with client() as c:
        r = c.get(g.url + "/version")
        assert r.status_code == 200, r.text
        assert r.json()["version"]
        assert norm_url(r.headers.get("x-cacheroute-instance")) in (a.url, b.url)
        a.kill()
        g.wait_healthy([a.url], healthy=False)
        for _ in range(3):
            r = c.get(g.url + "/version")
            assert r.status_code == 200, r.text
            assert norm_url(r.headers.get("x-cacheroute-instance")) == b.url


def test_models_carry_the_engines_cards(fleet):
    _, b, g = fleet
    with client() as c:
        listed = c.get(g.url + "/v1/models").json()["data"]
        direct = c.get(b.url + "/v1/models").json()["data"][0]
        one = c.get(g.url + "/v1/models/llama3-b")
        missing = c.get(g.url + "/v1/models/no-such")
    cards = {m["id"]: m for m in listed}
    assert sorted(cards) == ["llama3-a", "llama3-b"]
    card = cards["llama3-b"]
    assert card == direct, "the engine's card, untouched"
    assert card["owned_by"] == "vllm" and card["created"] > 0
    assert card["root"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert card["max_model_len"] == 8192 and card["parent"] is None
    assert card["permission"][0]["object"] == "model_permission"
    assert one.status_code == 200 and one.json() == card
    assert assert_openai_error(missing, 404)["code"] == "model_not_found"


@pytest.mark.parametrize("route,body,message,param", [
    ("/v1/chat/completions", chat_body(max_tokens=-1), "max_tokens: expected a non-negative integer, got -1",
     "max_tokens"),
    ("/v1/completions", completion_body(temperature="hot"), 'temperature: expected a number, got "hot"',
     "temperature"),
    ("/v1/chat/completions", chat_body(stream=True, stream_options={"include_usage": 1}),
     "stream_options.include_usage: expected a boolean (true or false), got 1", "stream_options"),
    ("/v1/embeddings", {"model": 5, "input": "x"}, "model: expected a string, got 5", "model"),
])
def test_gateway_errors_say_the_field_and_what_was_expected(fleet, route, body, message, param):
    _, _, g = fleet
    with client() as c:
        r = c.post(g.url + route, json={**body, "model": body["model"] if body["model"] == 5 else "llama3-a"})
    err = assert_openai_error(r, 400)
    assert err["message"] == message
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_engine_errors_pass_through_untouched(fleet):
    a, _, g = fleet
    body = {"model": "llama3-a", "prompt": "x", "logprobs": 99}
    with client() as c:
        direct = c.post(a.url + "/v1/completions", json=body)
        through = c.post(g.url + "/v1/completions", json=body)
        tok_direct = c.post(a.url + "/tokenize", json={"model": "llama3-a"})
        tok_through = c.post(g.url + "/tokenize", json={"model": "llama3-a"})
    assert direct.status_code == through.status_code == 400
    assert through.json() == direct.json()
    assert tok_through.status_code == tok_direct.status_code == 400
    assert tok_through.json() == tok_direct.json()


def test_sim_tokenize_and_detokenize_as_vllm(sim):
    s = sim()
    with client() as c:
        t = c.post(s.url + "/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True}).json()
        assert t == {"count": 3, "max_model_len": 131072, "tokens": [128000, 9906, 1917],
                     "token_strs": ["<|begin_of_text|>", "Hello", "Ġworld"]}
        chat = c.post(s.url + "/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": " Hi "}]}).json()
        usage = c.post(s.url + "/v1/chat/completions",
                       json=chat_body(" Hi ", max_tokens=1)).json()["usage"]
        assert chat["count"] == usage["prompt_tokens"] == len(chat["tokens"])
        assert chat["token_strs"] is None
        no_gen = c.post(s.url + "/tokenize", json={"model": MODEL, "add_generation_prompt": False,
                                                   "messages": [{"role": "user", "content": "Hi"}]}).json()
        assert no_gen["count"] == chat["count"] - 4, "the assistant header is 4 tokens"
        d = c.post(s.url + "/detokenize", json={"model": MODEL, "tokens": t["tokens"]}).json()
        assert d == {"prompt": "<|begin_of_text|>Hello world"}
        assert_openai_error(c.post(s.url + "/detokenize", json={"model": MODEL, "tokens": [-1]}), 400)
        assert_openai_error(c.post(s.url + "/tokenize", json={"model": "other", "prompt": "x"}), 404)


def test_sim_logprobs_echo_and_continuous_usage(sim):
    s = sim()
    with client() as c:
        r = c.post(s.url + "/v1/chat/completions", json=chat_body(max_tokens=3, logprobs=True, top_logprobs=2)).json()
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == 3
        assert "".join(e["token"] for e in content) == r["choices"][0]["message"]["content"]
        for e in content:
            assert e["logprob"] < 0 and len(e["top_logprobs"]) == 2
            assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
        plain = c.post(s.url + "/v1/chat/completions", json=chat_body(max_tokens=3)).json()
        assert plain["choices"][0]["logprobs"] is None
        assert_openai_error(c.post(s.url + "/v1/chat/completions", json=chat_body(top_logprobs=2)), 400)

        r = c.post(s.url + "/v1/completions",
                   json=completion_body("Once upon", max_tokens=4, echo=True, logprobs=1)).json()
        ch = r["choices"][0]
        assert ch["text"].startswith("Once upon") and len(ch["text"]) > len("Once upon")
        lp = ch["logprobs"]
        # vLLM: the prompt's tokens (BOS first, nothing predicts it) and then the 4 generated
        prompt_n = r["usage"]["prompt_tokens"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == prompt_n + 4
        assert lp["tokens"][0] == "<|begin_of_text|>" and lp["token_logprobs"][0] is None
        assert "".join(lp["tokens"]) == "<|begin_of_text|>" + ch["text"]
        assert ch["prompt_logprobs"][0] is None and len(ch["prompt_logprobs"]) == prompt_n

        body = chat_body(max_tokens=4, stream=True,
                         stream_options={"include_usage": True, "continuous_usage_stats": True})
        events = [json.loads(e) for e in sse_events(c.post(s.url + "/v1/chat/completions", json=body).content)
                  if e != "[DONE]"]
        token_events = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
        assert [e["usage"]["completion_tokens"] for e in token_events] == [1, 2, 3, 4]
        assert all("usage" in e for e in events), "usage on every chunk"
        assert events[-1]["usage"]["completion_tokens"] == 4 and events[-1]["choices"] == []
        # Without continuous_usage_stats: usage only in the last chunk.
        body["stream_options"] = {"include_usage": True}
        events = [json.loads(e) for e in sse_events(c.post(s.url + "/v1/chat/completions", json=body).content)
                  if e != "[DONE]"]
        assert [("usage" in e) for e in events] == [False] * (len(events) - 1) + [True]
