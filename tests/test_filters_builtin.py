"""The filters users expect, in the request chain, over real processes and the
real `openai` client: API keys (401 `invalid_api_key`, tenants in the decision log
and metrics, a keys file reloaded with the config), per-tenant rate limits (429
`rate_limit_exceeded` with Retry-After) and model aliases; and the chain as part
of the hot-reloaded config (a bad filter name keeps the old config)."""

from __future__ import annotations

import openai
import pytest

from crtest import MODEL, assert_openai_error, chat_body, client, pool, sample_sum, scrape

CHAIN = ["hop_limit", "api_keys", "rate_limit", "model_alias", "extensions", "retrieval",
         "scheduling", "layout", "injection", "admission", "learning", "decision_record"]


def cfg_for(url: str, keys_file: str, **extra) -> dict:
    cfg = {
        "gateway": {"watch_config": False, "filters": CHAIN},
        "api_keys": {"keys": {"sk-a": "team-a"}, "file": keys_file},
        "rate_limit": {"tenants": {"team-limited": {"requests_per_minute": 2}}},
        "model_aliases": {"gpt-4o": MODEL},
        "pools": [pool("main", [url])],
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def stack(sim, gateway, tmp_path):
    s = sim()
    keys = tmp_path / "keys.toml"
    keys.write_text('"sk-b" = "team-b"\n"sk-limited" = "team-limited"\n')
    g = gateway(config=cfg_for(s.url, str(keys)))
    return s, g, keys


def oa(g, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.v1, api_key=key, max_retries=0, timeout=30)


def ask(c: openai.OpenAI, model: str = MODEL):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def test_api_keys_name_tenants_and_refuse_others(stack):
    _, g, keys = stack
    with pytest.raises(openai.AuthenticationError) as e:
        ask(oa(g, "sk-wrong"))
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"
    with client() as c:
        r = c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=1))
    assert_openai_error(r, 401)
    assert ask(oa(g, "sk-a")).choices[0].message.content
    assert ask(oa(g, "sk-b")).choices[0].message.content  # from the keys file
    fams = scrape(g.control + "/metrics", g.ctl_headers())
    assert sample_sum(fams, "cacheroute_tenant_requests_total",
                      lambda l: l.get("tenant") == "team-a" and l.get("status") == "200") == 1
    assert sample_sum(fams, "cacheroute_tenant_requests_total",
                      lambda l: l.get("tenant") == "team-b" and l.get("status") == "200") == 1
    with client() as c:
        strategy = c.get(g.control + "/debug/strategy", headers=g.ctl_headers()).json()
    assert {"team-a", "team-b"} <= {d.get("tenant") for d in strategy["data"]}

    # The keys file is read again with the config.
    with pytest.raises(openai.AuthenticationError):
        ask(oa(g, "sk-new"))
    keys.write_text('"sk-new" = "team-new"\n')
    r = g.reload()
    assert r.status_code == 200, r.text
    assert ask(oa(g, "sk-new")).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        ask(oa(g, "sk-b"))


def test_rate_limit_per_tenant(stack):
    _, g, _ = stack
    limited = oa(g, "sk-limited")
    ask(limited)
    ask(limited)
    with pytest.raises(openai.RateLimitError) as e:
        ask(limited)
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1
    # Other tenants are not limited by it.
    for _ in range(3):
        ask(oa(g, "sk-a"))


def test_model_alias_reaches_the_served_model(stack):
    _, g, _ = stack
    r = ask(oa(g, "sk-a"), model="gpt-4o")
    assert r.choices[0].message.content
    assert r.model == MODEL
    with pytest.raises(openai.NotFoundError):
        ask(oa(g, "sk-a"), model="no-such-model")


def test_a_bad_filter_name_keeps_the_old_chain(stack):
    s, g, keys = stack
    v = g.status()["config_version"]
    assert g.status()["filters"] == CHAIN
    bad = cfg_for(s.url, str(keys))
    bad["gateway"] = {"watch_config": False, "filters": ["hop_limit", "no_such_filter"]}
    g.write_config(bad)
    r = g.reload()
    assert r.status_code == 400
    assert "unknown filter `no_such_filter`" in r.json()["error"]
    assert g.status()["config_version"] == v
    with pytest.raises(openai.AuthenticationError):
        ask(oa(g, "sk-wrong"))
    # A chain without api_keys: keys are no longer asked for.
    plain = cfg_for(s.url, str(keys))
    plain["gateway"] = {"watch_config": False}
    g.write_config(plain)
    assert g.reload().status_code == 200
    assert "api_keys" not in g.status()["filters"]
    assert ask(oa(g, "sk-wrong")).choices[0].message.content
