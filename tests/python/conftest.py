"""Shared fixtures of the Python package's tests (tests/python; scripts/test.sh runs them after
`pip install .`). The CLI they compare against is the one installed with the package
(lmforge/bin/lmforge), built from the same sources in the same build."""
from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import lmforge
from lmforge._cli import binary

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Runs the installed `lmforge` binary; stdout and stderr as text unless text=False."""
    kw.setdefault("text", True)
    p = subprocess.run([binary(), *args], capture_output=True, **kw)
    if check and p.returncode != 0:
        err = p.stderr if kw["text"] else p.stderr.decode("utf-8", "replace")
        raise AssertionError(f"lmforge {' '.join(args)} exited {p.returncode}: {err.strip()}")
    return p


def read_safetensors(path: Path) -> dict:
    """The tensors of a .safetensors file as NumPy arrays (F32, I32)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = {"F32": np.float32, "I32": np.int32}[info["dtype"]]
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dtype).reshape(info["shape"])
    return out


def metrics(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny model trained for 30 steps by the CLI (its out-dir: checkpoints/latest)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    cli("train", "--preset", "tiny", "--steps", "30", "-B", "4", "-T", "64", "--log-every", "10",
        "--device", "cpu", "--out-dir", str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_run) -> "lmforge.Model":
    return lmforge.load(tiny_run, device="cpu")
