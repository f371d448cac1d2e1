"""Time from a fresh process to the first ``get`` answered, and to the first training step.

Each round starts ``python -c "import mlkv; s = mlkv.open(path); s.get(keys); print(...)"``
on a store built beforehand (``MLKV_BENCH_STARTUP_ROWS`` rows of 64 float32, closed, so the
``get`` reads from disk) and times it until the line printed after the ``get`` arrives.

- ``warm``: ``NUMBA_CACHE_DIR`` is a directory an untimed warm-up round has filled;
- ``cold``: ``NUMBA_CACHE_DIR`` is a new empty directory every round: every kernel compiles.

The first training step (``test_startup_first_step``, warm cache only) starts
``python -c "import torch; from mlkv.frameworks.torch import KVEmbedding; ..."``, builds a
new ``KVEmbedding`` (dim 64) with the optimizer named and times until one
``emb(ids).backward(w)`` of 4,096 ids (its update included) is done: what a notebook's first
training cell pays, beside the floor ``python -c "import torch"``.

Floors are timed the same way for context: ``python -c "import numpy"`` and
``python -c "import numba"`` (what any Numba program pays before its first kernel).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

import benchlib

CHILD = """
import sys
import numpy as np
import mlkv
s = mlkv.open(sys.argv[1])
s.get(np.arange(4096, dtype=np.int64) * 7919 % int(sys.argv[2]))
print("ready", flush=True)
s.close()
"""
FIRST_STEP = """
import sys, tempfile
import torch
from mlkv.frameworks.torch import KVEmbedding
emb = KVEmbedding(64, path=tempfile.mkdtemp() + "/emb", optimizer=sys.argv[1], lr=0.01)
ids = torch.arange(4096) * 7919 % 100003
emb(ids).backward(torch.ones(4096, 64))
print("ready", flush=True)
emb.close()
"""
FLOORS = {"python+numpy": "import numpy\nprint('ready', flush=True)\n",
          "python+numba": "import numba\nprint('ready', flush=True)\n",
          "python+torch": "import torch\nprint('ready', flush=True)\n"}


@pytest.fixture(scope="module")
def startup_store(sizes, bench_dir):
    rows = int(os.environ.get("MLKV_BENCH_STARTUP_ROWS") or (1 << 14 if sizes.smoke else 1 << 20))
    path = os.path.join(bench_dir, "startup", "mlkv")
    t = benchlib.MlkvTable(path, create=True)
    t.load(rows)
    t.close()
    return path, rows


def _child_env(cache_dir):
    env = dict(os.environ)
    env["NUMBA_CACHE_DIR"] = cache_dir
    env.pop("PYTHONSTARTUP", None)
    return env


def _measure(benchmark, code, args, cache_mode, rounds, warmup, tmp_root):
    warm_dir = tempfile.mkdtemp(prefix="numba-warm-", dir=tmp_root)
    children = []

    def reap():
        while children:
            p = children.pop()
            p.stdout.close()
            if p.wait(timeout=600) != 0:
                raise RuntimeError(f"startup child failed: {p.stderr.read()}")
            p.stderr.close()

    def setup():
        reap()
        cache = warm_dir if cache_mode == "warm" else tempfile.mkdtemp(
            prefix="numba-cold-", dir=tmp_root)
        return (_child_env(cache),), {}

    def start(env):
        p = subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        children.append(p)
        line = p.stdout.readline()
        if line.strip() != "ready":
            p.wait(timeout=600)
            raise RuntimeError(f"startup child failed: {p.stderr.read()}")

    try:
        benchmark.pedantic(start, setup=setup, rounds=rounds, warmup_rounds=warmup)
    finally:
        reap()


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_startup_first_get(benchmark, startup_store, sizes, bench_dir, cache):
    path, rows = startup_store
    rounds = sizes.startup_rounds if cache == "warm" else sizes.startup_cold_rounds
    _measure(benchmark, CHILD, [path, str(rows)], cache, rounds,
             warmup=1 if cache == "warm" else 0, tmp_root=bench_dir)
    benchlib.record(benchmark, 4096, scenario="startup", op="first_get", dist="-",
                    system="mlkv", cache=cache, rows=rows)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_startup_first_step(benchmark, sizes, bench_dir, optimizer):
    pytest.importorskip("torch")
    _measure(benchmark, FIRST_STEP, [optimizer], "warm", sizes.startup_rounds,
             warmup=1, tmp_root=bench_dir)
    benchlib.record(benchmark, 4096, scenario="startup", op=f"first_step_{optimizer}",
                    dist="-", system="mlkv", cache="warm")


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_startup_floor(benchmark, sizes, bench_dir, floor):
    _measure(benchmark, FLOORS[floor], [], "warm", sizes.startup_rounds,
             warmup=0 if sizes.smoke else 1, tmp_root=bench_dir)
    benchlib.record(benchmark, 0, scenario="startup", op="first_get", dist="-", system=floor,
                    cache="-")
