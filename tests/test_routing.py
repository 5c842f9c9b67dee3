"""Instance choice: weighted round robin, least in-flight, and the
in-flight count that drives it."""

from __future__ import annotations

from collections import Counter

from crtest import chat_body, client, first_data_line, is_upstream, norm_url, pool, sample_sum, scrape, wait_until


def instance_of(r) -> str:
    assert r.status_code == 200, r.text[:300]
    return norm_url(r.headers.get("x-cacheroute-instance"))


def test_weighted_round_robin(sim, gateway):
    a, b = sim(), sim()
    g = gateway(config={"upstream": {"policy": "round_robin"},
                        "pools": [pool("p", [a.url, b.url], weights=[3, 1])]})
    with client() as c:
        seen = Counter(instance_of(c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=1)))
                       for _ in range(40))
    # 40 sequential requests = 10 whole cycles of weight 3+1
    assert seen == Counter({a.url: 30, b.url: 10})


def test_least_inflight_avoids_busy_instance(sim, gateway):
    """One long streamed request holds instance X; while it is in flight,
    least_inflight sends every short request to the other instance (round
    robin would alternate). When the long one is dropped by the client, the
    in-flight count of X returns to 0."""
    a, b = sim(time_scale=1.0), sim(time_scale=1.0)
    g = gateway(config={"upstream": {"policy": "least_inflight"}, "pools": [pool("p", [a.url, b.url])]})
    with client(timeout=60) as c:
        with c.stream("POST", g.url + "/v1/chat/completions",
                      json=chat_body("long", max_tokens=3000, stream=True)) as long:
            busy = instance_of(long)
            long_lines = long.iter_lines()
            first_data_line(long_lines)  # it is generating
            other = b.url if busy == a.url else a.url
            inst = g.instances()
            assert inst[busy]["inflight"] == 1
            assert inst[other]["inflight"] == 0
            fams = scrape(g.control + "/metrics")
            assert sample_sum(fams, "cacheroute_upstream_inflight", lambda l: is_upstream(l, busy)) == 1
            assert sample_sum(fams, "cacheroute_upstream_inflight", lambda l: is_upstream(l, other)) == 0
            short = [instance_of(c.post(g.url + "/v1/chat/completions", json=chat_body(max_tokens=1)))
                     for _ in range(6)]
            assert short == [other] * 6
        # the client hung up on the long stream: its slot is released
        wait_until(lambda: all(i["inflight"] == 0 for i in g.instances().values()),
                   timeout=15, what="in-flight back to 0 after the client dropped the stream")


def test_least_inflight_uses_weights(sim, gateway):
    """least_inflight compares in-flight per unit of weight. Weights 4 and 1,
    four long requests held open one after the other: whichever instance
    takes the first (a tie at 0), the other three placements follow from
    n/4 vs m/1, and end at exactly 3 on the heavy and 1 on the light one
    (plain fewest-in-flight would end at 2 and 2)."""
    heavy, light = sim(time_scale=1.0), sim(time_scale=1.0)
    g = gateway(config={"upstream": {"policy": "least_inflight"},
                        "pools": [pool("p", [heavy.url, light.url], weights=[4, 1])]})
    streams = []
    with client(timeout=60) as c:
        try:
            placed = []
            for _ in range(4):
                cm = c.stream("POST", g.url + "/v1/chat/completions",
                              json=chat_body("hold", max_tokens=3000, stream=True))
                r = cm.__enter__()
                lines = r.iter_lines()
                streams.append((cm, lines))
                placed.append(instance_of(r))
                first_data_line(lines)  # in flight now
            assert Counter(placed) == Counter({heavy.url: 3, light.url: 1}), placed
            inst = g.instances()
            assert inst[heavy.url]["inflight"] == 3
            assert inst[light.url]["inflight"] == 1
        finally:
            for cm, _ in streams:
                cm.__exit__(None, None, None)
