"""Where the time of an mlkv ``get``/``put`` of 4,096 keys goes (not a pytest benchmark).

    python bench/profile_ops.py [--rows 1048576] [--disk-rows 2097152] [--skip-disk]

Resident part: times the public call, the engine call (``ops.read``/``ops.upsert``), the
kernel alone, the index lookup alone and the dense ``@njit`` ceiling on the same keys, and
counts AVX-512 gather/scatter instructions in the kernels' machine code (a sign that a copy
loop was not compiled to contiguous loads/stores). Disk part: splits a cold ``get`` into the
in-memory pass, the address sort, the device read and the second kernel pass.

Times are per batch: the median of CPU time of the calling thread (``thread_time``, robust
on a shared machine) and the minimum wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
from benchlib import BATCH  # noqa: E402


def timeit(fn, reps=200):
    fn()
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return float(np.median(cpu)) * 1e6, float(np.min(wall)) * 1e6


def show(name, fn, reps=200):
    cpu, wall = timeit(fn, reps)
    print(f"  {name:50s} {cpu:9.1f} {wall:9.1f}   {cpu * 1e3 / BATCH:7.1f}")


SIMD_PROBE = r"""
import re, os, sys, tempfile, numpy as np, mlkv
from mlkv.engine import _log_kernels as K
d = tempfile.mkdtemp()
s = mlkv.open(os.path.join(d, "s"), dim=64, memory_bytes=16 << 20)
k = np.arange(20000, dtype=np.int64)
v = np.ones((20000, 64), np.float32)
s.put(k, v); s.get(k); s.close()
s = mlkv.open(os.path.join(d, "s")); s.get(k); s.put(k, v)
for f in (K.read_resident, K.finish_cold, K.write_rows):
    for asm in f.inspect_asm().values():
        print(f"  {f.__name__:16s} gathers {len(re.findall('vgather', asm)):3d}  "
              f"scatters {len(re.findall('vscatter', asm)):3d}")
"""


def resident(rows):
    import mlkv
    from mlkv.engine import _index_kernels as IK
    from mlkv.engine import _log_kernels as K
    from mlkv.engine import ops
    d = tempfile.mkdtemp(prefix="mlkv-profile-")
    t = benchlib.MlkvTable(os.path.join(d, "m"), memory_bytes=512 << 20, create=True)
    t.load(rows)
    dense = benchlib.DenseTable(rows)
    s, eng = t.store, t.store.engine
    log, idx = eng.log, eng.index
    print(f"mlkv {mlkv.__file__}  rows {rows}  markers {log.markers()}")
    print(f"  {'per batch of 4096 keys':50s} {'cpu µs':>9s} {'wall µs':>9s}   {'ns/row':>7s}")
    for dist in benchlib.DISTS:
        k = benchlib.key_batches(dist, rows, 1, seed=5)[0]
        v = benchlib.row_values(k)
        out = np.empty((BATCH, 64), np.float32)
        addrs = np.empty(BATCH, np.int64)
        cold = np.empty(BATCH, np.int64)
        la = np.empty(BATCH, np.int64)
        print(f"-- {dist}")
        show("Store.get", lambda: s.get(k))
        show("ops.read", lambda: ops.read(eng, k))
        show("K.read_resident (the kernel alone)", lambda: K.read_resident(
            idx.slot_keys, idx.slot_addrs, log.words, log.vals, log.dirty, log.geo, log.marks,
            k, 0, True, out, addrs, cold, 0, eng.policy.code, eng.policy.counters))
        show("index lookup alone (_index_kernels.lookup)",
             lambda: IK.lookup(idx.slot_keys, idx.slot_addrs, k, la))
        show("ceiling: dense @njit gather", lambda: dense.get(k))
        show("Store.get of 1 key (fixed cost per call)", lambda: s.get(k[:1]))
        show("Store.put", lambda: s.put(k, v))
        show("ops.upsert", lambda: ops.upsert(eng, k, v))
        show("K.write_rows (the kernel alone)", lambda: K.write_rows(
            idx.slot_keys, idx.slot_addrs, log.words, log.vals, log.f32, log.dirty, log.geo,
            log.marks, k, v, 0))
        show("ceiling: dense @njit scatter", lambda: dense.put(k, v))
        show("Store.put of 1 key (fixed cost per call)", lambda: s.put(k[:1], v[:1]))
    t.close()
    benchlib.rmtree(d)
    print("-- SIMD in the kernels' machine code (compiled afresh, AVX-512 machines)")
    env = dict(os.environ, NUMBA_CACHE_DIR=tempfile.mkdtemp(prefix="numba-probe-"))
    subprocess.run([sys.executable, "-W", "ignore", "-c", SIMD_PROBE], env=env, check=False)


def disk(rows, memory):
    import mlkv
    from mlkv.engine import _log_kernels as K
    d = tempfile.mkdtemp(prefix="mlkv-profile-disk-")
    path = os.path.join(d, "m")
    t = benchlib.MlkvTable(path, memory_bytes=memory, policy="fifo", create=True)
    t.load(rows)
    t.close()
    benchlib.drop_page_cache([path])
    s = mlkv.open(path, memory_bytes=memory, policy="fifo")
    eng = s.engine
    log, idx, dev = eng.log, eng.index, eng.device
    print(f"-- cold get, {rows} rows, memory {memory >> 20} MiB, fifo, direct={dev.direct}, "
          f"block {getattr(dev, 'block_bytes', '?')}, io_threads {dev.io_threads}")
    draw = benchlib.sampler("uniform", rows, 7)
    parts = {"read_resident": 0.0, "unique": 0.0, "device.read_records": 0.0,
             "finish_cold": 0.0, "Store.get total": 0.0}
    n_batches, nbytes = 8, 0
    for _ in range(n_batches):
        k = draw(BATCH)
        w0 = time.perf_counter()
        s.get(k)
        parts["Store.get total"] += time.perf_counter() - w0
        # the same steps by hand on fresh keys
        k = draw(BATCH)
        out = np.empty((BATCH, 64), np.float32)
        addrs = np.empty(BATCH, np.int64)
        cold = np.empty(BATCH, np.int64)
        w0 = time.perf_counter()
        _, n_cold = K.read_resident(idx.slot_keys, idx.slot_addrs, log.words, log.vals,
                                    log.dirty, log.geo, log.marks, k, 0, True, out, addrs,
                                    cold, 0, 0, eng.policy.counters)
        w1 = time.perf_counter()
        cold = cold[:n_cold]
        cold_addrs = addrs[cold]
        uniq, rec_index = np.unique(cold_addrs, return_inverse=True)
        w2 = time.perf_counter()
        b0 = dev.bytes_read
        records = dev.read_records(uniq, eng.layout.record_bytes)
        nbytes += dev.bytes_read - b0
        w3 = time.perf_counter()
        K.finish_cold(idx.slot_keys, idx.slot_addrs, log.words, log.dirty, log.geo, log.marks,
                      k, cold, cold_addrs, records.view(np.int64), records.view(eng.dtype),
                      rec_index, 0, True, out, 0, eng.policy.counters)
        w4 = time.perf_counter()
        for name, dt in zip(("read_resident", "unique", "device.read_records", "finish_cold"),
                            (w1 - w0, w2 - w1, w3 - w2, w4 - w3)):
            parts[name] += dt
    for name, total in parts.items():
        print(f"  {name:30s} {total / n_batches * 1e3:8.2f} ms/batch")
    print(f"  device bytes read per row      {nbytes / (n_batches * BATCH):8.0f}")
    s.close()
    benchlib.rmtree(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--disk-rows", type=int, default=1 << 21)
    ap.add_argument("--disk-memory", type=int, default=64 << 20)
    ap.add_argument("--skip-disk", action="store_true")
    args = ap.parse_args()
    print(f"loadavg {os.getloadavg()}  nproc {os.cpu_count()}")
    resident(args.rows)
    if not args.skip_disk:
        disk(args.disk_rows, args.disk_memory)


if __name__ == "__main__":
    main()
