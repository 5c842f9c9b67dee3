#!/usr/bin/env python3
"""Generate LMCache chunk-key test vectors by running LMCache's own code.

This script contains no LMCache code. At run time it opens each LMCache wheel
given on the command line (a zip file downloaded from PyPI), extracts the
package's pure-Python files into a temporary directory, and imports the
wheel's own `lmcache/v1/token_database.py` and `lmcache/utils.py` from there.
Everything those two modules import but never use for hashing (torch,
transformers, cachetools, LMCache's config/metadata classes) is replaced with
small stand-ins in `sys.modules`.

vLLM itself is not installed. LMCache asks vLLM for two things, and the stand-in
modules provide them with the behaviour vLLM 0.13 documents:
  * `vllm.utils.hashing.get_hash_fn_by_name("sha256_cbor")`: SHA-256 over the
    canonical CBOR encoding (cbor2, canonical=True) of the object, returning
    the 32-byte digest;
  * `vllm.v1.core.kv_cache_utils.init_none_hash(fn)`: NONE_HASH = fn(the
    PYTHONHASHSEED string), or 32 random bytes when the variable is unset.

Usage (from anywhere; needs `pip install cbor2`, Python >= 3.10):

    pip download --no-deps lmcache==0.3.15 -d wheels/   # repeat per version
    python3 lmcache/tests/gen/gen_lmcache_vectors.py wheels/*.whl \
        > lmcache/tests/data/lmcache_generated_vectors.json

Each wheel is evaluated in its own child interpreter (LMCache keeps NONE_HASH
in a module global). Versions whose outputs are identical for every case are
grouped, so the JSON shows which releases share a key scheme.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import types
import zipfile

# ---------------------------------------------------------------------------
# Test inputs (all token ids are valid Llama-3 ids: 0..128255)

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

# Values at every CBOR integer-width edge, plus BOS/EOS-like ids.
EDGE_IDS = [0, 1, 23, 24, 255, 256, 65535, 65536, 128000, 128255]


def llama_like(n: int, salt: int) -> list[int]:
    """A deterministic pseudo-random sequence starting with BOS 128000."""
    if n == 0:
        return []
    out = [128000]
    x = 0x9E3779B9 ^ salt
    for i in range(1, n):
        x = (x * 6364136223846793005 + 1442695040888963407) & ((1 << 64) - 1)
        # mix in the edge values regularly so every CBOR head width appears
        if i % 37 == 0:
            out.append(EDGE_IDS[(i // 37) % len(EDGE_IDS)])
        else:
            out.append((x >> 33) % 128256)
    return out


SEQUENCES = {
    "empty": [],
    "one_token": [128000],
    # chunk size 4
    "edges8": [128000, 23, 24, 255, 256, 65535, 65536, 128255],  # 2 full chunks
    "edges11": [128000, 0, 23, 24, 255, 256, 65535, 65536, 128255, 1, 9],  # 2 + 3
    "three": [128000, 791, 6460],  # shorter than one chunk of 4
    # chunk size 256
    "l256": llama_like(256, 1),  # exactly one chunk
    "l512": llama_like(512, 2),  # exact multiple
    "l700": llama_like(700, 3),  # 2 full + 188 tail (array head 0x98)
    "l769": llama_like(769, 4),  # 3 full + 1 tail
    "l279": llama_like(279, 5),  # 1 full + 23 tail (array head 0x97)
}

SEQS_FOR_CHUNK = {
    4: ["empty", "one_token", "three", "edges8", "edges11"],
    256: ["empty", "one_token", "l256", "l512", "l700", "l769", "l279", "edges11"],
}
SEEDS = ["0", "42", "12345"]


def cases() -> list[dict]:
    out = []
    # Full cross product on the axes that change hashes.
    for chunk_size, seqs in SEQS_FOR_CHUNK.items():
        for seq in seqs:
            for seed in SEEDS:
                for unfull in (False, True):
                    out.append(
                        dict(
                            tokens=seq,
                            chunk_size=chunk_size,
                            hash_seed=seed,
                            save_unfull_chunk=unfull,
                            dtype="bfloat16",
                            world_size=1,
                            worker_id=0,
                            model=MODEL,
                        )
                    )
    # Metadata variants (only key fields change, but check the rendering).
    for chunk_size, seq in ((4, "edges11"), (256, "l700")):
        for dtype, ws, wid in (("half", 1, 0), ("bfloat16", 2, 1), ("half", 2, 1)):
            out.append(
                dict(
                    tokens=seq,
                    chunk_size=chunk_size,
                    hash_seed="42",
                    save_unfull_chunk=True,
                    dtype=dtype,
                    world_size=ws,
                    worker_id=wid,
                    model="llama3-70b" if ws == 2 else MODEL,
                )
            )
    return out


# ---------------------------------------------------------------------------
# Child: load one wheel and evaluate every case with its own code


def _install_stubs(pkg_root: str) -> None:
    import cbor2  # noqa: F401  (fail early with a clear error)

    class _Anything(types.ModuleType):
        """A module whose every missing attribute is a harmless placeholder."""

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = type(name, (), {"__init__": lambda self, *a, **k: None})
            setattr(self, name, value)
            return value

    class _DType:
        def __init__(self, name: str):
            self.name = name

        def __repr__(self):
            return f"torch.{self.name}"

    torch = _Anything("torch")
    dtypes = {}
    for name in [
        "float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16",
        "int32", "int64", "bool", "float8_e4m3fn", "float8_e4m3fnuz",
        "float8_e5m2", "float8_e5m2fnuz",
    ]:
        dtypes[name] = _DType(name)
        setattr(torch, name, dtypes[name])
    torch.half = torch.float16
    torch.float = torch.float32
    torch.double = torch.float64

    class Tensor:  # never instantiated: tokens are passed as lists
        pass

    torch.Tensor = Tensor
    torch.dtype = _DType
    torch.Size = tuple
    for sub in ["cuda", "distributed", "nn", "multiprocessing"]:
        m = _Anything(f"torch.{sub}")
        setattr(torch, sub, m)
        sys.modules[f"torch.{sub}"] = m
    sys.modules["torch"] = torch
    for name in ["transformers", "cachetools", "msgspec", "prometheus_client"]:
        sys.modules[name] = _Anything(name)
    sys.modules["nvtx"] = None  # optional in LMCache: makes `import nvtx` fail

    # vLLM 0.13 hashing behaviour (see module docstring).
    def sha256_cbor(obj) -> bytes:
        import cbor2

        return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()

    def get_hash_fn_by_name(name: str):
        if name == "sha256_cbor":
            return sha256_cbor
        raise ValueError(f"unknown hash function {name!r}")

    kv_cache_utils = types.ModuleType("vllm.v1.core.kv_cache_utils")

    def init_none_hash(fn):
        seed = os.getenv("PYTHONHASHSEED")
        kv_cache_utils.NONE_HASH = os.urandom(32) if seed is None else fn(seed)

    kv_cache_utils.init_none_hash = init_none_hash
    hashing = types.ModuleType("vllm.utils.hashing")
    hashing.get_hash_fn_by_name = get_hash_fn_by_name
    hashing.sha256_cbor = sha256_cbor
    for name in ["vllm", "vllm.utils", "vllm.v1", "vllm.v1.core"]:
        m = types.ModuleType(name)
        m.__path__ = []
        sys.modules[name] = m
    sys.modules["vllm.utils"].hashing = hashing
    sys.modules["vllm.utils.hashing"] = hashing
    sys.modules["vllm.v1.core"].kv_cache_utils = kv_cache_utils
    sys.modules["vllm.v1.core.kv_cache_utils"] = kv_cache_utils

    # LMCache packages without their __init__ side effects; submodules come
    # from the extracted wheel.
    for name, sub in [("lmcache", "lmcache"), ("lmcache.v1", "lmcache/v1")]:
        m = types.ModuleType(name)
        m.__path__ = [os.path.join(pkg_root, sub)]
        sys.modules[name] = m
    cfg = types.ModuleType("lmcache.v1.config")
    cfg.LMCacheEngineConfig = object
    sys.modules["lmcache.v1.config"] = cfg
    meta = types.ModuleType("lmcache.v1.metadata")
    meta.LMCacheMetadata = object
    sys.modules["lmcache.v1.metadata"] = meta


class _Config:
    def __init__(self, chunk_size, save_unfull_chunk):
        self.chunk_size = chunk_size
        self.save_unfull_chunk = save_unfull_chunk
        self.pre_caching_hash_algorithm = "sha256_cbor"
        self.remote_url = "redis://localhost:6379"
        self.enable_pd = False
        self.enable_blending = False
        self.use_layerwise = False

    def get_extra_config_value(self, _key, default=None):
        return default


class _Metadata:
    def __init__(self, model, world_size, worker_id, kv_dtype):
        self.model_name = model
        self.world_size = world_size
        self.worker_id = worker_id
        self.kv_dtype = kv_dtype
        self.use_mla = False
        self.fmt = "vllm"  # only read by <= 0.3.12


def child(pkg_root: str, case_list: list[dict]) -> list:
    _install_stubs(pkg_root)
    import importlib
    import logging

    logging.disable(logging.WARNING)  # LMCache logs every database it builds

    torch = sys.modules["torch"]
    tdb = importlib.import_module("lmcache.v1.token_database")
    dtype_of = {"bfloat16": torch.bfloat16, "half": torch.float16}
    results = []
    for c in case_list:
        os.environ["PYTHONHASHSEED"] = c["hash_seed"]
        db = tdb.ChunkedTokenDatabase(
            _Config(c["chunk_size"], c["save_unfull_chunk"]),
            _Metadata(c["model"], c["world_size"], c["worker_id"], dtype_of[c["dtype"]]),
        )
        none_hash = tdb.NONE_HASH
        chunks = []
        for start, end, key in db.process_tokens(tokens=list(SEQUENCES[c["tokens"]])):
            chunks.append({"start": start, "end": end, "key": key.to_string()})
        results.append(
            {
                "none_hash": none_hash.hex() if isinstance(none_hash, bytes) else none_hash,
                "chunks": chunks,
            }
        )
    return results


# ---------------------------------------------------------------------------
# Parent: run every wheel, group identical versions, write JSON


def wheel_version(path: str) -> str:
    m = re.match(r"lmcache-([0-9][^-]*)-", os.path.basename(path))
    if not m:
        sys.exit(f"not an lmcache wheel file name: {path}")
    return m.group(1)


def extract(path: str, dest: str) -> None:
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.startswith("lmcache/") and name.endswith(".py"):
                z.extract(name, dest)


def version_key(v: str):
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.]", v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheels", nargs="*", help="lmcache-*.whl files from PyPI")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        json.dump(child(args.child, cases()), sys.stdout)
        return
    if not args.wheels:
        ap.error("give at least one lmcache wheel")

    case_list = cases()
    per_version = {}
    with tempfile.TemporaryDirectory() as tmp:
        for whl in args.wheels:
            version = wheel_version(whl)
            root = os.path.join(tmp, version)
            extract(whl, root)
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", root],
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            )
            per_version[version] = json.loads(out.stdout)
            print(f"{version}: {len(case_list)} cases", file=sys.stderr)

    groups: list[tuple[list[str], list]] = []
    for version in sorted(per_version, key=version_key):
        for versions, res in groups:
            if res == per_version[version]:
                versions.append(version)
                break
        else:
            groups.append(([version], per_version[version]))

    from importlib.metadata import version as dist_version

    doc = {
        "generated_by": (
            "lmcache/tests/gen/gen_lmcache_vectors.py: LMCache's own "
            "lmcache/v1/token_database.py + lmcache/utils.py imported from each "
            "PyPI wheel; vLLM 0.13 sha256_cbor/init_none_hash behaviour provided "
            f"by the script with cbor2 {dist_version('cbor2')}; "
            f"Python {sys.version.split()[0]}; torch/transformers stubbed"
        ),
        "command": "for v in "
        + " ".join(sorted(per_version, key=version_key))
        + "; do pip download --no-deps lmcache==$v -d wheels; done; "
        "python3 lmcache/tests/gen/gen_lmcache_vectors.py wheels/lmcache-*.whl "
        "> lmcache/tests/data/lmcache_generated_vectors.json",
        "wheels": sorted(per_version, key=version_key),
        "hash_algorithm": "sha256_cbor",
        "notes": [
            "Each group lists the LMCache versions that produced identical keys "
            "for every case.",
            "keys are CacheEngineKey.to_string(); Redis adds 'kv_bytes' / 'metadata'.",
            "none_hash: hex of the 32-byte digest, or the int LMCache folded it to.",
        ],
        "sequences": SEQUENCES,
        "cases": case_list,
        "groups": [
            {"lmcache_versions": versions, "results": res} for versions, res in groups
        ],
    }
    # One line per token sequence keeps the file readable.
    doc["sequences"] = {name: f"@@{name}@@" for name in SEQUENCES}
    text = json.dumps(doc, indent=1)
    for name, seq in SEQUENCES.items():
        text = text.replace(f'"@@{name}@@"', json.dumps(seq), 1)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
