"""Shared pieces of mlkv's benchmarks: key samplers, row data, the systems compared and OS
helpers. The summary of a run (rows/s and ratios) is in ``summary.py``.

Nothing here imports pytest: ``report.py`` uses it as a plain script.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import time

import numpy as np

DIM = 64
BATCH = 4096
ZIPF_A = 0.99
DISTS = ("uniform", "zipf")

# ---------------------------------------------------------------------------------------------
# keys and rows


class ZipfSampler:
    """Seeded Zipf(``a``) sampler over ``n`` keys, for any ``a >= 0`` (numpy's needs ``a > 1``).

    Rank ``r`` (1-based) has probability ``r**-a / H(n, a)``; ranks are drawn by inverse CDF
    (``searchsorted`` of uniform draws in the cumulative weights). Ranks are mapped to keys
    through a seeded permutation of ``[0, n)`` (a "scrambled" Zipf, as YCSB does), so the hot
    keys are spread over the whole key range and over the log instead of sitting in its first
    pages, which would flatter any store that lays rows out in key order.
    """

    def __init__(self, n: int, a: float = ZIPF_A, seed: int = 0, scramble: bool = True):
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = int(n)
        self.a = float(a)
        weights = np.arange(1, self.n + 1, dtype=np.float64) ** -self.a
        self.cdf = np.cumsum(weights)
        self.cdf /= self.cdf[-1]
        self.pmf = weights / weights.sum()
        self._rng = np.random.default_rng(seed)
        perm_rng = np.random.default_rng([seed, 0x5EED])
        self.key_of_rank = perm_rng.permutation(self.n).astype(np.int64) if scramble else \
            np.arange(self.n, dtype=np.int64)

    def ranks(self, size: int) -> np.ndarray:
        """0-based ranks (0 is the most frequent)."""
        u = self._rng.random(size)
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), self.n - 1)

    def __call__(self, size: int) -> np.ndarray:
        return self.key_of_rank[self.ranks(size)]


class UniformSampler:
    """Seeded uniform keys over ``[0, n)``."""

    def __init__(self, n: int, seed: int = 0):
        self.n = int(n)
        self._rng = np.random.default_rng(seed)

    def __call__(self, size: int) -> np.ndarray:
        return self._rng.integers(0, self.n, size, dtype=np.int64)


def sampler(dist: str, n: int, seed: int = 0):
    if dist == "uniform":
        return UniformSampler(n, seed)
    if dist == "zipf":
        return ZipfSampler(n, ZIPF_A, seed)
    raise ValueError(f"unknown key distribution {dist!r}")


def key_batches(dist: str, n: int, n_batches: int, seed: int = 0, batch: int = BATCH):
    """``n_batches`` int64 key arrays of ``batch`` keys each over ``[0, n)``."""
    draw = sampler(dist, n, seed)
    return [draw(batch) for _ in range(n_batches)]


class Rounds:
    """The key batches of successive benchmark rounds, drawn afresh for every round.

    Every system sees the same sequence (same seed), and no round replays an earlier one's
    keys: a replay would let a cache hold exactly the keys it is about to be asked for.
    Use as pytest-benchmark ``pedantic(setup=rounds.setup)``: round ``i``'s keys (and, with
    ``with_values``, their rows) are made before the round, outside its timing.
    """

    def __init__(self, dist: str, n: int, batches_per_round: int, seed: int,
                 with_values: bool = False):
        self._draw = sampler(dist, n, seed)
        self.batches_per_round = batches_per_round
        self.with_values = with_values
        self.last = None

    @property
    def rows_per_round(self) -> int:
        return self.batches_per_round * BATCH

    def setup(self):
        keys = [self._draw(BATCH) for _ in range(self.batches_per_round)]
        self.last = keys
        if self.with_values:
            return (keys, [row_values(k) for k in keys]), {}
        return (keys,), {}


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def row_values(keys: np.ndarray, dim: int = DIM) -> np.ndarray:
    """Deterministic, incompressible float32 rows in [-1, 1): ``row_values(k)`` is row ``k``.

    A splitmix64 hash of (key, column); any subset of rows can be regenerated for checks
    without keeping the whole table in memory.
    """
    with np.errstate(over="ignore"):
        x = keys.astype(np.uint64)[:, None] * _GOLDEN + \
            (np.arange(dim, dtype=np.uint64) + np.uint64(1))[None, :] * _M1
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        x ^= x >> np.uint64(31)
    return ((x >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -23) - np.float32(1.0))


# ---------------------------------------------------------------------------------------------
# the systems compared: one object per table with get(keys) -> [n, DIM] and put(keys, values)


def encode_keys(keys: np.ndarray) -> list:
    """Keys as 8-byte big-endian ``bytes`` (sorts like the integers for keys >= 0)."""
    return keys.astype(">i8").view("V8").tolist()


def encode_rows(values: np.ndarray) -> list:
    """Rows as raw little-endian float32 ``bytes``, one object per row."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return values.view(f"V{values.shape[1] * 4}").ravel().tolist()


def decode_rows(chunks, dim: int = DIM) -> np.ndarray:
    return np.frombuffer(b"".join(chunks), dtype=np.float32).reshape(-1, dim)


class DenseTable:
    """The ceiling: a dense numpy array indexed by row id, gathered/scattered by ``@njit`` loops."""

    name = "ceiling"

    def __init__(self, n: int, dim: int = DIM):
        import numba

        @numba.njit(nogil=True, boundscheck=False)
        def gather(table, ids, out):
            for i in range(ids.shape[0]):
                r = ids[i]
                for j in range(table.shape[1]):
                    out[i, j] = table[r, j]

        @numba.njit(nogil=True, boundscheck=False)
        def scatter(table, ids, values):
            for i in range(ids.shape[0]):
                r = ids[i]
                for j in range(table.shape[1]):
                    table[r, j] = values[i, j]

        self._gather, self._scatter = gather, scatter
        self.table = np.empty((n, dim), dtype=np.float32)
        for lo in range(0, n, 1 << 16):
            hi = min(n, lo + (1 << 16))
            self.table[lo:hi] = row_values(np.arange(lo, hi, dtype=np.int64), dim)
        probe = np.zeros(1, dtype=np.int64)
        self.put(probe, self.get(probe))  # compile outside the timings

    def get(self, keys):
        out = np.empty((keys.shape[0], self.table.shape[1]), dtype=np.float32)
        self._gather(self.table, keys, out)
        return out

    def put(self, keys, values):
        self._scatter(self.table, keys, values)

    def close(self):
        self.table = None


class MlkvTable:
    """An mlkv store, through its public API."""

    name = "mlkv"

    def __init__(self, path, memory_bytes=None, policy=None, dim=DIM, create=False):
        import mlkv
        kwargs = dict(memory_bytes=memory_bytes, policy=policy)
        if create:
            kwargs["dim"] = dim
        self.store = mlkv.open(path, **kwargs)

    def load(self, n: int, chunk: int = 1 << 16):
        for lo in range(0, n, chunk):
            keys = np.arange(lo, min(n, lo + chunk), dtype=np.int64)
            self.store.put(keys, row_values(keys, self.store.dim))

    def get(self, keys):
        return self.store.get(keys)

    def put(self, keys, values):
        self.store.put(keys, values)

    def stats(self):
        return self.store.stats()

    def close(self):
        self.store.close()


class RocksTable:
    """rocksdict in raw mode: ``Rdict.get(list)`` (multi-get) and ``WriteBatch`` puts.

    Generous settings: no compression (the rows are incompressible floats), WAL off (mlkv has
    no write-ahead log either: both are durable at their flush/checkpoint), ``sync`` off.
    ``block_cache_bytes`` sizes the LRU block cache; ``direct`` turns on ``use_direct_reads``
    (and direct flush/compaction) so the OS page cache holds none of the table.
    """

    name = "rocksdict"

    def __init__(self, path, block_cache_bytes=None, direct=False):
        from rocksdict import (BlockBasedOptions, Cache, DBCompressionType, Options, Rdict,
                               WriteOptions)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_compression_type(DBCompressionType.none())
        table = BlockBasedOptions()
        if block_cache_bytes:
            table.set_block_cache(Cache(int(block_cache_bytes)))
        opts.set_block_based_table_factory(table)
        if direct:
            opts.set_use_direct_reads(True)
            opts.set_use_direct_io_for_flush_and_compaction(True)
        self.path = path
        self.db = Rdict(path, options=opts)
        write_opts = WriteOptions()
        write_opts.disable_wal = True  # a property at runtime (the .pyi says a method)
        write_opts.sync = False
        self.db.set_write_options(write_opts)

    def load(self, n: int, chunk: int = 1 << 16):
        for lo in range(0, n, chunk):
            keys = np.arange(lo, min(n, lo + chunk), dtype=np.int64)
            self.put(keys, row_values(keys))
        self.db.flush(True)
        self.db.compact_range(None, None)

    def get(self, keys):
        return decode_rows(self.db.get(encode_keys(keys)))

    def put(self, keys, values):
        from rocksdict import WriteBatch
        batch = WriteBatch(raw_mode=True)
        for k, v in zip(encode_keys(keys), encode_rows(values)):
            batch.put(k, v)
        self.db.write(batch)

    def files(self):
        return [p for p in glob.glob(os.path.join(self.path, "*")) if os.path.isfile(p)]

    def close(self):
        self.db.close()


class LmdbTable:
    """LMDB: ``Cursor.getmulti`` in a read transaction, ``Cursor.putmulti`` in a write one.

    ``sync=False, metasync=False`` (no fsync at commit) and ``writemap=True`` (writes go
    straight to the shared mapping): the fastest settings py-lmdb offers for writes.
    """

    name = "lmdb"

    def __init__(self, path, map_size=8 << 30):
        import lmdb
        os.makedirs(path, exist_ok=True)
        self.env = lmdb.open(path, map_size=map_size, sync=False, metasync=False,
                             writemap=True, map_async=True, readahead=False)

    def load(self, n: int, chunk: int = 1 << 16):
        for lo in range(0, n, chunk):
            keys = np.arange(lo, min(n, lo + chunk), dtype=np.int64)
            with self.env.begin(write=True) as txn:
                txn.cursor().putmulti(zip(encode_keys(keys), encode_rows(row_values(keys))),
                                      append=True)

    def get(self, keys):
        with self.env.begin() as txn:
            found = txn.cursor().getmulti(encode_keys(keys))
            return decode_rows([v for _, v in found])

    def put(self, keys, values):
        with self.env.begin(write=True) as txn:
            txn.cursor().putmulti(list(zip(encode_keys(keys), encode_rows(values))))

    def close(self):
        self.env.close()


# ---------------------------------------------------------------------------------------------
# the OS


def read_bytes() -> int:
    """Bytes this process (all its threads) caused to be fetched from storage."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _files(paths):
    for top in paths:
        for root, _, names in os.walk(top):
            for name in names:
                yield os.path.join(root, name)


def drop_page_cache(paths) -> str:
    """Drop the page cache of every file under ``paths``; returns the method used.

    ``sync`` first (dirty pages cannot be dropped), then ``POSIX_FADV_DONTNEED`` on every file.
    With ``MLKV_BENCH_DROP_CACHES=1`` (and root) also ``echo 1 > /proc/sys/vm/drop_caches``:
    that drops the page cache of the whole machine, other processes' included, so it is not the
    default; per-file DONTNEED is enough for files nothing else holds open, and
    :func:`page_cache_bytes` checks it.
    """
    os.sync()
    for path in _files(paths):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if os.environ.get("MLKV_BENCH_DROP_CACHES") == "1":
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "fadvise+drop_caches"
        except OSError:
            pass
    return "fadvise"


def page_cache_bytes(paths) -> int | None:
    """Bytes of the files under ``paths`` in the page cache (util-linux ``fincore``), or None."""
    files = list(_files(paths))
    if not files or not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
                             capture_output=True, text=True, timeout=60).stdout
        return sum(int(x) for x in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def dir_bytes(path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def machine() -> dict:
    """nproc, CPU model, memory and the disk under ``MLKV_BENCH_DIR`` (or the temp dir)."""
    info = {"nproc": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            info["cpu"] = m.group(1).strip() if m else "?"
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemTotal:\s*(\d+) kB", f.read(), re.M)
            info["mem_gib"] = round(int(m.group(1)) / 2**20, 1)
    except OSError:
        pass
    where = os.environ.get("MLKV_BENCH_DIR") or "/tmp"
    try:
        out = subprocess.run(["df", "-hT", where], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()
        info["disk"] = " ".join(out[-1].split()[:3]) if len(out) > 1 else "?"
        dev = out[-1].split()[0] if len(out) > 1 else ""
        base = os.path.basename(dev)
        rot = f"/sys/block/{base}/queue/rotational"
        if os.path.exists(rot):
            with open(rot) as f:
                rotational = f.read().strip() == "1"
            info["disk"] += " (reports rotational)" if rotational else " (non-rotational)"
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    import numba
    import numpy
    info["numpy"], info["numba"] = numpy.__version__, numba.__version__
    try:  # the last commit that touched the engine, and whether it has uncommitted edits
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        git = ["git", "-C", repo]
        last = subprocess.run(git + ["log", "-1", "--format=%h %s", "--", "mlkv"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "mlkv"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["mlkv_commit"] = last + (" (+ uncommitted edits)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import lmdb
        import rocksdict  # noqa: F401
        from importlib.metadata import version
        info["rocksdict"], info["lmdb"] = version("rocksdict"), version("lmdb")
        info["lmdb_c"] = ".".join(map(str, lmdb.version()))
    except Exception:  # noqa: BLE001 -- optional
        pass
    return info


def rmtree(path):
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# recording

def per_batch_us(fn, items) -> float:
    """Mean µs of ``fn(item)`` over ``items`` (the second of two passes: the first warms up),
    for the scripts that time a step's parts (not the pytest benchmarks)."""
    for _ in range(2):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        elapsed = time.perf_counter() - t0
    return elapsed / len(items) * 1e6


class CpuClock:
    """CPU seconds of the calling thread per round, kept beside pytest-benchmark's wall times.

    On a shared machine a round's wall time includes time the thread sat descheduled; its CPU
    time does not. For single-threaded, CPU-bound rounds (the resident benchmarks: every
    system runs ``get``/``put`` on the calling thread) rows per CPU-second is the steadier
    number. Use ``with clock:`` around the body of a round.
    """

    def __init__(self):
        self.rounds = []
        self._t0 = 0.0

    def __enter__(self):
        self._t0 = time.thread_time()
        return self

    def __exit__(self, *exc):
        self.rounds.append(time.thread_time() - self._t0)


def record(benchmark, rows_per_round: int, cpu: CpuClock | None = None, warmup: int = 0,
           **info) -> None:
    """Name the benchmark's group and store rows/s and its parameters in ``extra_info``.

    ``info`` needs ``scenario``, ``op``, ``dist`` and ``system``; anything else is kept too.
    ``cpu``: the rounds' CPU times, the first ``warmup`` of them untimed warm-up rounds.
    """
    benchmark.group = " ".join(str(info[k]) for k in ("scenario", "op", "dist"))
    benchmark.extra_info.update(info)
    benchmark.extra_info["rows_per_round"] = int(rows_per_round)
    benchmark.extra_info["batch"] = BATCH
    benchmark.extra_info["dim"] = DIM
    benchmark.extra_info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    if inner is not None and inner.median:
        benchmark.extra_info["rows_per_s"] = rows_per_round / inner.median
        benchmark.extra_info["rows_per_s_best"] = rows_per_round / inner.min
    if cpu is not None and cpu.rounds:
        timed = cpu.rounds[warmup:] or cpu.rounds
        benchmark.extra_info["cpu_s_per_round"] = timed
        med = float(np.median(timed))
        if med > 0 and rows_per_round:
            benchmark.extra_info["rows_per_cpu_s"] = rows_per_round / med
