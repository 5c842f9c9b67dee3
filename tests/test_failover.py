"""Instances that die: requests go to the survivors; with none left, 503
promptly; an instance that comes back is used again."""

from __future__ import annotations

from collections import Counter

from crtest import (
    PROMPT_TIMEOUT,
    assert_openai_error,
    chat_body,
    client,
    completion_body,
    is_upstream,
    norm_url,
    pool,
    sample_sum,
    scrape,
    wait_until,
)


def two_sim_gateway(sim, gateway, policy="round_robin"):
    a, b = sim(), sim()
    g = gateway(config={"upstream": {"policy": policy, "max_retries": 2},
                        "pools": [pool("p", [a.url, b.url])]})
    return a, b, g


def test_both_instances_serve_while_up(sim, gateway):
    a, b, g = two_sim_gateway(sim, gateway)
    with client() as c:
        seen = Counter(norm_url(c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=2))
                                .headers.get("x-cacheroute-instance")) for _ in range(10))
    assert set(seen) == {a.url, b.url}


def test_killed_instance_before_send(sim, gateway):
    """Kill one instance and send at once (before any health check could
    notice): every request succeeds on the other one."""
    for policy in ("round_robin", "least_inflight"):
        a, b, g = two_sim_gateway(sim, gateway, policy)
        a.kill()
        with client(timeout=PROMPT_TIMEOUT) as c:
            for i in range(20):
                path, body = (("/v1/chat/completions", chat_body(max_tokens=2)) if i % 2 == 0
                              else ("/v1/completions", completion_body(max_tokens=2)))
                r = c.post(g.url + path, json=body)
                assert r.status_code == 200, f"{policy} request {i}: {r.status_code} {r.text[:300]}"
                assert norm_url(r.headers.get("x-cacheroute-instance")) == b.url
        # health checks then mark it down, in /debug/status and /metrics
        g.wait_healthy([a.url], healthy=False)
        g.wait_healthy([b.url], healthy=True)

        def gauges():
            fams = scrape(g.control + "/metrics")
            return (sample_sum(fams, "cacheroute_upstream_healthy", lambda l: is_upstream(l, a.url)),
                    sample_sum(fams, "cacheroute_upstream_healthy", lambda l: is_upstream(l, b.url)))

        wait_until(lambda: gauges() == (0, 1), timeout=10, what="cacheroute_upstream_healthy 0 for the dead, 1 for the live")
        g.proc.stop()


def test_all_instances_down_503_promptly(sim, gateway):
    a, b, g = two_sim_gateway(sim, gateway)
    a.kill()
    b.kill()
    with client(timeout=PROMPT_TIMEOUT) as c:
        # at once: whether or not health checks have noticed yet, an error
        # JSON comes back within the client timeout
        assert_openai_error(c.post(g.url + "/v1/chat/completions", json=chat_body()), 503)
        # once health checks have marked both down: 503, for every route
        g.wait_healthy([a.url, b.url], healthy=False)
        assert_openai_error(c.post(g.url + "/v1/chat/completions", json=chat_body()), 503)
        assert_openai_error(c.post(g.url + "/v1/chat/completions", json=chat_body(stream=True)), 503)
        assert_openai_error(c.post(g.url + "/v1/completions", json=completion_body()), 503)
        assert c.get(g.url + "/health").status_code == 200


def test_instance_comes_back(sim, gateway):
    a, b, g = two_sim_gateway(sim, gateway)
    a.kill()
    g.wait_healthy([a.url], healthy=False)
    a2 = sim(port=a.port)  # same address again
    g.wait_healthy([a2.url], healthy=True)
    with client() as c:
        seen = Counter(norm_url(c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=2))
                                .headers.get("x-cacheroute-instance")) for _ in range(10))
    assert seen[a2.url] > 0 and seen[b.url] > 0


def test_restarted_instance_stale_connections(sim, gateway):
    """An instance restarted on the same address leaves the gateway's
    kept-alive connections to it closed. The next requests must still succeed
    on that instance (retried on a fresh connection), without the instance
    being taken out of rotation: it is the only one."""
    a = sim()
    g = gateway(config={"upstream": {"health_check_interval_ms": 60000, "max_retries": 0},
                        "pools": [pool("p", [a.url])]})
    with client(timeout=PROMPT_TIMEOUT) as c:
        # several concurrent-ish requests leave kept-alive connections behind
        for _ in range(5):
            assert c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200
    a.kill()
    a2 = sim(port=a.port)
    with client(timeout=PROMPT_TIMEOUT) as c:
        for i in range(5):
            r = c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=2))
            assert r.status_code == 200, f"request {i} after the restart: {r.status_code} {r.text[:300]}"
            assert norm_url(r.headers.get("x-cacheroute-instance")) == a2.url
