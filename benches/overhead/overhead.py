#!/usr/bin/env python3
"""Gateway-overhead benchmark driver (stdlib only). Called by run.sh.

Starts a static nginx upstream and three proxies in front of it (nginx
proxy_pass, vllm-router, cacheroute) on free 127.0.0.1 ports, checks that each
answers a chat completion with HTTP 200 and the fixed body, then runs
`wrk --latency` against each target in interleaved rounds, and writes the
median per target plus the ratios to bench-results/overhead-<ts>.md|json.

Everything it starts runs in its own process group and is killed on exit; the
ids are also kept in WORK/pids so that run.sh's trap can finish the job.
"""

import argparse
import datetime as dt
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from ports import free_port  # noqa: E402
TARGETS = ["direct", "nginx-proxy", "vllm-router", "cacheroute"]
PATH = "/v1/chat/completions"
WRK_SCRIPT = os.path.join(HERE, "post.lua")
# The goals: cacheroute >= 2x vllm-router requests/s and <= 1/2 its
# mean latency; aim for 0.8x nginx proxy_pass requests/s.
GOALS = {
    "cacheroute/vllm-router requests/s": (">=", 2.0),
    "cacheroute/vllm-router mean latency": ("<=", 0.5),
    "cacheroute/nginx-proxy requests/s": (">=", 0.8),
}
MAX_ERROR_FRACTION = 0.01


def log(msg):
    print(f"==> [overhead] {msg}", flush=True)


class Fail(Exception):
    pass


# --------------------------------------------------------------------------
# processes


class Procs:
    """Children started in their own sessions; killed by process group."""

    def __init__(self, work):
        self.work = work
        self.pidfile = os.path.join(work, "pids")
        self.procs = {}  # name -> (Popen, log path)

    def _write_pidfile(self):
        tmp = self.pidfile + ".tmp"
        with open(tmp, "w") as f:
            for p, _ in self.procs.values():
                if p.poll() is None:
                    f.write(f"{p.pid}\n")
        os.replace(tmp, self.pidfile)

    def start(self, name, argv, env=None):
        logpath = os.path.join(self.work, f"{name}.log")
        logf = open(logpath, "wb")
        with open(os.path.join(self.work, f"{name}.cmd"), "w") as f:
            f.write(" ".join(argv) + "\n")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             env=env)
        logf.close()
        self.procs[name] = (p, logpath)
        self._write_pidfile()
        return p

    def alive(self, name):
        return self.procs[name][0].poll() is None

    def log_tail(self, name, n=30):
        try:
            with open(self.procs[name][1], "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop_all(self):
        for name, (p, _) in reversed(list(self.procs.items())):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 5
        for name, (p, _) in self.procs.items():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            # The group may outlive its leader (nginx workers): SIGKILL it.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        try:
            os.remove(self.pidfile)
        except OSError:
            pass


def render(template, out, **subst):
    with open(os.path.join(HERE, template)) as f:
        text = f.read()
    for k, v in subst.items():
        text = text.replace(f"@{k}@", str(v))
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise Fail(f"{template}: unfilled {leftover}")
    with open(out, "w") as f:
        f.write(text)
    return out


# --------------------------------------------------------------------------
# checks


def read_body():
    with open(WRK_SCRIPT) as f:
        m = re.search(r"wrk\.body\s*=\s*'(.*)'", f.read())
    if not m:
        raise Fail(f"no wrk.body in {WRK_SCRIPT}")
    return m.group(1).encode()


def post_completion(port, body, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", PATH, body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def completion_problem(status, data):
    """None when (status, body) is the upstream's fixed chat completion."""
    if status != 200:
        return f"HTTP {status}: {data[:300]!r}"
    try:
        obj = json.loads(data)
        ok = (obj.get("object") == "chat.completion"
              and obj["choices"][0]["message"]["content"] == "ok")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        ok = False
    if not ok:
        return f"HTTP 200 but not the fixed chat completion: {data[:300]!r}"
    return None


def wait_ready(procs, name, port, body, timeout):
    """Poll until the target answers the completion correctly; fail loudly."""
    deadline = time.time() + timeout
    last = "no answer yet"
    while time.time() < deadline:
        if not procs.alive(name):
            raise Fail(f"{name} exited before answering "
                       f"(rc={procs.procs[name][0].returncode}); log tail:\n"
                       f"{procs.log_tail(name)}")
        try:
            status, data = post_completion(port, body, timeout=2.0)
            problem = completion_problem(status, data)
            if problem is None:
                return
            last = problem
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    raise Fail(f"{name} on 127.0.0.1:{port} did not answer {PATH} with the "
               f"completion within {timeout}s; last: {last}\nlog tail:\n"
               f"{procs.log_tail(name)}")


def check_completion(name, port, body, n=5):
    """A few requests in a row, each must be a 200 with the completion."""
    for _ in range(n):
        try:
            status, data = post_completion(port, body)
        except (OSError, http.client.HTTPException) as e:
            raise Fail(f"{name}: {PATH} failed: {type(e).__name__}: {e}")
        problem = completion_problem(status, data)
        if problem:
            raise Fail(f"{name}: {PATH} returned {problem}")


# --------------------------------------------------------------------------
# wrk

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def to_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"time {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out):
    r = {}
    m = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    r["mean_ms"], r["stdev_ms"], r["max_ms"] = (to_ms(x) for x in m.groups())
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s*{pct}%\s+(\S+)", out, re.M)
        r[f"p{pct}_ms"] = to_ms(m.group(1)) if m else None
    m = re.search(r"^\s*(\d+) requests in ([\d.]+\w+)", out, re.M)
    r["requests"] = int(m.group(1))
    r["seconds"] = to_ms(m.group(2)) / 1e3
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    r["wrk_rps"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    r["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                  r"timeout (\d+)", out)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    # requests/s counts only good answers: a proxy answering errors quickly
    # must not look fast.
    good = r["requests"] - r["non_2xx"]
    r["rps"] = good / r["seconds"] if r["seconds"] > 0 else 0.0
    total = r["requests"] + r["socket_errors"]
    r["error_fraction"] = ((r["non_2xx"] + r["socket_errors"]) / total
                           if total else 1.0)
    return r


def run_wrk(params, port, duration):
    argv = ["wrk", "-t", str(params["threads"]), "-c",
            str(params["connections"]), "-d", duration, "--latency",
            "-s", WRK_SCRIPT, f"http://127.0.0.1:{port}{PATH}"]
    secs = to_ms(duration if duration[-1].isalpha() else duration + "s") / 1e3
    p = subprocess.run(argv, capture_output=True, text=True,
                       timeout=secs + 60)
    if p.returncode != 0:
        raise Fail(f"wrk failed (rc={p.returncode}): {p.stderr.strip()}\n"
                   f"{p.stdout}")
    return p.stdout, " ".join(argv)


# --------------------------------------------------------------------------
# reporting


def fmt_ms(x):
    if x is None:
        return "-"
    return f"{x * 1e3:.0f} µs" if x < 1 else f"{x:.2f} ms"


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def uptime_line():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def version_of(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def ratio(a, b):
    return a / b if a is not None and b else None


def markdown(res):
    p = res["params"]
    lines = [
        f"# Gateway overhead — {res['timestamp']}",
        "",
        f"`wrk -t{p['threads']} -c{p['connections']} -d{p['duration']} "
        f"--latency -s post.lua URL{PATH}`, {p['rounds']} interleaved "
        f"round(s) after a {p['warmup']} warm-up per target; median per "
        f"target. requests/s counts 2xx answers only.",
        "",
        f"Host: {res['host']['nproc']} CPUs; load average before "
        f"{res['host']['loadavg_before']}, after "
        f"{res['host']['loadavg_after']} (after includes the benchmark's "
        f"own load).",
    ]
    if res["host"].get("loaded"):
        lines += ["", "**The machine was loaded by other work during this "
                  "run: compare the ratios, not the absolute numbers.**"]
    lines += [
        "",
        "| target | requests/s | mean latency | p50 | p99 | non-2xx | "
        "socket errors | requests/s per round |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in res["targets_order"]:
        t = res["targets"][name]
        m = t["median"]
        rounds = ", ".join(f"{r['rps']:.0f}" for r in t["rounds"])
        mark = " (INVALID: errors)" if t.get("invalid") else ""
        lines.append(
            f"| {name}{mark} | {m['rps']:.0f} | {fmt_ms(m['mean_ms'])} | "
            f"{fmt_ms(m['p50_ms'])} | {fmt_ms(m['p99_ms'])} | "
            f"{t['non_2xx_total']} | {t['socket_errors_total']} | {rounds} |")
    lines += ["", "| ratio | value | goal | met |", "|---|---:|---:|:---:|"]
    for k, v in res["ratios"].items():
        goal = GOALS.get(k)
        if v is None:
            lines.append(f"| {k} | - | - | - |")
            continue
        g = f"{goal[0]} {goal[1]}" if goal else ""
        met = ""
        if goal:
            ok = v >= goal[1] if goal[0] == ">=" else v <= goal[1]
            met = "yes" if ok else "no"
        lines.append(f"| {k} | {v:.2f} | {g} | {met} |")
    if res["warnings"]:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in res["warnings"]]
    lines += ["", "Versions: " + "; ".join(
        f"{k}: {v}" for k, v in res["versions"].items() if v), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, help="scratch folder")
    ap.add_argument("--nginx", default="nginx")
    ap.add_argument("--cacheroute", required=True)
    ap.add_argument("--vllm-router", required=True)
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()

    def env_str(name, default):
        v = os.environ.get(name, "").strip()
        return v or default

    duration = env_str("DURATION", "6s")
    if duration[-1].isdigit():
        duration += "s"
    warmup = env_str("WARMUP", "2s")
    if warmup[-1].isdigit():
        warmup += "s"
    params = {
        "threads": int(env_str("THREADS", "1")),
        "connections": int(env_str("CONNECTIONS", "32")),
        "duration": duration,
        "warmup": warmup,
        "rounds": int(env_str("ROUNDS", "3")),
    }
    only = [t.strip() for t in env_str("TARGETS", ",".join(TARGETS)).split(",")
            if t.strip()]
    unknown = [t for t in only if t not in TARGETS]
    if unknown:
        raise Fail(f"unknown TARGETS {unknown}; known: {TARGETS}")
    order = [t for t in TARGETS if t in only]

    ts = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    nproc = os.cpu_count()
    load_before, uptime_before = loadavg(), uptime_line()
    log(f"uptime before: {uptime_before}")
    body = read_body()
    procs = Procs(args.work)
    ports = {}
    cmds = {}
    try:
        # (a) the static upstream
        up = free_port()
        conf = render("upstream-nginx.conf.in",
                      os.path.join(args.work, "upstream-nginx.conf"),
                      PORT=up, WORK=args.work)
        cmds["direct"] = [args.nginx, "-p", args.work + "/", "-e",
                          os.path.join(args.work, "upstream-nginx.err"),
                          "-c", conf]
        procs.start("direct", cmds["direct"])
        ports["direct"] = up
        wait_ready(procs, "direct", up, body, 20)
        log(f"static upstream (nginx) on 127.0.0.1:{up}")

        # (b) nginx proxy_pass
        if "nginx-proxy" in order:
            port = free_port()
            conf = render("proxy-nginx.conf.in",
                          os.path.join(args.work, "proxy-nginx.conf"),
                          PORT=port, UPSTREAM_PORT=up, WORK=args.work)
            cmds["nginx-proxy"] = [args.nginx, "-p", args.work + "/", "-e",
                                   os.path.join(args.work, "proxy-nginx.err"),
                                   "-c", conf]
            procs.start("nginx-proxy", cmds["nginx-proxy"])
            ports["nginx-proxy"] = port
        # (c) vllm-router (its metrics listener on a free loopback port too)
        if "vllm-router" in order:
            port = free_port()
            cmds["vllm-router"] = [
                args.vllm_router, "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", f"http://127.0.0.1:{up}",
                "--policy", "round_robin",
                "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(free_port())]
            procs.start("vllm-router", cmds["vllm-router"])
            ports["vllm-router"] = port
        # (d) cacheroute, drop-in mode
        if "cacheroute" in order:
            port, control = free_port(), free_port()
            cmds["cacheroute"] = [
                args.cacheroute, "gateway", "--upstream",
                f"http://127.0.0.1:{up}", "--listen", f"127.0.0.1:{port}",
                "--control", f"127.0.0.1:{control}"]
            procs.start("cacheroute", cmds["cacheroute"])
            ports["cacheroute"] = port

        for name in order:
            if name == "direct":
                continue
            wait_ready(procs, name, ports[name], body, 60)
            log(f"{name} on 127.0.0.1:{ports[name]} answers")
        for name in order:
            check_completion(name, ports[name], body)
        log("every target returns HTTP 200 with the chat completion")

        rounds = {name: [] for name in order}
        wrk_cmd = {}
        for rnd in range(params["rounds"]):
            # Interleave, rotating the order each round so that no target
            # always runs first or last.
            k = rnd % len(order)
            for name in order[k:] + order[:k]:
                for n in order:
                    if not procs.alive(n):
                        raise Fail(f"{n} died; log tail:\n{procs.log_tail(n)}")
                run_wrk(params, ports[name], warmup)
                out, wrk_cmd[name] = run_wrk(params, ports[name], duration)
                with open(os.path.join(args.work, f"wrk-{name}-{rnd}.txt"),
                          "w") as f:
                    f.write(out)
                try:
                    r = parse_wrk(out)
                except (AttributeError, ValueError) as e:
                    raise Fail(f"cannot parse wrk output ({e}):\n{out}")
                rounds[name].append(r)
                log(f"round {rnd + 1}/{params['rounds']} {name:12s} "
                    f"{r['rps']:9.0f} req/s  mean {fmt_ms(r['mean_ms']):>9s}  "
                    f"p99 {fmt_ms(r['p99_ms']):>9s}  non-2xx {r['non_2xx']}  "
                    f"socket errors {r['socket_errors']}")
        # Still answering correctly after the load? (Recorded, not fatal, so
        # the figures are kept; the run is marked invalid below.)
        post_problems = []
        for name in order:
            try:
                check_completion(name, ports[name], body, n=1)
            except Fail as e:
                post_problems.append((name, str(e)))
    finally:
        procs.stop_all()

    load_after, uptime_after = loadavg(), uptime_line()
    log(f"uptime after: {uptime_after}")

    warnings = [f"after the measurement, {msg}" for _, msg in post_problems]
    targets = {}
    for name in order:
        rs = rounds[name]
        med = {}
        for key in ("rps", "wrk_rps", "mean_ms", "p50_ms", "p75_ms", "p90_ms",
                    "p99_ms", "max_ms"):
            vals = [r[key] for r in rs if r[key] is not None]
            med[key] = statistics.median(vals) if vals else None
        non2xx = sum(r["non_2xx"] for r in rs)
        sockerr = sum(r["socket_errors"] for r in rs)
        worst = max(r["error_fraction"] for r in rs)
        if non2xx or sockerr:
            warnings.append(
                f"{name}: {non2xx} non-2xx responses and {sockerr} socket "
                f"errors over {params['rounds']} round(s) (worst round "
                f"{worst:.2%} errors)")
        targets[name] = {"port": ports[name], "command": " ".join(cmds[name]),
                         "wrk": wrk_cmd.get(name), "median": med,
                         "non_2xx_total": non2xx,
                         "socket_errors_total": sockerr,
                         "worst_error_fraction": worst,
                         "invalid": (worst > MAX_ERROR_FRACTION or any(
                             name == n for n, _ in post_problems)),
                         "rounds": rs}

    def med(name, key):
        # No ratio from a target whose answers were errors.
        if name not in targets or targets[name]["invalid"]:
            return None
        return targets[name]["median"][key]

    ratios = {
        "cacheroute/vllm-router requests/s":
            ratio(med("cacheroute", "rps"), med("vllm-router", "rps")),
        "cacheroute/vllm-router mean latency":
            ratio(med("cacheroute", "mean_ms"), med("vllm-router", "mean_ms")),
        "cacheroute/nginx-proxy requests/s":
            ratio(med("cacheroute", "rps"), med("nginx-proxy", "rps")),
        "cacheroute/nginx-proxy mean latency":
            ratio(med("cacheroute", "mean_ms"), med("nginx-proxy", "mean_ms")),
        "nginx-proxy/direct requests/s":
            ratio(med("nginx-proxy", "rps"), med("direct", "rps")),
    }
    # Only the load before counts: the one after includes this benchmark's
    # own (wrk, the upstream and a proxy keep about 2 CPUs busy).
    loaded = bool(nproc and load_before and load_before[0] > 0.5 * nproc)
    if loaded:
        warnings.append(
            f"load average {load_before} before the run on {nproc} CPUs: "
            f"other work shared the machine")

    vr = os.path.join(os.path.dirname(args.vllm_router), "pip")
    versions = {
        "nginx": version_of([args.nginx, "-v"]),
        "wrk": version_of(["wrk", "-v"]),
        "vllm-router": None,
        "cacheroute": version_of(["git", "-C", HERE, "describe", "--always",
                                  "--dirty"]),
    }
    if os.path.exists(vr):
        try:
            out = subprocess.run([vr, "show", "vllm-router"],
                                 capture_output=True, text=True,
                                 timeout=30).stdout
            m = re.search(r"^Version:\s*(\S+)", out, re.M)
            versions["vllm-router"] = m.group(1) if m else None
        except (OSError, subprocess.SubprocessError):
            pass
    if versions["cacheroute"]:
        versions["cacheroute"] = "git " + versions["cacheroute"]

    res = {
        "timestamp": ts,
        "params": params,
        "host": {"nproc": nproc, "loadavg_before": load_before,
                 "loadavg_after": load_after, "uptime_before": uptime_before,
                 "uptime_after": uptime_after, "loaded": loaded},
        "versions": versions,
        "targets_order": order,
        "targets": targets,
        "ratios": ratios,
        "goals": {k: {"op": op, "value": v} for k, (op, v) in GOALS.items()},
        "warnings": warnings,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"overhead-{ts}")
    md = markdown(res)
    with open(base + ".md", "w") as f:
        f.write(md)
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print()
    print(md)
    log(f"wrote {base}.md and {base}.json")
    bad = [n for n in order if targets[n]["invalid"]]
    if bad:
        print(f"\n!!! [overhead] error answers (over {MAX_ERROR_FRACTION:.0%}"
              f" in a round, or after the run) from {', '.join(bad)}: their "
              f"figures are not valid", file=sys.stderr)
        return 3
    return 0


def _on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        sys.exit(main())
    except Fail as e:
        print(f"\n!!! [overhead] FAILED: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"\n!!! [overhead] interrupted ({e})", file=sys.stderr)
        sys.exit(130)
