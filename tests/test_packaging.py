"""What a user gets from the package itself: no torch at import, a usable Numba cache dir."""

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
