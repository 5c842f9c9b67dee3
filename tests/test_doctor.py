"""`cacheroute doctor` against sims whose LMCache settings match a KDN's, and
against sims that differ in one setting each: one line per check, exit 1 on a
mismatch, naming the check that failed."""

from __future__ import annotations

import subprocess

import pytest

from kfleet import sim_args, start_kdn

YAML_OK = "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5\nremote_url: redis://127.0.0.1:6379/0\n" \
          "remote_serde: naive\nsave_unfull_chunk: false\npre_caching_hash_algorithm: sha256_cbor\n"

CHECKS = ["model", "chunk size", "world size", "dtype", "hash seed", "scheme version", "hash algorithm",
          "remote store", "save_unfull_chunk"]


def doctor(cr_bin, yaml_path, engine, kdn, *extra) -> tuple[int, dict[str, str], str]:
    p = subprocess.run([cr_bin, "doctor", "--lmcache-config", str(yaml_path), "--engine", engine, "--kdn", kdn,
                        *extra], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    verdicts = {}
    for line in p.stdout.splitlines():
        if line.startswith("["):
            tag, rest = line[1:].split("] ", 1)
            verdicts[rest.split(":", 1)[0]] = tag.strip()
    return p.returncode, verdicts, p.stdout + p.stderr


@pytest.fixture
def kdn(procs, cr_bin, tmp_path, sim):
    producer = sim(extra=sim_args("memory://doctor-producer"))
    return start_kdn(procs, cr_bin, tmp_path, "kdn-doctor", "memory://doctor-store", {}, producer.url)


def test_matching_engine_passes_every_check(sim, kdn, cr_bin, tmp_path):
    s = sim(extra=sim_args("memory://doctor-a"))
    y = tmp_path / "lmcache.yaml"
    y.write_text(YAML_OK)
    rc, verdicts, out = doctor(cr_bin, y, s.url, kdn.url)
    assert rc == 0, out
    assert list(verdicts) == CHECKS, out
    assert set(verdicts.values()) == {"ok"}, out
    assert "keys will match" in out


@pytest.mark.parametrize("sim_extra,yaml,failed", [
    (["--hash-seed", "1"], YAML_OK, ["hash seed"]),
    (["--world-size", "2"], YAML_OK, ["world size"]),
    (["--lmcache-model", "/models/llama3"], YAML_OK, ["model"]),
    (["--lmcache-scheme", "lmcache-0.5"], YAML_OK, ["scheme version"]),
    (["--kv-dtype", "half"], YAML_OK, ["dtype"]),
    (["--chunk-size", "512"], YAML_OK.replace("chunk_size: 256", "chunk_size: 512"), ["chunk size"]),
    ([], YAML_OK.replace("chunk_size: 256", "chunk_size: 512"), ["chunk size"]),
    ([], YAML_OK.replace("pre_caching_hash_algorithm: sha256_cbor\n", ""), ["hash algorithm"]),
])
def test_each_mismatch_fails_its_check(sim, kdn, cr_bin, tmp_path, sim_extra, yaml, failed):
    # The sim differs from the KDN in the one setting given.
    args = sim_args("memory://doctor-b")
    for flag, value in zip(sim_extra[::2], sim_extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    s = sim(extra=args)
    y = tmp_path / "lmcache.yaml"
    y.write_text(yaml)
    rc, verdicts, out = doctor(cr_bin, y, s.url, kdn.url)
    assert rc == 1, out
    assert [k for k, v in verdicts.items() if v == "FAIL"] == failed, out
    assert "would miss" in out


def test_flags_stand_in_for_what_a_real_engine_does_not_expose(sim, kdn, cr_bin, tmp_path):
    """A plain engine (no LMCache info in /metrics): the engine's settings come from flags;
    what is not given is skipped, not failed."""
    s = sim(extra=["--lmcache-model", "meta-llama/Meta-Llama-3-8B-Instruct"])
    y = tmp_path / "lmcache.yaml"
    y.write_text(YAML_OK)
    rc, verdicts, out = doctor(cr_bin, y, s.url, kdn.url)
    assert rc == 0, out
    assert verdicts["hash seed"] == verdicts["world size"] == "skip", out
    rc, verdicts, out = doctor(cr_bin, y, s.url, kdn.url, "--engine-hash-seed", "7", "--engine-world-size", "1",
                               "--engine-dtype", "bf16", "--lmcache-version", "0.3.15")
    assert rc == 1, out
    assert verdicts["hash seed"] == "FAIL" and verdicts["world size"] == "ok" and verdicts["dtype"] == "ok", out
    assert verdicts["scheme version"] == "ok", out


def test_unreadable_inputs_are_errors_not_verdicts(cr_bin, tmp_path, kdn):
    y = tmp_path / "bad.yaml"
    y.write_text("chunk_size: [1\n")
    p = subprocess.run([cr_bin, "doctor", "--lmcache-config", str(y), "--engine", "http://127.0.0.1:9",
                        "--kdn", kdn.url], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "error:" in p.stderr and "bad.yaml" in p.stderr, p.stderr
