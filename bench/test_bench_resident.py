"""Resident rows: the table fits in ``memory_bytes``.

mlkv ``get``/``put`` of batches of 4,096 keys against:

- the ceiling: an ``@njit`` gather/scatter on a dense numpy array with the same row ids (no
  index, no log), allocating the output like ``get`` does;
- rocksdict: ``Rdict.get(list)`` (multi-get) and a ``WriteBatch`` per batch, block cache =
  ``memory_bytes``, data in the OS page cache;
- lmdb: ``Cursor.getmulti`` / ``Cursor.putmulti`` in one transaction per batch, sync off,
  ``writemap``.

Every system goes from numpy keys to a ``[n, 64]`` float32 array (or from numpy rows to the
store): key encoding (8-byte big-endian) and row decoding are part of their timings, as they
are part of what an embedding table built on them costs. Puts write the rows' own values, so
the table's content never changes and every ``get`` is checked against it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import benchlib
from benchlib import DISTS

SYSTEMS = ("ceiling", "mlkv", "rocksdict", "lmdb")


@pytest.fixture(scope="module")
def resident_tables(sizes, bench_dir):
    """``table(name)``: the resident table of one system, built on first use."""
    built = {}
    root = os.path.join(bench_dir, "resident")

    def table(name):
        if name in built:
            return built[name]
        n = sizes.resident_rows
        if name == "ceiling":
            t = benchlib.DenseTable(n)
        elif name == "mlkv":
            t = benchlib.MlkvTable(os.path.join(root, "mlkv"), memory_bytes=sizes.resident_memory,
                                   create=True)
            t.load(n)
        elif name == "rocksdict":
            t = benchlib.RocksTable(os.path.join(root, "rocksdict"),
                                    block_cache_bytes=sizes.resident_memory)
            t.load(n)
        elif name == "lmdb":
            t = benchlib.LmdbTable(os.path.join(root, "lmdb"))
            t.load(n)
        else:
            raise ValueError(name)
        built[name] = t
        return t

    yield table
    for t in built.values():
        t.close()


def _extra(system, table):
    if system != "mlkv":
        return {}
    st = table.stats()
    return {"policy": st["policy"], "mlkv_hits": st["hits"], "mlkv_misses": st["misses"],
            "addresses": st["addresses"]}


def _rounds(sizes, dist, with_values=False):
    # the same seed for every system and op: all see the same key sequence
    return benchlib.Rounds(dist, sizes.resident_rows, sizes.resident_batches,
                           seed=100 + DISTS.index(dist), with_values=with_values)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("system", SYSTEMS)
def test_resident_get(benchmark, resident_tables, sizes, system, dist):
    table = resident_tables(system)
    rounds = _rounds(sizes, dist)
    cpu = benchlib.CpuClock()
    warmup = 0 if sizes.smoke else 1

    def run(keys):
        with cpu:
            for k in keys:
                out = table.get(k)
        return out

    out = benchmark.pedantic(run, setup=rounds.setup, rounds=sizes.rounds, warmup_rounds=warmup)
    np.testing.assert_array_equal(out, benchlib.row_values(rounds.last[-1]))
    benchlib.record(benchmark, rounds.rows_per_round, cpu=cpu, warmup=warmup,
                    scenario="resident", op="get",
                    dist=dist, system=system, rows=sizes.resident_rows,
                    memory_bytes=sizes.resident_memory, **_extra(system, table))


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("system", SYSTEMS)
def test_resident_put(benchmark, resident_tables, sizes, system, dist):
    table = resident_tables(system)
    rounds = _rounds(sizes, dist, with_values=True)
    cpu = benchlib.CpuClock()
    warmup = 0 if sizes.smoke else 1

    def run(keys, values):
        with cpu:
            for k, v in zip(keys, values):
                table.put(k, v)

    benchmark.pedantic(run, setup=rounds.setup, rounds=sizes.rounds, warmup_rounds=warmup)
    k = rounds.last[0]
    np.testing.assert_array_equal(table.get(k), benchlib.row_values(k))
    benchlib.record(benchmark, rounds.rows_per_round, cpu=cpu, warmup=warmup,
                    scenario="resident", op="put",
                    dist=dist, system=system, rows=sizes.resident_rows,
                    memory_bytes=sizes.resident_memory, **_extra(system, table))
