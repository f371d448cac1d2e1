"""What a user gets from the package itself: no torch at import, a usable Numba cache dir."""

import json
import os
import subprocess
import sys


def _run(code, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env).stdout.strip()


def test_import_mlkv_does_not_import_torch():
    assert _run("import sys, mlkv; print('torch' in sys.modules)") == "False"


def test_numba_cache_falls_back_when_home_is_not_writable(tmp_path):
    """No NUMBA_CACHE_DIR, an unwritable home cache: kernels still compile and cache somewhere
    writable (a read-only site-packages must not break import)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "MLKV_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = "/proc/no-such-dir"
    env["HOME"] = "/proc/no-such-home"
    env["TMPDIR"] = str(tmp_path)
    code = ("import numpy as np, mlkv, mlkv._jit as j, os, tempfile;"
            "s = mlkv.open(tempfile.mkdtemp() + '/s', dim=2);"
            "s.put([1], [[1, 2]]); print(s.get([1]).tolist()); print(j.numba_cache_dir())")
    rows, cache_dir = _run(code, env).splitlines()
    assert rows == "[[1.0, 2.0]]"
    assert cache_dir.startswith(str(tmp_path)) and os.listdir(cache_dir)


def test_mlkv_cache_dir_is_honoured(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["MLKV_CACHE_DIR"] = str(tmp_path / "kernels")
    assert _run("import mlkv._jit as j; print(j.numba_cache_dir())", env) == str(
        tmp_path / "kernels")


_TRAIN_AND_LIST_CACHE_MISSES = """
import importlib, json, pkgutil, tempfile
import numba, torch
import mlkv, mlkv.engine
from mlkv.frameworks.torch import KVEmbedding, KVEmbeddingBag
root = tempfile.mkdtemp()
ids = torch.tensor([3, 1, 3, 7, 1, 3])
for optimizer in ("sgd", "adagrad", "rowwise_adagrad", "adam"):
    for fused in (True, False):
        emb = KVEmbedding(4, path=f"{root}/{optimizer}{fused}", optimizer=optimizer, lr=0.1,
                          fused=fused)
        emb(ids).sum().backward()
        emb.step()
        emb.close()
import time
from mlkv.engine import helper as H, _pair_kernels as PK
two = KVEmbedding(4, path=f"{root}/two", optimizer="adam", lr=0.1, threads=2)
many = torch.arange(600) % 500
for _ in range(3):                      # the helper thread starts at the first read
    two(many).sum().backward()
    started = time.monotonic()
    while H.helper().control[PK.STATE] != PK.AWAKE and time.monotonic() < started + 10:
        time.sleep(0.001)
two.close()
bag = KVEmbeddingBag(4, path=f"{root}/bag", optimizer="adagrad", lr=0.1)
bag(ids.reshape(2, 3)).sum().backward()
bag.close()
store = mlkv.open(f"{root}/store", dim=2)
store.put([1, 2], [[1.0, 2.0], [3.0, 4.0]])
store.get([1, 2])
store.delete([1])
store.close()
found = {"misses": {}, "hits": {}}
for info in pkgutil.iter_modules(mlkv.engine.__path__):
    if info.name.endswith("_kernels"):
        module = importlib.import_module("mlkv.engine." + info.name)
        for name, value in vars(module).items():
            for f in value if isinstance(value, tuple) else (value,):
                if isinstance(f, numba.core.dispatcher.Dispatcher):
                    for kind in ("misses", "hits"):
                        n = sum(getattr(f.stats, "cache_" + kind).values())
                        if n:
                            key = info.name + "." + name
                            found[kind][key] = found[kind].get(key, 0) + n
print(json.dumps(found))
"""


def test_a_new_process_finds_every_training_kernel_in_the_cache(tmp_path):
    """The second process to train finds all its kernels in Numba's disk cache: none compiles
    again (a kernel that did cost seconds at every first step in a notebook)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "kernels"))
    for run in range(2):                                    # the first fills the cache
        done = subprocess.run([sys.executable, "-c", _TRAIN_AND_LIST_CACHE_MISSES], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["misses"] == {}
    # the kernels of every step ran, from the cache
    assert {"_update_kernels.UPDATE_ROWS", "_log_kernels.read_resident",
            "_write_kernels.write_rows", "_pair_kernels.serve",
            "_pair_kernels.read_resident_pair"} <= set(found["hits"])
