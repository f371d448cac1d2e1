"""``mlkv demo``: a table eight times larger than its memory budget, then a model trained on it.

The store part (:func:`run`) writes ``table_rows`` rows whose values are a function of the
key (so the demo never keeps the table in memory itself), reads every row back in random
batches, checks each one, and prints rows/s, disk bytes read per row and the process's
resident memory. The training part (:mod:`mlkv.demo_train`) trains a rating model on
MovieLens-100K with its tables in memory and with them in mlkv stores a fraction of which
fits in memory, and compares the two. :func:`main` runs both, as the ``mlkv demo`` command.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import numpy as np

from .store import open as open_store

MiB = 1 << 20


def expected_rows(keys: np.ndarray, dim: int) -> np.ndarray:
    """The demo's row for each key: distinct per (key, column), exactly representable."""
    cols = np.arange(dim, dtype=np.float64)
    return ((keys[:, None] % 100_003) * 0.5 + cols[None, :] * 0.25).astype(np.float32)


def rss_bytes() -> int:
    """Resident memory of this process (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def disk_read_bytes() -> int:
    """Bytes this process caused to be read from storage (``read_bytes`` of /proc/self/io)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _warm_up(path: str, dim: int) -> None:
    """Compile (or load) every kernel the demo uses on a tiny store, outside the timings."""
    with open_store(path, dim=dim, memory_bytes=4 << 12, page_bits=12) as store:
        keys = np.arange(256, dtype=np.int64)
        store.put(keys, expected_rows(keys, dim))
        store.get(keys[::-1])


def run(memory_mib: int = 32, ratio: int = 8, dim: int = 64, batch: int = 4096,
        path: str | None = None, seed: int = 0, out=print) -> dict:
    """Run the demo; returns the measured figures."""
    memory_bytes = memory_mib * MiB
    owned = path is None
    path = path or tempfile.mkdtemp(prefix="mlkv-demo-")
    try:
        t0 = time.perf_counter()
        _warm_up(os.path.join(path, "warm-up"), dim)
        out(f"mlkv demo: kernels ready in {time.perf_counter() - t0:.1f} s "
            f"(compiled on first use, then loaded from the Numba cache)")
        rss0 = rss_bytes()
        store = open_store(os.path.join(path, "table"), dim=dim, memory_bytes=memory_bytes)
        rows = ratio * memory_bytes // store.layout.record_bytes
        out(f"  {rows:,} rows of {dim} float32 "
            f"({rows * store.layout.record_bytes / MiB:,.0f} MiB of records) "
            f"with a {memory_mib} MiB buffer pool, in {path}")
        t0 = time.perf_counter()
        for lo in range(0, rows, batch):
            keys = np.arange(lo, min(lo + batch, rows), dtype=np.int64)
            store.put(keys, expected_rows(keys, dim))
        write_s = time.perf_counter() - t0
        out(f"  write: {rows / write_s:12,.0f} rows/s")

        order = np.random.default_rng(seed).permutation(rows).astype(np.int64)
        read0, stats0 = disk_read_bytes(), store.stats()
        peak_rss = 0
        bad = 0
        t0 = time.perf_counter()
        for lo in range(0, rows, batch):
            keys = order[lo:lo + batch]
            bad += int((store.get(keys) != expected_rows(keys, dim)).any(axis=1).sum())
            if lo % (64 * batch) == 0:
                peak_rss = max(peak_rss, rss_bytes())
        read_s = time.perf_counter() - t0
        stats = store.stats()
        disk_bytes = disk_read_bytes() - read0
        store_bytes = stats["bytes_read"] - stats0["bytes_read"]
        peak_rss = max(peak_rss, rss_bytes())
        out(f"  read:  {rows / read_s:12,.0f} rows/s in random batches of {batch}, "
            f"{rows:,} rows checked, {bad} wrong")
        out(f"  disk:  {disk_bytes / rows:,.0f} bytes read from storage per row "
            f"(the store read {store_bytes / rows:,.0f}); "
            f"{(stats['hits'] - stats0['hits']) / rows:.1%} of rows were in memory")
        out(f"  memory: resident {peak_rss / MiB:,.0f} MiB at peak, "
            f"{(peak_rss - rss0) / MiB:,.0f} MiB above the start "
            f"(budget {memory_mib} MiB + index {stats['index_bytes'] / MiB:,.0f} MiB)")
        store.close()
        if bad:
            raise SystemExit(f"mlkv demo: {bad} rows read back wrong")
        return {"rows": rows, "write_rows_per_s": rows / write_s,
                "read_rows_per_s": rows / read_s, "disk_bytes_per_row": disk_bytes / rows,
                "peak_rss_bytes": peak_rss, "rss_growth_bytes": peak_rss - rss0, "wrong": bad}
    finally:
        if owned:
            shutil.rmtree(path, ignore_errors=True)


def main(store: dict | None = None, train: dict | None = None, path: str | None = None,
         out=print) -> int:
    """Run the demo's parts; returns the command's exit status.

    Parameters
    ----------
    store, train : dict or None
        Keyword arguments of :func:`run` (the store part) and of
        :func:`mlkv.demo_train.run` (the training part); None skips that part.
    path : str, optional
        Keep the stores under this directory (default: temporary directories, removed).
    out : callable
        Receives each line of the report (failures go to stderr too).

    Returns
    -------
    int
        0 when every part that ran passed; 1 when the training part's RMSEs are further
        apart than its tolerance, or when it was the only part asked for and could not run
        (torch or the recbole wheel missing: it says what to install). A row read back wrong
        exits through ``SystemExit`` in :func:`run`.
    """
    t0 = time.perf_counter()
    if store is not None:
        run(**store, path=path, out=out)
    if train is not None:
        from . import demo_train
        out("mlkv demo, training: the same model with its tables in memory and in mlkv stores")
        result = demo_train.run(**train, path=path and os.path.join(path, "train"), out=out)
        if result["skipped"] is not None:
            if store is None:
                return 1
        elif not result["ok"]:
            message = (f"mlkv demo: FAILED: the mlkv model's test RMSE "
                       f"{result['rmse_mlkv']:.4f} is {result['relative_difference']:.2%} "
                       f"from the in-memory model's {result['rmse_memory']:.4f}, more than "
                       f"the {result['tolerance']:.0%} allowed")
            if out is not print:
                out(message)
            print(message, file=sys.stderr)
            return 1
    out(f"mlkv demo: done in {time.perf_counter() - t0:.0f} s")
    return 0
