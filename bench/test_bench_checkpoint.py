"""Cost of a checkpoint against the table size and the rows changed since the last one.

A checkpoint writes the dirty pages, the index file and the manifest, and fsyncs them. Rows
changed since the last checkpoint cost their pages; the index file costs 16 bytes a row.
``extra_info`` records seconds and bytes written (segments + index file) per checkpoint.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import benchlib

DIM = benchlib.DIM


@pytest.mark.parametrize("rows", [1 << 17, 1 << 20])
@pytest.mark.parametrize("changed_share", [0.0, 0.01, 0.1])
def test_checkpoint_cost(benchmark, sizes, bench_dir, rows, changed_share):
    rows = min(rows, 4096) if sizes.smoke else rows
    path = os.path.join(str(bench_dir), f"checkpoint-{rows}-{changed_share}")
    benchlib.rmtree(path)
    import mlkv
    store = mlkv.open(path, dim=DIM, memory_bytes=64 << 20, auto_compact=None)
    for lo in range(0, rows, 1 << 16):
        keys = np.arange(lo, min(rows, lo + (1 << 16)), dtype=np.int64)
        store.put(keys, benchlib.row_values(keys))
    store.checkpoint()
    rng = np.random.default_rng(0)
    n_changed = int(rows * changed_share)
    written = []

    def change():
        keys = rng.choice(rows, n_changed, replace=False).astype(np.int64)
        store.put(keys, benchlib.row_values(keys))
        written.append(store.stats()["bytes_written"])
        return (), {}

    def checkpoint():
        store.checkpoint()

    benchmark.pedantic(checkpoint, setup=change, rounds=3 if not sizes.smoke else 1,
                       iterations=1)
    pages_bytes = store.stats()["bytes_written"] - written[-1]
    index_bytes = 16 * len(store)
    benchmark.extra_info.update(rows=rows, rows_changed=n_changed, table_bytes=rows * 4 * DIM,
                                page_bytes_written=pages_bytes, index_bytes_written=index_bytes)
    store.close()
    benchlib.rmtree(path)
