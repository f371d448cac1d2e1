"""A table larger than memory: every row comes back, and memory stays bounded.

Issue 2: "A table of at least 1 GiB with ``memory_bytes`` of 64 MiB: every row read back
correct; the process's resident memory grows by no more than ``memory_bytes`` + the index +
64 MiB, and the page-cache pages of the store's files (fincore, or mincore) stay under the same
bound."

Two runs, each in a fresh Python process (so the numbers do not depend on what earlier tests
left in this process's heap, and pytest's own memory stays out of them):

- ``direct``: 2**22 rows of dim 64 float32 (272-byte records, 1.06 GiB), O_DIRECT segments;
- ``buffered``: 2**20 rows (272 MiB) with the buffered fallback forced (posix_fadvise DONTNEED),
  read in gets of 65,536 keys (the direct run uses 16,384).

Each run writes every row with ``put``, reads every row back in a pseudo-random order with
``get`` and compares exactly, closes, reopens (``store = mlkv.open(path)``, the usual way) and
reads every row again in another random order, then closes.

How the test keeps itself out of the measurement:

- Rows are never held by the test: key of row ``i`` is a bijective 64-bit mix of ``i``, and
  ``value[j]`` 24 hashed bits of ``(key, j)`` (exact in float32), both computed per batch by
  small Numba functions into one reused buffer (4 MiB, 16 MiB for 65,536 keys) that is
  allocated and touched before the baseline. The arrays ``get`` returns count as growth.
- Read order: position ``p`` reads row ``perm_salt(p)``, an invertible mix of the row number (no
  permutation array held). The second pass uses another salt: after the first pass the default
  policy has copied every row to the tail in first-pass order, so repeating that order would
  read the log sequentially.
- mlkv's and the test's Numba kernels are loaded on a small store first, so the baseline RSS
  already holds the JIT; the bound is about the table.

Measured per phase: ``VmRSS`` at its end; the peak during it (``VmHWM``, reset through
``/proc/self/clear_refs`` at each phase start, plus a thread sampling RSS every 10 ms); the
page-cache bytes of every file in the store directory (``mincore``, see ``memory_probe``) at
its end and sampled every 0.25 s during it. "The index" in the bound is
``stats()["index_bytes"]`` at its largest.

Reproduce: ``pytest -m slow tests/test_large_table.py -s`` (``-s`` prints the phase tables).
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import shutil
import subprocess
import sys
import time

import numba
import numpy as np
import pytest

import mlkv
from memory_probe import (RssSampler, files_under, page_cache_bytes, peak_rss_bytes,
                          reset_peak_rss, rss_bytes)

MiB = 1 << 20
GiB = 1 << 30

DIM = 64
MEMORY_BYTES = 64 * MiB
SLACK = 64 * MiB
WRITE_BATCH = 16384
#: mode -> (log2 of the rows, rows per get). The buffered run reads in batches of 65,536 keys:
#: its segment pages pass through the page cache, so that is where a batch-sized burst shows.
RUNS = {"direct": (22, 16384), "buffered": (20, 65536)}
CHILD_TIMEOUT = 1500

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="measures memory through Linux /proc and mincore")


# ---- deterministic rows, computed per batch ---------------------------------------------------
@numba.njit(cache=False)
def _mix64(x):
    # splitmix64 finalizer: a bijection of uint64
    x = np.uint64(x)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


@numba.njit(cache=False)
def _keys_of(rows, out):
    """Key of row ``i``: a bijective mix of ``i`` (distinct rows get distinct keys)."""
    for t in range(rows.shape[0]):
        out[t] = np.int64(_mix64(np.uint64(rows[t]) + np.uint64(0x9E3779B97F4A7C15)))


@numba.njit(cache=False)
def _values_of(keys, out):
    """``out[t, j]``: 24 hashed bits of ``(keys[t], j)`` as a float32 in [-0.5, 0.5), exact."""
    for t in range(keys.shape[0]):
        base = _mix64(np.uint64(keys[t]))
        for j in range(out.shape[1]):
            h = _mix64(base + np.uint64(j) * np.uint64(0xD1B54A32D192ED03))
            out[t, j] = np.float32(np.int64(h >> np.uint64(40)) - (1 << 23)) * np.float32(
                1.0 / (1 << 24))


@numba.njit(cache=False)
def _perm(positions, bits, salt, out):
    """A pseudo-random permutation of ``[0, 2**bits)``, one per ``salt``: rounds of an odd
    multiply, an xor-shift and an add, each a bijection modulo ``2**bits``."""
    mask = np.uint64((1 << bits) - 1)
    half = np.uint64(bits // 2 + 1)
    s = _mix64(np.uint64(salt))
    for t in range(positions.shape[0]):
        x = np.uint64(positions[t])
        for r in range(3):
            odd = (np.uint64(0x2545F4914F6CDD1D) + np.uint64(2 * r) + (s << np.uint64(1)))
            x = (x * odd) & mask
            x ^= x >> half
            x = (x + s + np.uint64(0x5851F42D4C957F2D * (r + 1))) & mask
        out[t] = np.int64(x)


@numba.njit(cache=False)
def _count_mismatches(got, want):
    bad = 0
    for t in range(got.shape[0]):
        for j in range(got.shape[1]):
            if got[t, j] != want[t, j]:
                bad += 1
                break
    return bad


class Rows:
    """Batches of (keys, expected values) for a table of ``2**bits`` rows.

    The batch buffers are the test's own memory: they are allocated and touched here, before
    the baseline is taken, so that they are not counted as the store's growth.
    """

    def __init__(self, bits: int, batch: int):
        self.bits = bits
        self.n = 1 << bits
        self.keys = np.full(batch, -1, dtype=np.int64)
        self.rows = np.full(batch, -1, dtype=np.int64)
        self.values = np.full((batch, DIM), np.nan, dtype=np.float32)

    def in_order(self, lo: int, hi: int):
        rows = self.rows[:hi - lo]
        rows[:] = np.arange(lo, hi)
        return self._fill(rows)

    def shuffled(self, lo: int, hi: int, salt: int):
        """Rows ``perm_salt(lo..hi)``: a batch of a pass over the table in random order."""
        rows = self.rows[:hi - lo]
        rows[:] = np.arange(lo, hi)
        _perm(rows, self.bits, salt, rows)
        return self._fill(rows)

    def _fill(self, rows):
        keys, values = self.keys[:rows.shape[0]], self.values[:rows.shape[0]]
        _keys_of(rows, keys)
        _values_of(keys, values)
        return keys, values


def _check_generators():
    """The generators are what the test relies on: distinct keys, a true permutation."""
    rows = np.arange(1 << 16, dtype=np.int64)
    keys = np.empty_like(rows)
    _keys_of(rows, keys)
    assert np.unique(keys).shape[0] == rows.shape[0]
    perm, perm2 = np.empty_like(rows), np.empty_like(rows)
    _perm(rows, 16, 1, perm)
    _perm(rows, 16, 2, perm2)
    assert np.array_equal(np.sort(perm), rows)
    assert np.array_equal(np.sort(perm2), rows)
    assert np.abs(np.diff(perm)).mean() > 1000          # not a near-sequential order
    # the second pass must not follow the first (after a pass, rows sit in the log in the
    # order the first pass read them: the same order again would read the disk sequentially)
    log_position = np.argsort(perm)[perm2]    # where pass 2's rows sit after pass 1
    assert np.abs(np.diff(log_position)).mean() > 1000
    vals = np.empty((4, DIM), dtype=np.float32)
    _values_of(keys[:4], vals)
    assert np.unique(vals).shape[0] == vals.size


# ---- measurement ------------------------------------------------------------------------------
class Meter:
    """Phase-by-phase RSS and page-cache numbers, relative to a baseline.

    ``mark(name)`` closes a phase: it records the RSS now, the peak RSS during the phase
    (``VmHWM``, reset at each mark, and the sampling thread), and the page-cache bytes of the
    store's files now and at most during the phase (sampled).
    """

    def __init__(self, store_dir):
        self.store_dir = store_dir
        gc.collect()
        self.hwm_ok = reset_peak_rss()
        self.base = rss_bytes()
        self.phases = []
        self.sampler = RssSampler(interval=0.01, files=self.files, cache_interval=0.25)

    def files(self):
        return files_under(self.store_dir) if os.path.isdir(self.store_dir) else []

    def mark(self, name, store=None, seconds=None):
        now = rss_bytes()
        self.sampler.sample_now()
        peak = max(peak_rss_bytes() if self.hwm_ok else 0, self.sampler.peak_rss, now)
        files = self.files()
        self.phases.append(dict(
            phase=name, rss=now - self.base, peak=peak - self.base,
            cache=page_cache_bytes(files),
            seg_cache=page_cache_bytes([f for f in files if f.endswith(".log")]),
            cache_peak=self.sampler.peak_page_cache,
            index=None if store is None else store.stats()["index_bytes"], seconds=seconds))
        # the next phase's peaks start from here
        if self.hwm_ok:
            reset_peak_rss()
        self.sampler.peak_rss = rss_bytes()
        self.sampler.peak_page_cache = 0


def format_table(result, bound) -> str:
    lines = [f"{result['mode']} I/O: {result['rows']} rows, {result['table_bytes'] / MiB:.0f} "
             f"MiB of records, gets of {result['read_batch']} keys, log on disk "
             f"{result['disk_bytes'] / MiB:.0f} MiB, index {result['index_bytes'] / MiB:.0f} MiB, "
             f"{result['seconds']:.1f} s",
             f"baseline RSS {result['base'] / MiB:.1f} MiB; bound {bound / MiB:.1f} MiB = "
             f"memory_bytes {MEMORY_BYTES / MiB:.0f} + index + {SLACK / MiB:.0f}; VmHWM reset "
             f"{'used' if result['hwm_ok'] else 'refused (RSS sampling only)'}",
             f"{'phase (MiB over baseline)':<28}{'RSS':>8}{'peak':>8}{'cache':>8}"
             f"{'seg':>6}{'cache pk':>10}{'index':>7}{'time s':>8}"]
    for p in result["phases"]:
        idx = "-" if p["index"] is None else f"{p['index'] / MiB:.0f}"
        sec = "-" if p["seconds"] is None else f"{p['seconds']:.1f}"
        lines.append(f"{p['phase']:<28}{p['rss'] / MiB:>8.1f}{p['peak'] / MiB:>8.1f}"
                     f"{p['cache'] / MiB:>8.1f}{p['seg_cache'] / MiB:>6.1f}"
                     f"{p['cache_peak'] / MiB:>10.1f}{idx:>7}{sec:>8}")
    return "\n".join(lines)


def _open_mode(path, mode, **kwargs):
    """``mlkv.open`` with the I/O mode forced: ``direct_io=True`` or ``False`` (buffered)."""
    store = mlkv.open(path, direct_io=(mode == "direct"), **kwargs)
    assert store.engine.device.direct is (mode == "direct")
    return store


# ---- the run (in a child process) --------------------------------------------------------------
def run_table(directory, mode, bits, read_batch) -> dict:
    """Write ``2**bits`` rows, read them all back in random order, close, reopen, read again.

    Correctness is asserted here; the memory numbers are returned for the parent to judge.
    """
    t0 = time.perf_counter()
    store_dir = os.path.join(directory, "table")
    warm_dir = os.path.join(directory, "warm")
    try:
        _warm_up_mode(warm_dir, mode)
        rows = Rows(bits, max(WRITE_BATCH, read_batch))
        meter = Meter(store_dir)
        with meter.sampler:
            t = time.perf_counter()
            store = _open_mode(store_dir, mode, dim=DIM, memory_bytes=MEMORY_BYTES)
            if mode == "direct":
                assert store.engine.device.direct, f"O_DIRECT not available in {directory}"
            meter.mark("open (new)", store, time.perf_counter() - t)

            t = time.perf_counter()
            for lo in range(0, rows.n, WRITE_BATCH):
                store.put(*rows.in_order(lo, min(lo + WRITE_BATCH, rows.n)))
            st = store.stats()
            assert st["rows"] == rows.n
            table_bytes = rows.n * st["record_bytes"]
            meter.mark("put all", store, time.perf_counter() - t)

            t = time.perf_counter()
            bad = _read_all(store, rows, read_batch, salt=1)
            assert bad == 0, f"{bad} of {rows.n} rows read back wrong"
            st = store.stats()
            assert st["misses"] > rows.n // 2, "the reads were not served from disk"
            index_bytes = st["index_bytes"]
            meter.mark("get all (random order)", store, time.perf_counter() - t)

            t = time.perf_counter()
            store.close()
            meter.mark("close", None, time.perf_counter() - t)

            # The usual way to reopen: the closed Store object is still referenced by `store`
            # while the new one opens.
            t = time.perf_counter()
            store = _open_mode(store_dir, mode)
            assert len(store) == rows.n
            meter.mark("reopen", store, time.perf_counter() - t)

            t = time.perf_counter()
            bad = _read_all(store, rows, read_batch, salt=2)
            assert bad == 0, f"{bad} of {rows.n} rows read back wrong after reopen"
            index_bytes = max(index_bytes, store.stats()["index_bytes"])
            disk_bytes = store.stats()["disk_bytes"]
            meter.mark("get all after reopen", store, time.perf_counter() - t)

            t = time.perf_counter()
            store.close()
            meter.mark("close again", None, time.perf_counter() - t)
            del store
            gc.collect()
            meter.mark("store object dropped")
        return dict(mode=mode, rows=rows.n, read_batch=read_batch, table_bytes=table_bytes,
                    index_bytes=index_bytes,
                    disk_bytes=disk_bytes, base=meter.base, hwm_ok=meter.hwm_ok,
                    phases=meter.phases, seconds=time.perf_counter() - t0)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
        shutil.rmtree(warm_dir, ignore_errors=True)


def _warm_up_mode(directory, mode):
    _check_generators()
    rows = Rows(12, 4096)
    store = _open_mode(directory, mode, dim=DIM, memory_bytes=16 * 4096 * 2)
    for lo in range(0, rows.n, 1024):
        store.put(*rows.in_order(lo, lo + 1024))
    keys, want = rows.shuffled(0, 4096, salt=1)
    assert _count_mismatches(store.get(keys), want) == 0
    store.close()
    store = _open_mode(directory, mode)
    keys, want = rows.shuffled(0, 4096, salt=1)
    assert _count_mismatches(store.get(keys), want) == 0
    store.close()
    del store
    shutil.rmtree(directory)


def _read_all(store, rows, batch, salt) -> int:
    bad = 0
    for lo in range(0, rows.n, batch):
        keys, want = rows.shuffled(lo, min(lo + batch, rows.n), salt)
        bad += _count_mismatches(store.get(keys), want)
    return bad


def _child_main(directory, mode, bits, read_batch, out_path):
    result = run_table(directory, mode, bits, read_batch)
    with open(out_path, "w") as f:
        json.dump(result, f)


def _run_in_child(directory, mode, bits, read_batch) -> dict:
    out_path = os.path.join(directory, "result.json")
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_large_table as t; "
            f"t._child_main({str(directory)!r}, {mode!r}, {bits}, {read_batch}, {out_path!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, (f"the {mode} run failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    with open(out_path) as f:
        return json.load(f)


def check_bounds(result) -> list[str]:
    """Every way the run broke the bound (or close() kept memory), as sentences."""
    bound = MEMORY_BYTES + result["index_bytes"] + SLACK
    violations = []
    for p in result["phases"]:
        if p["rss"] > bound:
            violations.append(f"RSS after '{p['phase']}' grew {p['rss'] / MiB:.1f} MiB")
        if p["peak"] > bound:
            violations.append(f"peak RSS during '{p['phase']}' grew {p['peak'] / MiB:.1f} MiB")
        if max(p["cache"], p["cache_peak"]) > bound:
            violations.append(f"page cache of the store's files during '{p['phase']}' reached "
                              f"{max(p['cache'], p['cache_peak']) / MiB:.1f} MiB")
        if p["phase"].startswith("close") and p["rss"] > SLACK:
            # Store.close(): "Checkpoint (unless read-only) and release memory, files and the lock"
            violations.append(f"after '{p['phase']}' {p['rss'] / MiB:.1f} MiB stay resident: "
                              f"close() does not release the buffer pool and index")
    return violations


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(RUNS))
def test_large_table_rows_and_memory_bounded(tmp_path, mode):
    """Every row comes back exactly (twice, around a reopen) and memory stays bounded."""
    bits, read_batch = RUNS[mode]
    directory = tmp_path / mode
    directory.mkdir()
    try:
        result = _run_in_child(directory, mode, bits, read_batch)
    finally:
        shutil.rmtree(directory, ignore_errors=True)    # over 1 GiB: never leave it behind
    assert not directory.exists()
    assert result["table_bytes"] >= (GiB if mode == "direct" else 256 * MiB)
    bound = MEMORY_BYTES + result["index_bytes"] + SLACK
    report = format_table(result, bound)
    print("\n" + report)
    violations = check_bounds(result)
    assert not violations, (f"{mode} I/O: over the bound of {bound / MiB:.1f} MiB:\n  "
                            + "\n  ".join(violations) + "\n" + report)


def test_memory_probe_sees_what_it_measures(tmp_path):
    """The probes can fail: they see a file's cached pages, an allocation and its peak."""
    path = tmp_path / "probe.bin"
    with open(path, "wb") as f:
        f.write(b"\x01" * (8 * MiB))                       # buffered: lands in the page cache
        f.flush()
        os.fsync(f.fileno())
    cached = page_cache_bytes([path])
    assert 7 * MiB <= cached <= 8 * MiB, cached
    if shutil.which("fincore"):                            # util-linux agrees
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              str(path)], capture_output=True, text=True, check=True).stdout
        assert abs(int(out.split()[0]) - cached) <= 1 * MiB
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert page_cache_bytes([path]) <= 64 << 10
        os.pread(fd, 1 * MiB, 2 * MiB)
        assert 1 * MiB <= page_cache_bytes([path]) <= 4 * MiB   # what was read (+ readahead)
    finally:
        os.close(fd)

    gc.collect()
    hwm_ok = reset_peak_rss()
    before = rss_bytes()
    with RssSampler(interval=0.005) as sampler:
        # A fresh anonymous map, not malloc: malloc may hand back memory already resident
        # from earlier tests in this process, which would not move RSS.
        region = mmap.mmap(-1, 48 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        block = np.frombuffer(region, dtype=np.uint8)
        block[:] = 1                                       # touched: resident
        assert rss_bytes() - before >= 40 * MiB
        time.sleep(0.1)                                    # the sampler's turn
        del block
        region.close()
    assert rss_bytes() - before < 24 * MiB                 # unmapped: gone
    assert sampler.peak_rss - before >= 40 * MiB
    if hwm_ok:
        assert peak_rss_bytes() - before >= 40 * MiB
