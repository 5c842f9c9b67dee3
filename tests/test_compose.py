"""conf/compose/, validated without a Docker engine (none on the machines that run
this suite): the compose file parses; every `cacheroute` command in it names a
subcommand and flags the binary accepts (compared with `cacheroute SUB --help`);
the files it mounts exist; ports, service names, models, stores and seeds agree
between the compose file, the gateway's and the KDN's TOML and the LMCache
YAML it mounts; and those configs run: the KDN on conf/compose/kdn.toml as is
(only its listener and its own stores moved to loopback by flags), `cacheroute
doctor` passes the mounted LMCache YAML against a sim configured like the
compose file's vLLM, and the gateway on conf/compose/cacheroute.toml (service
hosts mapped to the loopback processes) serves a request.

The compose file itself has not been run (README, "In front of a real vLLM")."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from crtest import MODEL, client, free_port

REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "conf/compose"
COMPOSE = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
GATEWAY_TOML = tomllib.loads((COMPOSE_DIR / "cacheroute.toml").read_text())
KDN_TOML = tomllib.loads((COMPOSE_DIR / "kdn.toml").read_text())


def mounts(service: str) -> dict[str, Path]:
    """Container path -> the repo path a service mounts there (relative sources only)."""
    out = {}
    for v in SERVICES[service].get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            out[dst] = (COMPOSE_DIR / src).resolve()
    return out


def host_file(service: str, container_path: str) -> Path:
    """The repo file a container path of `service` is, through its mounts."""
    for dst, src in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == dst:
            return src
        if container_path.startswith(dst.rstrip("/") + "/"):
            return src / container_path[len(dst.rstrip("/")) + 1:]
    raise AssertionError(f"{service}: {container_path} is not under any mount {mounts(service)}")


def flag(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing in {cmd}"
    return cmd[cmd.index(name) + 1]


def port_of(addr_or_url: str) -> int:
    if "://" in addr_or_url:
        return urlsplit(addr_or_url).port
    return int(addr_or_url.rsplit(":", 1)[1])


def host_of(url: str) -> str:
    return urlsplit(url).hostname


def vllm() -> tuple[list[str], dict]:
    svc = SERVICES["vllm"]
    return [str(a) for a in svc["command"]], svc["environment"]


LMCACHE_YAML_PATH = host_file("vllm", vllm()[1]["LMCACHE_CONFIG_FILE"])
LMCACHE_YAML = yaml.safe_load(LMCACHE_YAML_PATH.read_text())


def help_flags(cr_bin: str, sub: str) -> set[str]:
    p = subprocess.run([cr_bin, sub, "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"`cacheroute {sub} --help` failed: {p.stderr}"
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", p.stdout))


def test_every_cacheroute_command_names_flags_the_binary_accepts(cr_bin):
    checked = []
    for name, svc in SERVICES.items():
        cmd = [str(a) for a in svc.get("command", [])]
        if not cmd or cmd[0] != "cacheroute":
            continue
        # the binary is mounted where the command finds it
        assert "/usr/local/bin/cacheroute" in [v.split(":")[1] for v in svc["volumes"]], name
        sub = cmd[1]
        accepted = help_flags(cr_bin, sub)
        used = [a for a in cmd[2:] if a.startswith("--")]
        assert used, f"{name}: no flags?"
        unknown = [f for f in used if f not in accepted]
        assert not unknown, f"service {name}: `cacheroute {sub}` does not accept {unknown}"
        # every flag given here takes a value, and has one
        for f in used:
            value = cmd[cmd.index(f) + 1]
            assert not value.startswith("--"), f"{name}: {f} has no value"
        if "--config" in cmd:
            path = host_file(name, flag(cmd, "--config"))
            assert path.is_file(), f"{name}: mounted config {path} is missing"
            tomllib.loads(path.read_text())
        checked.append(name)
    assert sorted(checked) == ["agent", "gateway", "kdn"]
    # The tokens the configs say to set are in the env file the services read.
    env_keys = {line.split("=", 1)[0] for line in (COMPOSE_DIR / "env.example").read_text().splitlines()
                if "=" in line and not line.startswith("#")}
    assert {"CACHEROUTE_CONTROL_TOKEN", "CACHEROUTE_KDN_TOKEN", "HF_TOKEN"} <= env_keys
    assert LMCACHE_YAML_PATH.is_file()


def test_ports_names_models_and_stores_agree():
    cmd, env = vllm()
    served, engine_port = flag(cmd, "--served-model-name"), int(flag(cmd, "--port"))
    gw_cmd = [str(a) for a in SERVICES["gateway"]["command"]]
    agent = [str(a) for a in SERVICES["agent"]["command"]]
    model = KDN_TOML["models"][0]

    # every URL points at a compose service, on the port that service listens on
    listens = {"vllm": engine_port, "redis": 6379,
               "gateway": port_of(GATEWAY_TOML["gateway"]["control"]),
               "kdn": port_of(KDN_TOML["kdn"]["listen"]), "agent": port_of(flag(agent, "--listen"))}
    urls = [GATEWAY_TOML["kdns"][0]["url"], *[i["url"] for p in GATEWAY_TOML["pools"] for i in p["instances"]],
            KDN_TOML["kdn"]["advertise_url"], KDN_TOML["kdn"]["registry"], KDN_TOML["kdn"]["store"],
            *KDN_TOML["kdn"]["gateways"], model["producer"], *[t["store"] for t in KDN_TOML["targets"]],
            flag(agent, "--engine"), flag(agent, "--advertise-url"), flag(agent, "--gateway"),
            flag(agent, "--kdn"), flag(agent, "--kv-store"), LMCACHE_YAML["remote_url"]]
    for u in urls:
        host = host_of(u)
        assert host in SERVICES, f"{u}: no compose service {host}"
        assert port_of(u) == listens[host], f"{u}: {host} listens on {listens[host]}"

    # clients reach the gateway's service plane on the published port
    published = [str(p) for p in SERVICES["gateway"]["ports"]]
    assert published == [f"{port_of(GATEWAY_TOML['gateway']['listen'])}:{port_of(GATEWAY_TOML['gateway']['listen'])}"]
    assert gw_cmd[1] == "gateway"

    # one model, named alike everywhere; the LMCache key settings the same
    assert served == model["name"] == flag(agent, "--model") == MODEL
    assert all(p["models"] == [served] for p in GATEWAY_TOML["pools"])
    assert cmd[0] == model["lmcache_model"], "vLLM's --model is the model field of every key"
    assert env["PYTHONHASHSEED"] == model["hash_seed"]
    assert LMCACHE_YAML["chunk_size"] == model["chunk_size"]
    assert LMCACHE_YAML["pre_caching_hash_algorithm"] == model["hash_algorithm"] == "sha256_cbor"
    assert "LMCacheConnectorV1" in flag(cmd, "--kv-transfer-config")
    # the engine's store is the KDN's injection target the pool names, and the agent's
    targets = {t["name"]: t["store"] for t in KDN_TOML["targets"]}
    assert targets[GATEWAY_TOML["pools"][0]["kv_target"]] == LMCACHE_YAML["remote_url"] == flag(agent, "--kv-store")
    # the KDN's producer is the engine, whose LMCache writes to the KDN's own store
    assert model["producer"] == GATEWAY_TOML["pools"][0]["instances"][0]["url"]
    assert KDN_TOML["kdn"]["store"] == LMCACHE_YAML["remote_url"]


def test_configs_run_and_doctor_passes_the_mounted_lmcache_yaml(procs, cr_bin, sim, tmp_path):
    cmd, env = vllm()
    model = KDN_TOML["models"][0]
    # A sim configured as the compose file's vLLM + LMCache are.
    engine = sim(model=flag(cmd, "--served-model-name"), extra=[
        "--lmcache-model", cmd[0], "--hash-seed", env["PYTHONHASHSEED"],
        "--chunk-size", str(LMCACHE_YAML["chunk_size"]), "--kv-store", "memory://compose-engine",
        "--lmcache-scheme", model["scheme"], "--kv-dtype", model["dtype"], "--world-size", "1",
    ])
    # The KDN on the compose file's kdn.toml, only its listener and its own stores on loopback.
    kport = free_port()
    tokens = {"CACHEROUTE_KDN_TOKEN": "kdn-token", "CACHEROUTE_CONTROL_TOKEN": "control-token"}
    kdn = procs.start("kdn", [cr_bin, "kdn", "--config", str(COMPOSE_DIR / "kdn.toml"),
                              "--listen", f"127.0.0.1:{kport}", "--registry", "memory://compose-registry",
                              "--store", "memory://compose-store"], env=tokens)
    kdn_url = f"http://127.0.0.1:{kport}"
    kdn.wait_http(kdn_url + "/health")

    p = subprocess.run([cr_bin, "doctor", "--lmcache-config", str(LMCACHE_YAML_PATH), "--engine", engine.url,
                        "--kdn", kdn_url], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stdout + p.stderr
    verdicts = [line for line in p.stdout.splitlines() if line.startswith("[")]
    assert len(verdicts) >= 9 and all(v.startswith("[ok") for v in verdicts), p.stdout
    assert "keys will match" in p.stdout

    # The gateway on the compose file's cacheroute.toml, its service hosts mapped to
    # the processes above (the only change), serves a request.
    text = (COMPOSE_DIR / "cacheroute.toml").read_text()
    inst = GATEWAY_TOML["pools"][0]["instances"][0]["url"]
    text = text.replace(f'"{inst}"', f'"{engine.url}"').replace(f'"{GATEWAY_TOML["kdns"][0]["url"]}"',
                                                               f'"{kdn_url}"')
    cfg = tmp_path / "compose-cacheroute.toml"
    cfg.write_text(text)
    port, cport = free_port(), free_port()
    gw = procs.start("gateway", [cr_bin, "gateway", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
                                 "--control", f"127.0.0.1:{cport}"], env=tokens)
    gw.wait_http(f"http://127.0.0.1:{port}/health")
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hello compose"}]}
    with client() as c:
        gw.wait_http(f"http://127.0.0.1:{port}/v1/models", ok=lambda r: r.status_code == 200 and MODEL in r.text)
        r = c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_the_engine_mounts_the_lmcache_yaml_it_reads_and_asks_for_a_gpu():
    _, env = vllm()
    assert host_file("vllm", env["LMCACHE_CONFIG_FILE"]) == (REPO / "conf/lmcache/lmcache.example.yaml").resolve()
    gpus = SERVICES["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["driver"] == "nvidia" and "gpu" in gpus[0]["capabilities"]
