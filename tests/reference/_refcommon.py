"""Shared helpers for the tests/reference/*.py fixture generators.

Not a generator itself.  It provides:

* ``splitmix64(indices)``: the portable counter-based generator used by every
  script (so fixture values never depend on torch's or numpy's RNG).  Output k of
  stream ``seed`` is ``mix((seed + k + 1) * 0x9E3779B97F4A7C15 mod 2^64)``, where
  mix is the standard splitmix64 finaliser.  With seed 0 this is exactly the
  generator of the project's NF4 spec (design/notes/nf4_spec.md section 10).
* ``uniform01`` / ``normalish``: floats derived from it with exact float64
  arithmetic (so they are reproducible anywhere).
* ``versions()``: the package versions recorded in every fixture's metadata.
* ``save(path, tensors, metadata, max_bytes=MAX_FILE_BYTES)``: safetensors.torch.save_file
  wrapper that adds the version keys and refuses to write files over ``max_bytes``
  (1 MiB unless a script names a larger budget for one file).

Developers run the generator scripts with the project's venv, e.g.
``.venv/bin/python tests/reference/bnb_4bit.py``.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import numpy as np

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA_DIR = os.path.join(REPO_ROOT, "tests", "data")

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

MAX_FILE_BYTES = 1 << 20


def splitmix64(indices, seed: int = 0) -> np.ndarray:
    """splitmix64 output for counter values ``indices`` (array-like of ints) in stream ``seed``."""
    i = np.asarray(indices, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (i + np.uint64(seed) + np.uint64(1)) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return z


def uniform01(n: int, seed: int, start: int = 0) -> np.ndarray:
    """n float64 values in [0,1): top 53 bits of splitmix64 / 2^53 (exact)."""
    z = splitmix64(np.arange(start, start + n, dtype=np.uint64), seed)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def normalish(n: int, seed: int, scale: float = 1.0, start: int = 0) -> np.ndarray:
    """Irwin-Hall(4) approximation of a normal (the nf4_spec.md section 10 generator).

    element i = ((sum_{k<4} splitmix64(4i+k) >> 40) / 2^24 - 2.0) * scale, computed in
    float64 and rounded once to float32.  Range [-2, 2) * scale, std ~0.577 * scale.
    """
    idx = np.arange(4 * start, 4 * (start + n), dtype=np.uint64)
    z = (splitmix64(idx, seed) >> np.uint64(40)).astype(np.float64).reshape(n, 4).sum(axis=1)
    return ((z / float(1 << 24) - 2.0) * scale).astype(np.float32)


def random_u32(n: int, seed: int) -> np.ndarray:
    return (splitmix64(np.arange(n, dtype=np.uint64), seed) >> np.uint64(32)).astype(np.uint32)


def versions() -> dict:
    import numpy
    import safetensors
    import torch

    v = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # pragma: no cover
        v["bitsandbytes"] = "not installed"
    try:
        import transformers

        v["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        v["transformers"] = "not installed"
    return v


def save(path: str, tensors: dict, metadata: dict, max_bytes: int = MAX_FILE_BYTES) -> int:
    """Write tensors with safetensors.torch.save_file; metadata values are str-ified.

    Adds the version keys.  Refuses files over ``max_bytes`` (default 1 MiB).  Returns
    the file size in bytes.
    """
    from safetensors.torch import save_file

    # allow_nan=False: metadata must be strict JSON (no NaN/Infinity tokens) for C++ parsers
    meta = {k: (v if isinstance(v, str) else json.dumps(v, allow_nan=False)) for k, v in metadata.items()}
    for k, v in versions().items():
        meta.setdefault(k, v)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, path, metadata=meta)
    _canonicalize_header(path)
    os.chmod(path, 0o644)  # safetensors creates files 0600
    size = os.path.getsize(path)
    if size > max_bytes:
        raise SystemExit(f"{path}: {size} bytes exceeds the {max_bytes}-byte fixture limit")
    print(f"wrote {os.path.relpath(path, REPO_ROOT)} ({size} bytes, {len(tensors)} tensors)")
    return size


def _canonicalize_header(path: str) -> None:
    """Sort the __metadata__ keys in place so reruns give byte-identical files.

    safetensors writes the metadata map in hash order (it changes from run to run).
    Re-serialising the same JSON with sorted metadata keys keeps the header length,
    so tensor offsets are untouched; the result is still a valid safetensors file.
    """
    import struct

    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
        text = raw.decode("utf-8")
        body = text.rstrip(" ")
        hdr = json.loads(body, object_pairs_hook=dict)
        again = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False)
        if again != body:  # unexpected formatting: leave the file alone
            return
        if "__metadata__" in hdr:
            hdr["__metadata__"] = dict(sorted(hdr["__metadata__"].items()))
        new = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False)
        new_raw = new.encode("utf-8") + b" " * (len(text) - len(body))
        assert len(new_raw) == n
        f.seek(8)
        f.write(new_raw)
