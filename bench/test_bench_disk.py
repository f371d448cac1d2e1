"""A table ``MLKV_BENCH_DISK_FACTOR`` (8) times larger than ``memory_bytes``, read cold.

Both systems get the same memory: mlkv's buffer pool is ``memory_bytes``; rocksdict's block
cache is ``memory_bytes`` with ``use_direct_reads`` (and direct flush/compaction), so neither
has the OS page cache as a second cache. Before each run the store's page cache is dropped
(``sync``, then ``POSIX_FADV_DONTNEED`` on every file; the whole machine's with
``MLKV_BENCH_DROP_CACHES=1`` as root), checked with ``fincore`` (``page_cache_bytes_before``),
and the store is opened afresh, so the run starts cold.

A run is one warm-up round (reported as ``cold_rows_per_s``, not timed by pytest-benchmark)
and ``MLKV_BENCH_DISK_ROUNDS`` timed rounds of ``MLKV_BENCH_DISK_BATCHES`` batches of 4,096
``get`` keys, fresh keys every round (the same sequence for every system).
``disk_bytes_per_row`` is the growth of ``read_bytes`` in ``/proc/self/io`` (bytes the
process, all threads, made the block layer fetch) over the timed rounds divided by their rows.
mlkv runs with policy ``fifo`` (reads never copied to memory) and ``second_chance`` (every row
read is copied to the tail, so it stays in memory for another trip round the buffer pool); a
second_chance run works on a copy of the built store, since it appends to the log.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

import benchlib
from benchlib import DIM, DISTS

SYSTEMS = (("mlkv", "fifo"), ("mlkv", "second_chance"), ("rocksdict", None))


@pytest.fixture(scope="module")
def disk_stores(sizes, bench_dir):
    """``built(system) -> path`` of the table built once per system (closed, on disk)."""
    root = os.path.join(bench_dir, "disk")
    built = {}

    def build(system):
        if system in built:
            return built[system]
        path = os.path.join(root, system)
        if system == "mlkv":
            t = benchlib.MlkvTable(path, memory_bytes=sizes.disk_memory, policy="fifo",
                                   create=True)
        else:
            t = benchlib.RocksTable(path, block_cache_bytes=sizes.disk_memory, direct=True)
        t.load(sizes.disk_rows)
        t.close()
        built[system] = path
        return path

    return build


def _open(system, policy, path, sizes):
    if system == "mlkv":
        return benchlib.MlkvTable(path, memory_bytes=sizes.disk_memory, policy=policy)
    return benchlib.RocksTable(path, block_cache_bytes=sizes.disk_memory, direct=True)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("system,policy", SYSTEMS,
                         ids=[f"{s}-{p}" if p else s for s, p in SYSTEMS])
def test_disk_get(benchmark, disk_stores, sizes, bench_dir, system, policy, dist):
    template = disk_stores(system)
    path = template
    if system == "mlkv" and policy != "fifo":
        path = os.path.join(bench_dir, "disk", f"run-{policy}-{dist}")
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(template, path)
    rounds = benchlib.Rounds(dist, sizes.disk_rows, sizes.disk_batches,
                             seed=200 + DISTS.index(dist))
    drop = benchlib.drop_page_cache([path])
    cached_before = benchlib.page_cache_bytes([path])
    table = _open(system, policy, path, sizes)
    mlkv = system == "mlkv"
    direct = bool(table.store.engine.device.direct) if mlkv else None
    calls = []  # per call (seconds, rows, read_bytes, hits, misses, store bytes_read)

    def run(keys):
        s0 = table.stats() if mlkv else None
        io0, t0 = benchlib.read_bytes(), time.perf_counter()
        for k in keys:
            out = table.get(k)
        dt, io = time.perf_counter() - t0, benchlib.read_bytes() - io0
        s1 = table.stats() if mlkv else None
        calls.append((dt, len(keys) * k.shape[0], io) + (
            (s1["hits"] - s0["hits"], s1["misses"] - s0["misses"],
             s1["bytes_read"] - s0["bytes_read"]) if mlkv else (0, 0, 0)))
        return out

    warmup = 0 if sizes.smoke else 1
    try:
        out = benchmark.pedantic(run, setup=rounds.setup, rounds=sizes.disk_rounds,
                                 warmup_rounds=warmup)
        np.testing.assert_array_equal(out, benchlib.row_values(rounds.last[-1]))
        final = table.stats() if mlkv else None
    finally:
        cached_after = benchlib.page_cache_bytes([path])
        table.close()
    timed = calls[warmup:] or calls
    rows = sum(c[1] for c in timed)
    info = dict(scenario="disk", op="get", dist=dist, system=system, policy=policy,
                rows=sizes.disk_rows, memory_bytes=sizes.disk_memory,
                table_bytes=sizes.disk_rows * DIM * 4, page_cache_drop=drop,
                page_cache_bytes_before=cached_before, page_cache_bytes_after=cached_after,
                disk_bytes_per_row=sum(c[2] for c in timed) / rows,
                cold_rows_per_s=calls[0][1] / calls[0][0] if warmup else None,
                cold_disk_bytes_per_row=calls[0][2] / calls[0][1] if warmup else None,
                disk_footprint_bytes=benchlib.dir_bytes(path))
    if mlkv:
        hits, misses = sum(c[3] for c in timed), sum(c[4] for c in timed)
        info.update(hit_ratio=hits / max(1, hits + misses),
                    cold_hit_ratio=calls[0][3] / max(1, calls[0][1]) if warmup else None,
                    store_bytes_read_per_row=sum(c[5] for c in timed) / rows,
                    direct_io=direct,
                    addresses=final["addresses"])
    benchlib.record(benchmark, rounds.rows_per_round, **info)
    if path != template:
        shutil.rmtree(path, ignore_errors=True)
