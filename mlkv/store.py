"""The Store facade: input checks, locking and statistics around the engine."""

from __future__ import annotations

import os
import threading

import numpy as np

from . import config, inputs, lockfile
from .engine import checkpoint, compaction, helper, ops, updates
from .engine import _rule_kernels as rules
from .engine import verify as verification
from .engine.device import FileDevice
from .engine.layout import RecordLayout
from .engine.policy import CachePolicy
from ._operation import Operation
from .errors import MlkvError

_INIT_KINDS = {name: i for i, name in enumerate(config.INITS)}
_MAX_NAMED_MISSING = 10
DEFAULT_AUTO_COMPACT = 0.5


def open(path, dim=None, dtype=None, memory_bytes=None, state_dim=None, init=None,
         init_scale=None, seed=None, policy=None, readonly=False, page_bits=None,
         segment_bits=None, io_threads=None, direct_io=None,
         auto_compact=DEFAULT_AUTO_COMPACT, threads=1) -> "Store":
    """Create or reopen the store at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        A directory; created if absent.
    dim : int, optional
        Values per row. Required to create; checked against the store on reopen.
    dtype : {"float32", "float16", "float64"}, optional
        Dtype of the values (default float32). Checked on reopen.
    memory_bytes : int, optional
        Budget of the in-memory buffer pool (default 256 MiB, or what the store used last).
    state_dim : int, optional
        float32 optimizer-state values kept beside each row (default 0).
    init, init_scale, seed : optional
        ``get_or_init``'s initializer: ``"uniform"`` (default, U(-init_scale, init_scale)),
        ``"normal"`` (N(0, init_scale**2)) or ``"zeros"``; rows depend only on (key, seed).
    policy : {"second_chance", "fifo", "frequency"}, optional
        Cache policy (see :mod:`mlkv.engine.policy`); may change on each open.
    readonly : bool
        Open without the write lock; writes raise :class:`ReadOnlyError`.
    page_bits, segment_bits : int, optional
        Log geometry, fixed at creation (defaults pick pages that give the buffer pool at
        least 16 frames, up to 1 MiB, and 256 MiB segment files).
    io_threads : int, optional
        Threads that read cold rows from disk in parallel (default 32: the disk serves many reads at once).
    auto_compact : float or None
        Compact automatically after a write once dead records are more than this share of
        the log (default 0.5; ``None`` or 0 turns it off). See :meth:`Store.compact`.
    direct_io : bool, optional
        Bypass the OS page cache with ``O_DIRECT`` (default: where the file system allows).
        ``False`` uses buffered I/O and drops the pages it touched after each batch.
    threads : {1, 2}
        Threads that work on a batch's rows in memory (default 1): with 2, a float32 store
        shares its large reads, and runs ``update(..., wait=False)``, with a helper thread
        that spins on a second core meanwhile (see :mod:`mlkv.engine.helper`). Same numbers.

    Returns
    -------
    Store

    Raises
    ------
    SettingsMismatchError
        A fixed setting differs from the one the store was made with.
    StoreLockedError
        Another process has the store open for writing.
    CorruptionError
        A store file is damaged.
    """
    return Store(os.fspath(path), dict(dim=dim, dtype=dtype, state_dim=state_dim, init=init,
                                       init_scale=init_scale, seed=seed, page_bits=page_bits,
                                       segment_bits=segment_bits),
                 memory_bytes=memory_bytes, policy=policy, readonly=readonly,
                 io_threads=io_threads, direct_io=direct_io, auto_compact=auto_compact,
                 threads=threads)


class Store:
    """A larger-than-memory table of rows keyed by int64; see :func:`mlkv.open`."""

    _device_class = FileDevice        # tests put a fault-injecting device here

    def __init__(self, path, requested, memory_bytes, policy, readonly, io_threads, direct_io,
                 auto_compact=DEFAULT_AUTO_COMPACT, threads=1):
        if auto_compact is not None and not 0 <= auto_compact < 1:
            raise ValueError(f"auto_compact must be a share in [0, 1) or None, got {auto_compact!r}")
        helper.check_threads(threads)
        self.auto_compact, self.path, self.readonly = auto_compact or None, path, readonly
        self._lock, self._lock_fd = threading.RLock(), None
        self._closed, self._failure = True, None
        self.settings, memory_bytes, policy = config.resolve(path, requested, memory_bytes,
                                                             policy, readonly)
        # A read-only store never writes, so it cannot copy reads to the tail.
        policy_obj = CachePolicy("fifo" if readonly else policy)
        self._policy_name = policy_obj.name
        s = self.settings
        #: get_or_init's initializer, as the kernels take it: (kind, scale, seed)
        self._init = (_INIT_KINDS[s.init], s.init_scale, s.seed)
        self.layout = RecordLayout(s.dim, s.np_dtype.itemsize, s.state_dim, s.page_bits,
                                   s.segment_bits)
        self.layout.check(memory_bytes, config.MIN_FRAMES)
        self.memory_bytes = int(memory_bytes)
        os.makedirs(path, exist_ok=True)
        if not readonly:
            self._lock_fd = lockfile.take(path)
        try:
            device = self._device_class(
                path, s.page_bits, s.segment_bits, readonly=readonly, direct=direct_io,
                **({} if io_threads is None else {"io_threads": io_threads}))
            self._engine, manifest = checkpoint.recover(
                path, self.layout, s.np_dtype, self.memory_bytes, policy_obj, device)
            if not readonly:                        # remember this open's choices
                config.save_settings(path, self.settings, self.memory_bytes, policy)
        except BaseException:
            lockfile.release(self._lock_fd)
            raise
        self._engine.helper = helper.for_store(threads, s.np_dtype)
        self.checkpoint_id = manifest.get("checkpoint_id", 0)
        #: id of the last checkpoint that changed the rows (see :meth:`checkpoint`)
        self.content_id = manifest.get("content_id", 0)
        self._counts = dict.fromkeys(("gets", "puts", "updates", "deletes", "lookaheads",
                                      "created", "compactions"), 0)
        self._writes_at_checkpoint = 0
        self._closed = False

    # ---- properties -----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.settings.dim

    @property
    def dtype(self) -> np.dtype:
        return self.settings.np_dtype

    @property
    def state_dim(self) -> int:
        return self.settings.state_dim

    @property
    def policy(self) -> str:
        return self._policy_name

    @property
    def engine(self) -> ops.Engine:
        """The engine's parts (index, log, device): for tools and tests, not a stable API."""
        with self._lock:
            if self._engine is not None:
                updates.finish_update(self._engine)
        return self._engine

    # ---- rows -----------------------------------------------------------------------------
    def put(self, keys, values) -> None:
        """Upsert rows: ``values[i]`` becomes the row of ``keys[i]``; the last repeat wins.

        The row's optimizer state is reset to zeros, as a freshly initialised row has.
        """
        keys = inputs.as_keys(keys)
        values = inputs.as_values(values, keys.shape[0], self.dim, self.dtype)
        with self._op(write=True):
            ops.upsert(self._engine, keys, values)
            self._counts["puts"] += keys.shape[0]
            self._maybe_compact()

    def get(self, keys) -> np.ndarray:
        """Rows of ``keys`` as a new ``[n, dim]`` array.

        Raises
        ------
        KeyError
            Naming (up to 10 of) the keys not in the store.
        """
        keys = inputs.as_keys(keys)
        with self._op():
            out, addrs = ops.read(self._engine, keys)
            self._counts["gets"] += keys.shape[0]
            if not self.readonly:
                self._maybe_compact()      # reads copied to the tail leave dead records
        if keys.shape[0] and addrs.min() < 0:
            missing = keys[addrs < 0]
            named = ", ".join(str(k) for k in missing[:_MAX_NAMED_MISSING])
            more = " ..." if missing.shape[0] > _MAX_NAMED_MISSING else ""
            raise KeyError(f"{missing.shape[0]} of {keys.shape[0]} keys are not in the store: "
                           f"[{named}{more}]")
        return out

    def get_or_init(self, keys) -> np.ndarray:
        """Rows of ``keys``; absent keys are first created with the store's initializer."""
        keys = inputs.as_keys(keys)
        with self._op(write=True):
            out, created = ops.read_or_init(self._engine, keys, self._init)
            self._counts["created"] += created
            self._counts["gets"] += keys.shape[0]
            self._maybe_compact()
        return out

    def update(self, keys, grads, rule: str, hyper, unique: bool = False,
               wait: bool = True) -> None:
        """Fused optimizer step: apply update ``rule`` to the rows of ``keys``.

        ``grads`` is ``[n, dim]`` in the store's dtype; the gradients of a repeated key are
        summed in position order, as torch coalesces a sparse gradient (sgd, linear, adds them
        in turn, as torch's SGD does). Absent keys get the store's initializer. The rule
        reads and writes the row and its optimizer state together, in place where the row is
        mutable. ``rule`` and ``hyper`` (the float64 options vector) are described in
        :mod:`mlkv.engine._rule_kernels`; the store needs at least the rule's ``state_dim``.
        float16 stores cannot be trained. ``unique=True``: the caller knows the keys are
        distinct, and the search for repeats is skipped. ``wait=False`` (a store opened with
        ``threads=2``): the update may still be running on the helper thread when this
        returns; the store finishes it before its next call, whichever thread makes it. The
        caller must not change ``keys`` or ``grads`` until then.
        """
        keys, s = inputs.as_keys(keys), self.settings
        grads = inputs.as_values(grads, keys.shape[0], s.dim, s.np_dtype)
        code, need, hyper = rules.check_update(rule, hyper, s.dim, s.np_dtype, s.state_dim)
        with self._op(write=True):
            self._counts["updates"] += updates.update(self._engine, keys, grads, code, need,
                                                      hyper, self._init, unique, wait)
            self._maybe_compact()

    def contains(self, keys) -> np.ndarray:
        """Boolean ``[n]``: whether each key has a row."""
        keys = inputs.as_keys(keys)
        with self._op():
            return self._engine.index.lookup(keys) >= 0

    def delete(self, keys) -> int:
        """Remove the rows of ``keys``; absent keys are ignored. Returns how many were removed."""
        keys = inputs.as_keys(keys)
        with self._op(write=True):
            removed = ops.delete(self._engine, keys)
            self._counts["deletes"] += removed
            self._maybe_compact()
        return removed

    def lookahead(self, keys) -> None:
        """Hint: bring the rows of ``keys`` into memory (the mutable region) ahead of use.

        Absent keys are ignored; a read-only store does nothing. The disk reads run without the
        store's lock: reads and updates go on meanwhile (a row moved in between is left be).
        """
        keys = inputs.as_keys(keys)
        with self._op():
            if self.readonly:
                return
            pending = ops.read_resident(self._engine, keys, False, ops.LOOKAHEAD_POLICY)
            begin = self._engine.log.begin
        try:
            records = ops.read_disk(self._engine, pending)
        except MlkvError:
            with self._op():                # compaction deleted those rows' files meanwhile:
                if self._engine.log.begin == begin:     # they moved, nothing to bring in
                    raise
            return
        with self._op(write=True):
            ops.read_finish(self._engine, pending, records)
            self._counts["lookaheads"] += keys.shape[0]
            self._maybe_compact()

    def __len__(self) -> int:
        with self._op():
            return self._engine.index.count

    def __contains__(self, key) -> bool:
        return bool(self.contains([key])[0])

    def keys(self) -> np.ndarray:
        """Every key, in log order (the order their rows are stored on disk)."""
        with self._op():
            keys, addrs = self._engine.index.entries()
        return keys[np.argsort(addrs, kind="stable")]

    def items(self, batch: int = 65536):
        """Yield ``(keys, values)`` batches of up to ``batch`` rows, in log order.

        Reading for export does not disturb the cache (no row is copied to the tail). Rows
        written or deleted during the iteration may or may not be seen.
        """
        config._check_int("batch", batch, minimum=1)
        keys = self.keys()
        for lo in range(0, keys.shape[0], batch):
            chunk = keys[lo:lo + batch]
            with self._op():
                out, addrs = ops.read(self._engine, chunk, policy_code=0)
            present = addrs >= 0
            if not present.all():
                chunk, out = chunk[present], out[present]
            yield chunk, out

    # ---- durability -----------------------------------------------------------------------
    def compact(self, progress: bool | None = None) -> dict:
        """Reclaim disk: copy live rows out of the oldest segment files, then delete them.

        Ends with a checkpoint. Returns ``{"rows_moved", "bytes_freed", "checkpoint_id"}``.
        Segments still partly in memory are kept, so a small store may have nothing to free.
        ``progress``: draw a progress bar on stderr (default: when stderr is a terminal).
        """
        with self._op(write=True):
            result = compaction.compact(self.path, self._engine, progress, self.changed)
            if result["checkpoint_id"] is not None:
                self._committed(result["checkpoint_id"])
            self._counts["compactions"] += result["checkpoint_id"] is not None
            return result

    def _maybe_compact(self) -> None:
        if self.auto_compact and compaction.due(self._engine, self.auto_compact):
            self.compact(progress=False)

    def verify(self, progress: bool | None = None) -> dict:
        """Read every page of the log and check it; check every index entry.

        Reads and never writes. Returns a report: ``ok``, ``pages_checked``, ``damaged_pages``
        and ``bad_entries``, described in :func:`mlkv.engine.verify.verify`. ``progress`` as
        in :meth:`compact`.
        """
        with self._op():
            return verification.verify(self._engine, progress)

    def checkpoint(self) -> int:
        """Make every write so far durable; returns the checkpoint's id.

        ``content_id`` then names the rows: it is this checkpoint's id if rows were written
        since the last one, else it stays (a checkpoint or compaction that changed no row
        keeps naming the same table).
        """
        with self._op(write=True):
            eng = self._engine
            self._committed(checkpoint.save(self.path, eng.log, eng.index, eng.device,
                                            self.changed))
            return self.checkpoint_id

    @property
    def changed(self) -> bool:
        """Whether rows were written (put, update, delete, created) since the last checkpoint."""
        return self._writes() != self._writes_at_checkpoint

    def _writes(self) -> int:
        return sum(self._counts[k] for k in ("puts", "updates", "deletes", "created"))

    def _committed(self, checkpoint_id: int) -> None:
        self.content_id = checkpoint_id if self.changed or not self.content_id else self.content_id
        self.checkpoint_id, self._writes_at_checkpoint = checkpoint_id, self._writes()

    def close(self, checkpoint: bool = True) -> None:
        """Checkpoint (unless read-only) and release memory, files and the lock. Idempotent.

        ``checkpoint=False`` releases the store without one: writes since the last
        checkpoint are dropped, and the next open returns to it.
        """
        with self._lock:
            if self._closed:
                return
            try:
                if checkpoint and not self.readonly and self._failure is None:
                    self.checkpoint()
            finally:
                try:
                    updates.finish_update(self._engine)
                finally:
                    self._closed = True
                    self._engine.device.close()
                lockfile.release(self._lock_fd)
                self._engine = self._lock_fd = None    # frees the buffer pool and index now

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = ("closed" if self._closed else "stopped by a device error" if self._failure
                 else f"{len(self)} rows")
        return f"<mlkv.Store {self.path!r} dim={self.dim} dtype={self.dtype.name} {state}>"

    # ---- statistics -----------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters and sizes.

        ``gets`` rows asked for; ``updates`` gradient rows applied (repeats included); ``hits``
        rows served from memory; ``misses``, ``disk_reads`` rows read from disk; ``bytes_*``
        device traffic; ``resident_bytes`` buffer-pool pages in use plus the index;
        ``addresses`` the log markers ``begin <= head <= read_only <= tail``.
        """
        with self._op():
            return {**self._counts, **ops.stats(self._engine), "memory_bytes": self.memory_bytes,
                    "checkpoint_id": self.checkpoint_id, "content_id": self.content_id}

    # ---- helpers --------------------------------------------------------------------------
    def _op(self, write=False) -> Operation:
        """``with self._op(write) as engine``: one operation on an open (and, if ``write``,
        writable) store, under its lock (see :mod:`mlkv._operation`)."""
        return Operation(self, write)

