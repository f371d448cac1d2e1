"""Training pipeline: lookahead prefetching and bounded-staleness asynchronous updates.

MLKV's first two training ideas (see the design notes) for :class:`KVEmbedding` and
:class:`KVEmbeddingBag` modules::

    pipe = Pipeline(loader, {user_emb: lambda b: b[0], item_emb: lambda b: b[1]},
                    lookahead=2, staleness=4)
    for epoch in range(epochs):
        for users, items, ratings in pipe:          # the loader's batches, in order
            loss = loss_fn(model(users, items), ratings)
            loss.backward()                         # the tables' updates go to a worker thread
    pipe.close()                                    # or: with Pipeline(...) as pipe: ...

``modules`` maps each embedding module to a function ``ids_of(batch)`` that returns the ids
that module will be called with for that batch (any shape; a tensor or an array). It is used
only by the lookahead, so it may be ``None`` for a module not to prefetch. It runs on the
lookahead thread and should only select from the batch.

Lookahead
---------
With ``lookahead=k > 0`` a background thread takes batches from the loader up to ``k``
batches ahead of the one being trained on, and for each calls ``store.lookahead(ids)`` of
every module: the rows are brought into the store's mutable region while the training thread
computes, so the later read finds them in memory. The store's kernels release the GIL, so the
disk reads really overlap the compute. Batches are yielded in the loader's order; an error in
the loader, in ``ids_of`` or in the lookahead is raised in the training thread at the place of
the batch it concerns. ``iter(loader)`` is called in the training thread before any pipeline
thread starts, so a ``DataLoader``'s worker processes are forked from a process the pipeline
has not yet added threads to. A lookahead never changes a value, so it never changes a number.

Bounded staleness
-----------------
With ``staleness=s`` (an int >= 0) the pipeline installs two hooks on every module while it is
iterated (they are removed when the iteration ends, breaks, fails or on :meth:`close`):

- ``_update_sink``: backward hands the coalesced gradient of the batch to the pipeline instead
  of applying it. One update-worker thread per pipeline applies the updates with
  ``module._apply_update`` strictly in the order they were made (FIFO), so the store sees
  them in the order serial training would.
- ``_read_gate``: before a module reads rows, it waits until none of them has more than ``s``
  pending updates, then counts the read as pending. A count is released when the worker has
  applied the updates of the batch that made the read.

So a read may miss the updates of at most ``s`` earlier batches to its rows, and rows the
recent batches did not touch are never waited for (MLKV's per-record bound, not a global
barrier). ``staleness=0`` makes every read wait for every earlier update of its rows: the
numbers are exactly those of plain serial training, while the updates of rows the next batch
does not read still overlap its compute. ``staleness=None`` installs no hooks: the modules
apply their updates themselves, synchronously (lookahead only).

A wait is bounded by ``timeout`` seconds and then raises :class:`PipelineTimeout` naming the
module and how many ids were waiting; it never spins silently. An exception in the worker is
raised in the training thread at the next read or backward of a module, or when the iteration
ends. When the iteration ends (or on :meth:`flush`) the pipeline waits until every update
handed to it is applied, so the store then holds what serial training would have written.

Besides the per-row bound, the training thread is kept at most ``max_queued_batches`` batches
ahead of the worker (default ``2 * s + 2``): the queued gradients are held in memory, and rows
no later batch reads would otherwise let the queue grow without bound.

Decisions
---------
*Pending counts live in a side table of the pipeline, not in the records' header bits.* The
counts are volatile bookkeeping of one training run: kept beside the row they would follow it
through every eviction, copy to the tail and read from disk (a record below ``head`` would
need a disk write to count a read), they would be written to disk by every flush and
checkpoint, and a crash would leave rows with counts that no update will ever release. In a
side table they cost no I/O, survive eviction trivially, never reach disk and vanish with
the process.

*The side table is a fixed array of counters indexed by a hash of the id* (one per store,
``2**table_bits`` slots, 3 MiB by default), updated with vectorised numpy under one lock:
its size does not grow with the embedding table, and a batch costs a few array operations
rather than a Python loop over ids. Two ids that share a slot share a count: a read may wait
for an update of the other id, never less than it should, so collisions cost time, never
correctness. Modules sharing a store share a table, since staleness is a property of rows.

*Reads are counted once per batch and released per batch.* The counts a batch adds are
released by a marker the training thread queues when it asks for the next batch, so the
worker releases them right after that batch's updates. This holds whatever a batch does: a
module called twice (its second read does not wait for its own first), a forward without a
backward, ids that receive no gradient. A read after a backward of the same batch waits for
that backward's updates to be applied, as serial code would see them.

*One worker, FIFO.* Several workers could reorder two updates of one row; one worker keeps
the store's order that of serial training, and the store's kernels release the GIL, so it
overlaps the training thread's compute. Hooks are plain attributes the modules check, so a
module outside a pipeline pays nothing.
"""

from __future__ import annotations

import collections
import inspect
import queue
import threading
import time
import types
import warnings
import weakref

import numpy as np
import torch

from mlkv.errors import MlkvError

__all__ = ["Pipeline", "PipelineError", "PipelineTimeout"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)    # Fibonacci hashing: odd, bits well spread
_DEFAULT_TABLE_BITS = 18
_JOIN_SECONDS = 5.0


class PipelineError(MlkvError):
    """A :class:`Pipeline` cannot go on (hooks already installed, its update worker failed)."""


class PipelineTimeout(PipelineError, TimeoutError):
    """A pipeline waited longer than its ``timeout`` for updates to be applied."""


def _ids_array(ids) -> np.ndarray:
    """A flat int64 numpy array of ``ids`` (a tensor, array or sequence)."""
    if isinstance(ids, torch.Tensor):
        return ids.detach().reshape(-1).to(device="cpu", dtype=torch.int64).numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class _Table:
    """Pending-read counters of one store's rows, in slots indexed by a hash of the id."""

    def __init__(self, store, bits: int):
        self.store = store
        self.counts = np.zeros(1 << bits, dtype=np.int32)
        self.stamp = np.full(1 << bits, -1, dtype=np.int64)   # last batch that counted a slot
        self.shift = np.uint64(64 - bits)
        self.batch_slots = []     # slots the current batch counted
        self.sunk_seq = -1        # last update queued for this store in the current batch

    def slots(self, ids: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64)
        with np.errstate(over="ignore"):
            return ((keys * _GOLDEN) >> self.shift).astype(np.intp)


class Pipeline:
    """Iterate ``loader`` with lookahead prefetching and bounded-staleness updates.

    Parameters
    ----------
    loader : iterable
        Batches (a ``torch.utils.data.DataLoader`` or any iterable); each ``iter(pipeline)``
        is one pass over ``iter(loader)``.
    modules : mapping
        ``{module: ids_of}``: the :class:`KVEmbedding` / :class:`KVEmbeddingBag` modules the
        training step calls, each with ``ids_of(batch)`` giving the ids (the ``input`` of a
        bag) it is called with for that batch, e.g.
        ``{user_emb: lambda b: b[0], item_emb: lambda b: b[1]}``. ``ids_of`` is only used
        for the lookahead and may be ``None``.
    lookahead : int
        Batches read ahead of the one being trained on (0: no background thread).
    staleness : int or None
        Updates of earlier batches a read may miss, per row (0: serial numbers; ``None``:
        no hooks, the modules update synchronously).
    timeout : float
        Seconds a read, the end of an iteration or :meth:`flush` may wait for updates
        before raising :class:`PipelineTimeout`.
    max_queued_batches : int, optional
        Batches the training thread may run ahead of the update worker (default
        ``2 * staleness + 2``).
    table_bits : int
        log2 of the slots of each store's pending-count table (default 18: 3 MiB).

    See the module's documentation for the semantics and the design decisions.
    """

    def __init__(self, loader, modules, lookahead: int = 0, staleness: int | None = 0,
                 timeout: float = 60.0, max_queued_batches: int | None = None,
                 table_bits: int = _DEFAULT_TABLE_BITS):
        if not hasattr(modules, "items"):
            raise TypeError("modules must be a mapping {module: ids_of}, got "
                            f"{type(modules).__name__}")
        _check_int("lookahead", lookahead, 0)
        if staleness is not None:
            _check_int("staleness", staleness, 0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        if max_queued_batches is None:
            max_queued_batches = 2 * (staleness or 0) + 2
        _check_int("max_queued_batches", max_queued_batches, 1)
        _check_int("table_bits", table_bits, 1)
        if table_bits > 30:
            raise ValueError(f"table_bits must be at most 30, got {table_bits}")
        self.loader = loader
        self.modules = dict(modules)
        for i, (module, ids_of) in enumerate(self.modules.items()):
            missing = [name for name in ("store", "_read_gate", "_update_sink", "_apply_update")
                       if not hasattr(module, name)]
            if missing:
                raise TypeError(f"modules entry {i} ({type(module).__name__}) is not a KV "
                                f"embedding module: it has no {', '.join(missing)}")
            if ids_of is not None and not callable(ids_of):
                raise TypeError(f"ids_of of {self._name(module, i)} must be callable or None")
        self.lookahead = int(lookahead)
        self.staleness = None if staleness is None else int(staleness)
        self.timeout = float(timeout)
        self.max_queued_batches = int(max_queued_batches)
        self.table_bits = int(table_bits)
        self._tables = {}            # store -> _Table, made on first use, kept across passes
        self._batch_no = 0           # batches begun over all passes (stamps stay unique)
        self._active = None          # weakref to the generator of the pass in progress
        self._run = None             # the pass in progress
        self._unreported = None      # a worker error a pass closed by ``break`` could not raise
        self._stats = dict.fromkeys(
            ("batches", "updates", "update_rows", "gate_waits", "lookahead_batches",
             "lookahead_rows"), 0)
        self._stats.update(dict.fromkeys(
            ("gate_wait_seconds", "queue_wait_seconds", "loader_wait_seconds",
             "update_seconds", "lookahead_seconds"), 0.0))
        self._stats["max_pending_seen"] = 0

    # ---- public -------------------------------------------------------------------------
    def __iter__(self):
        gen = self._active() if self._active is not None else None
        if gen is not None and inspect.getgeneratorstate(gen) != inspect.GEN_CREATED:
            raise PipelineError("a pass over this pipeline is already in progress (an "
                                "iterator kept from an earlier iter()?): finish it or call "
                                "close() first")
        self._raise_unreported()
        gen = self._iterate()
        self._active = weakref.ref(gen)
        return gen

    def flush(self) -> None:
        """Wait until every update handed to the pipeline so far is applied to the store.

        Raises the update worker's error, or :class:`PipelineTimeout` after ``timeout``.
        """
        run = self._run
        if run is not None:
            run.drain()
        self._raise_unreported()

    def close(self) -> None:
        """End a pass in progress (applying its pending updates) and remove the hooks."""
        gen = self._active() if self._active is not None else None
        if gen is not None and gen.gi_running:
            raise PipelineError("close() was called inside the pipeline's loop: leave the "
                                "loop first (the pass closes itself when it ends)")
        self._active = None
        if gen is not None:
            gen.close()
        self._raise_unreported()

    def stats(self) -> dict:
        """Counters over all passes: ``batches``; ``updates`` and ``update_rows`` applied by
        the worker and ``update_seconds`` it spent; ``gate_waits`` (reads that waited) and
        ``gate_wait_seconds``; ``max_pending_seen`` (most pending updates a read found on one
        of its rows, at most ``staleness``); ``queue_wait_seconds`` (training thread waiting
        for the worker to catch up); ``loader_wait_seconds`` (waiting for the next batch);
        ``lookahead_batches``, ``lookahead_rows``, ``lookahead_seconds``."""
        run = self._run
        if run is not None:
            with run.cond:
                return dict(self._stats)
        return dict(self._stats)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            self.close()
            return
        try:                  # an exception is on its way out: do not hide it behind ours
            self.close()
        except Exception as problem:                    # noqa: BLE001 - attached as a note
            _note(exc, f"while closing the mlkv Pipeline: {problem!r}")

    def __repr__(self):
        return (f"<mlkv Pipeline of {len(self.modules)} modules lookahead={self.lookahead} "
                f"staleness={self.staleness}{' iterating' if self._run else ''}>")

    # ---- helpers ------------------------------------------------------------------------
    def _name(self, module, index=None) -> str:
        if index is None:
            index = next((i for i, m in enumerate(self.modules) if m is module), "?")
        store = getattr(module, "store", None)
        where = f" at {store.path!r}" if getattr(store, "path", None) else ""
        return f"module {index} ({type(module).__name__}{where})"

    def _raise_unreported(self):
        exc, self._unreported = self._unreported, None
        if exc is not None:
            raise PipelineError("the update worker of an earlier pass failed") from exc

    def _iterate(self):
        iterator = iter(self.loader)          # before any pipeline thread: DataLoader forks here
        run = _Run(self, iterator)
        self._run = run
        primary = None
        try:
            run.start()
            while True:
                batch = run.next_batch()
                if batch is _END:
                    break
                run.begin_batch()
                yield batch
                run.end_batch()
        except BaseException as exc:
            primary = exc
            raise
        finally:
            self._run = None
            run.finish(primary)


_END = object()


class _Run:
    """One pass over the loader: threads, hooks and the update queue."""

    def __init__(self, pipe: Pipeline, iterator):
        self.pipe = pipe
        self.iterator = iterator
        self.stats = pipe._stats
        self.s = pipe.staleness
        self.timeout = pipe.timeout
        self.cond = threading.Condition(threading.Lock())
        self.queue = collections.deque()
        self.next_seq = 0             # sequence number of the next update queued
        self.applied_seq = -1         # last update the worker applied
        self.ended = 0                # batches whose reads were handed to the worker
        self.released = 0             # of those, batches the worker released
        self.busy = None              # what the worker is doing, for messages
        self.error = None             # the worker's exception
        self.error_reported = False
        self.worker = None
        self.prefetch = None
        self.installed = {}           # module -> (gate, sink) callables we installed
        self.tables = {}              # module -> _Table
        self.batch_open = False
        self.current = -1

    # ---- set-up and tear-down ------------------------------------------------------------
    def start(self):
        pipe = self.pipe
        if self.s is not None:
            for module in pipe.modules:
                if module._read_gate is not None or module._update_sink is not None:
                    raise PipelineError(
                        f"{pipe._name(module)} already has a read gate or update sink: is "
                        f"another Pipeline iterating over it?")
            for module in pipe.modules:
                table = pipe._tables.get(module.store)
                if table is None:
                    table = pipe._tables[module.store] = _Table(module.store, pipe.table_bits)
                self.tables[module] = table
            self.worker = threading.Thread(target=self._work, name="mlkv-pipeline-updates",
                                           daemon=True)
            self.worker.start()
            for module in pipe.modules:
                gate, sink = self.gate, self.sink          # keep the bound methods to compare
                module._read_gate, module._update_sink = gate, sink
                self.installed[module] = (gate, sink)
        if pipe.lookahead > 0:
            groups = {}
            for module, ids_of in pipe.modules.items():
                if ids_of is not None:
                    groups.setdefault(id(module.store), (module.store, []))[1].append(ids_of)
            self.prefetch = _Prefetcher(self.iterator, list(groups.values()), pipe.lookahead,
                                        self.stats)
            self.iterator = None

    def finish(self, primary):
        """Apply what is queued, stop the threads and remove the hooks. Raises a worker
        error or timeout only when the pass ended normally (``primary`` is None); one the
        training thread has already seen is not raised again."""
        problems = []
        try:
            if self.prefetch is not None:
                self.prefetch.stop()
            if self.worker is not None:
                with self.cond:
                    seen = self.error_reported
                if self.batch_open:
                    self.end_batch()
                try:
                    self.drain()
                except BaseException as exc:          # noqa: BLE001 - reported below
                    problems.append(exc)
                with self.cond:
                    if problems:
                        # the worker is stuck or failed: what it has not taken is dropped, so
                        # nothing reaches the store after the pass is over
                        dropped = sum(1 for item in self.queue if item and item[0] == "update")
                        self.queue.clear()
                        if dropped:
                            _note(problems[0], f"{dropped} queued updates were not applied")
                    self.queue.append(None)           # stop marker, after everything queued
                    self.cond.notify_all()
                self.worker.join(0.0 if problems else _JOIN_SECONDS)
                error = self.error
                if error is not None and not any(p is error or p.__cause__ is error
                                                 for p in problems):
                    problems.append(error)
                if error is not None or problems or self.worker.is_alive():
                    for table in self.tables.values():    # leave no count a later pass waits on
                        table.counts[:] = 0
                if seen:
                    problems = [p for p in problems if p is not error and p.__cause__ is not error]
        finally:
            for module, (gate, sink) in self.installed.items():
                if module._read_gate is gate:
                    module._read_gate = None
                if module._update_sink is sink:
                    module._update_sink = None
            self.installed.clear()
        if not problems:
            return
        if primary is None:
            raise problems[0]
        if isinstance(primary, GeneratorExit):
            # closed by ``break``, an exception in the loop's body or garbage collection:
            # nowhere to raise. A worker error is raised by the next flush(), close() or pass.
            if not isinstance(problems[0], PipelineTimeout):
                self.pipe._unreported = problems[0]
            warnings.warn(f"mlkv Pipeline: pending updates were not applied when the pass was "
                          f"closed: {problems[0]}", RuntimeWarning, stacklevel=2)
        else:
            for problem in problems:
                _note(primary, f"while closing the mlkv Pipeline: {problem!r}")

    # ---- batches (training thread) ---------------------------------------------------------
    def next_batch(self):
        if self.worker is not None:
            self._wait(lambda: self.ended - self.released < self.pipe.max_queued_batches,
                       self._queue_timeout, "queue_wait_seconds")
        t0 = time.perf_counter()
        try:
            if self.prefetch is not None:
                return self.prefetch.get()
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
                return _END
        finally:
            self.stats["loader_wait_seconds"] += time.perf_counter() - t0

    def begin_batch(self):
        self.current = self.pipe._batch_no
        self.pipe._batch_no += 1
        self.stats["batches"] += 1
        self.batch_open = True

    def end_batch(self):
        self.batch_open = False
        if self.worker is None:
            return
        with self.cond:
            slots = []
            for table in set(self.tables.values()):
                if table.batch_slots:
                    slots.append((table, np.concatenate(table.batch_slots)))
                table.batch_slots = []
                table.sunk_seq = -1
            self.queue.append(("release", self.current, slots))
            self.ended += 1
            self.cond.notify_all()

    # ---- hooks (training thread) -----------------------------------------------------------
    def gate(self, module, ids):
        """``_read_gate``: wait until no row of ``ids`` has more than ``s`` pending updates,
        then count this read as pending until the current batch's updates are applied."""
        table = self.tables[module]
        slots = np.unique(table.slots(_ids_array(ids)))
        with self.cond:
            self._check_error()
            if not self.batch_open:
                raise PipelineError(f"{self.pipe._name(module)} read rows outside a batch of "
                                    f"the pipeline")
            if table.sunk_seq > self.applied_seq:
                # a read after a backward of this batch sees its updates, as in serial code
                seq = table.sunk_seq
                self._wait(lambda: self.applied_seq >= seq,
                           lambda: self._gate_timeout(module, ids, table, None),
                           "gate_wait_seconds", locked=True)
            fresh = slots[table.stamp[slots] != self.current]
            if fresh.shape[0] == 0:
                return
            s = self.s
            if table.counts[fresh].max() > s:
                self.stats["gate_waits"] += 1
                self._wait(lambda: table.counts[fresh].max() <= s,
                           lambda: self._gate_timeout(module, ids, table, fresh),
                           "gate_wait_seconds", locked=True)
            seen = int(table.counts[fresh].max())
            self.stats["max_pending_seen"] = max(self.stats["max_pending_seen"], seen)
            table.counts[fresh] += 1
            table.stamp[fresh] = self.current
            table.batch_slots.append(fresh)

    def sink(self, module, ids, grads, step):
        """``_update_sink``: queue the update for the worker (copies of ``ids`` and ``grads``)."""
        ids = np.array(_ids_array(ids), copy=True)
        grads = np.array(grads.detach().cpu().numpy() if isinstance(grads, torch.Tensor)
                         else grads, copy=True)
        table = self.tables[module]
        with self.cond:
            self._check_error()
            seq = self.next_seq
            self.next_seq += 1
            table.sunk_seq = seq
            self.queue.append(("update", seq, module, ids, grads, step, self.current))
            self.cond.notify_all()

    def drain(self):
        """Wait until the worker has applied everything queued so far."""
        if self.worker is None:
            return
        with self.cond:
            target = self.next_seq - 1
            ended = self.ended
            self._wait(lambda: self.applied_seq >= target and self.released >= ended,
                       lambda: PipelineTimeout(
                           f"the update worker did not apply the pipeline's pending updates "
                           f"within {self.timeout:g} s ({self._worker_state()})"),
                       "queue_wait_seconds", locked=True)
            self._check_error()

    # ---- the update worker -----------------------------------------------------------------
    def _work(self):
        cond, stats = self.cond, self.stats
        while True:
            with cond:
                while not self.queue:
                    cond.wait()
                item = self.queue.popleft()
                if item is None:
                    return
                if item[0] == "update":
                    _, seq, module, ids, grads, step, batch = item
                    what = f"applying the update of batch {batch} to {self.pipe._name(module)}"
                    self.busy = (what, time.monotonic())
            if item[0] == "update":
                t0 = time.perf_counter()
                try:
                    module._apply_update(ids, grads, step)
                except BaseException as exc:              # noqa: BLE001 - handed to training
                    with cond:
                        self.error = exc
                        self.busy = None
                        cond.notify_all()
                    return
                with cond:
                    self.applied_seq = seq
                    self.busy = None
                    stats["updates"] += 1
                    stats["update_rows"] += ids.shape[0]
                    stats["update_seconds"] += time.perf_counter() - t0
                    cond.notify_all()
            else:
                with cond:
                    for table, slots in item[2]:
                        table.counts[slots] -= 1
                    self.released += 1
                    cond.notify_all()

    # ---- waiting ----------------------------------------------------------------------------
    def _check_error(self):
        """Raise the worker's error in the training thread (caller holds ``cond``)."""
        if self.error is None:
            return
        if not self.error_reported:
            self.error_reported = True
            raise self.error
        raise PipelineError("the pipeline's update worker failed earlier; the pass cannot go "
                            "on") from self.error

    def _wait(self, ready, make_timeout, stat, locked=False):
        """Wait on ``cond`` until ``ready()``; raise the worker's error or ``make_timeout()``."""
        if not locked:
            with self.cond:
                return self._wait(ready, make_timeout, stat, locked=True)
        if ready():
            return
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        try:
            while not ready():
                self._check_error()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise make_timeout()
                self.cond.wait(remaining)
        finally:
            self.stats[stat] += time.monotonic() - t0

    def _worker_state(self) -> str:
        queued = sum(1 for item in self.queue if item is not None and item[0] == "update")
        if self.busy is not None:
            what, since = self.busy
            doing = f"it has been {what} for {time.monotonic() - since:.1f} s"
        else:
            doing = ("it is idle" if self.worker is not None and self.worker.is_alive()
                     else "it is not running")
        return f"{queued} updates queued; {doing}"

    def _gate_timeout(self, module, ids, table, fresh):
        ids = np.unique(_ids_array(ids))
        if fresh is None:
            what = (f"{ids.shape[0]} ids waited for the updates this batch already made to "
                    f"them")
        else:
            blocked = fresh[table.counts[fresh] > self.s]
            n = int(np.isin(table.slots(ids), blocked).sum())
            what = (f"{n} of {ids.shape[0]} ids waited for earlier updates (more than "
                    f"staleness={self.s} pending)")
        return PipelineTimeout(
            f"{self.pipe._name(module)}: {what} and {self.timeout:g} s passed without the "
            f"update worker applying them ({self._worker_state()})")

    def _queue_timeout(self):
        return PipelineTimeout(
            f"the training thread waited {self.timeout:g} s for the update worker to catch "
            f"up to max_queued_batches={self.pipe.max_queued_batches} "
            f"({self._worker_state()})")


class _Prefetcher:
    """A thread that takes batches from the loader up to ``k`` ahead and looks their rows up."""

    def __init__(self, iterator, groups, k, stats):
        self.iterator = iterator
        self.groups = groups            # [(store, [ids_of, ...])]
        self.stats = stats
        self.room = threading.Semaphore(k)
        self.items = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mlkv-pipeline-lookahead",
                                       daemon=True)
        self.thread.start()

    def _run(self):
        iterator, self.iterator = self.iterator, None
        try:
            while True:
                self.room.acquire()
                if self.stopping.is_set():
                    return
                try:
                    batch = next(iterator)
                except StopIteration:
                    self.items.put((_END, None))
                    return
                t0 = time.perf_counter()
                rows = 0
                for store, fns in self.groups:
                    ids = np.unique(np.concatenate([_ids_array(fn(batch)) for fn in fns]))
                    if ids.shape[0]:
                        store.lookahead(ids)
                    rows += ids.shape[0]
                self.stats["lookahead_seconds"] += time.perf_counter() - t0
                self.stats["lookahead_batches"] += 1
                self.stats["lookahead_rows"] += rows
                self.items.put((batch, None))
        except BaseException as exc:                      # noqa: BLE001 - handed to training
            self.items.put((None, exc))
        finally:
            if isinstance(iterator, types.GeneratorType):
                iterator.close()
            del iterator

    def get(self):
        batch, error = self.items.get()
        self.room.release()             # the batch taken is now trained on, not ahead
        if error is not None:
            raise error
        return batch

    def stop(self):
        self.stopping.set()
        self.room.release()
        self.thread.join(_JOIN_SECONDS)


def _note(exc: BaseException, text: str) -> None:
    """Add ``text`` to the message of ``exc`` where Python can (3.11+)."""
    if hasattr(exc, "add_note"):
        exc.add_note(text)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
