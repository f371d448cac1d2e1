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
batches ahead of the one being trained on and brings their rows into memory with
``store.lookahead`` while the training thread computes (see
:mod:`mlkv.frameworks.torch._prefetch`). Batches are yielded in the loader's order; an error
in the loader, in ``ids_of`` or in the lookahead is raised in the training thread at the place
of the batch it concerns. A lookahead never changes a value, so it never changes a number.

Bounded staleness
-----------------
With ``staleness=s`` (an int >= 0) the pipeline installs two hooks on every module while it is
iterated (they are removed when the iteration ends, breaks, fails or on :meth:`close`):
``_update_sink`` hands backward's updates to one update-worker thread, which applies them
strictly in the order they were made (:mod:`mlkv.frameworks.torch._updates`); ``_read_gate``
makes a read wait until none of its rows has more than ``s`` pending updates
(:mod:`mlkv.frameworks.torch._staleness`).

So a read may miss the updates of at most ``s`` earlier batches to its rows, and rows the
recent batches did not touch are never waited for. ``staleness=0`` makes every read wait for
every earlier update of its rows: the numbers are exactly those of plain serial training,
while the updates of rows the next batch does not read still overlap its compute.
``staleness=None`` installs no hooks: the modules apply their updates themselves,
synchronously (lookahead only).

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
*``iter(loader)`` is called in the training thread before any pipeline thread starts*, so a
``DataLoader``'s worker processes are forked from a process the pipeline has not yet added
threads to.

*A pass closed where nothing can be raised* (``break``, an exception in the loop's body,
garbage collection) warns about the updates it could not apply, and keeps a worker error for
the next :meth:`~Pipeline.flush`, :meth:`~Pipeline.close` or pass to raise.
"""

from __future__ import annotations

import inspect
import time
import warnings
import weakref

import numpy as np

from ._errors import PipelineError, PipelineTimeout, note
from ._prefetch import END, Prefetcher
from ._staleness import BoundedStaleness

__all__ = ["Pipeline", "PipelineError", "PipelineTimeout"]

_DEFAULT_TABLE_BITS = 18
_JOIN_SECONDS = 5.0       # a pass's end waits this long for each thread; a stuck one is a daemon


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
                raise TypeError(f"ids_of of {_describe(module, i)} must be callable or None")
        self.lookahead = int(lookahead)
        self.staleness = None if staleness is None else int(staleness)
        self.timeout = float(timeout)
        self.max_queued_batches = int(max_queued_batches)
        self.table_bits = int(table_bits)
        self._tables = {}            # store -> PendingTable, made on first use, kept across passes
        self._batch_no = 0           # batches begun over all passes (the tables' stamps)
        self._active = None          # weakref to the generator of the latest pass
        self._updates = None         # the BoundedStaleness of the pass in progress
        self._unreported = None      # a worker error a pass closed by ``break`` could not raise
        self._stats = {
            "batches": 0, "updates": 0, "update_rows": 0, "gate_waits": 0,
            "lookahead_batches": 0, "lookahead_rows": 0,
            "gate_wait_seconds": 0.0, "queue_wait_seconds": 0.0, "loader_wait_seconds": 0.0,
            "update_seconds": 0.0, "lookahead_seconds": 0.0, "max_pending_seen": 0}

    # ---- public -------------------------------------------------------------------------
    def __iter__(self):
        if self._pass_in_progress() is not None:
            raise PipelineError("a pass over this pipeline is already in progress (an "
                                "iterator kept from an earlier iter()?): finish it or call "
                                "close() first")
        self._raise_unreported()
        gen = self._iterate()
        self._active = weakref.ref(gen)
        return gen

    def flush(self) -> None:
        """Wait until every update handed to the pipeline so far is applied to the store.

        Raises
        ------
        PipelineTimeout
            The updates were not applied within ``timeout`` seconds.
        Exception
            The update worker's error (a :class:`PipelineError` caused by it once it was
            raised before, or when it ended an earlier pass).
        """
        updates = self._updates
        if updates is not None:
            updates.worker.drain()
        self._raise_unreported()

    def close(self) -> None:
        """End a pass in progress (applying its pending updates) and remove the hooks.

        Raises
        ------
        PipelineError
            Called inside the pipeline's loop, or the update worker of a pass failed where
            the error could not be raised (the pass was left by ``break``).
        """
        gen = self._active() if self._active is not None else None
        if gen is not None and gen.gi_running:
            raise PipelineError("close() was called inside the pipeline's loop: leave the "
                                "loop first (the pass closes itself when it ends)")
        self._active = None
        if gen is not None:
            gen.close()
        self._raise_unreported()

    def stats(self) -> dict:
        """Counters over all passes.

        Returns
        -------
        dict
            ``batches``; ``updates`` and ``update_rows`` applied by the worker and
            ``update_seconds`` it spent; ``gate_waits`` (reads that waited) and
            ``gate_wait_seconds``; ``max_pending_seen`` (most pending updates a read found
            on one of its rows, at most ``staleness``); ``queue_wait_seconds`` (training
            thread waiting for the worker to catch up); ``loader_wait_seconds`` (waiting for
            the next batch); ``lookahead_batches``, ``lookahead_rows``, ``lookahead_seconds``.
        """
        updates = self._updates
        if updates is None:
            return dict(self._stats)
        with updates.worker.cond:        # the worker adds to them under its lock
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
            note(exc, f"while closing the mlkv Pipeline: {problem!r}")

    def __repr__(self):
        iterating = " iterating" if self._pass_in_progress() is not None else ""
        return (f"<mlkv Pipeline of {len(self.modules)} modules lookahead={self.lookahead} "
                f"staleness={self.staleness}{iterating}>")

    # ---- one pass -----------------------------------------------------------------------
    def _iterate(self):
        iterator = iter(self.loader)          # before any pipeline thread: DataLoader forks here
        updates = prefetch = primary = None
        try:
            if self.staleness is not None:
                names = {module: _describe(module, i) for i, module in enumerate(self.modules)}
                updates = self._updates = BoundedStaleness(
                    names, self._tables, self.table_bits, self.staleness, self.timeout,
                    self._stats)
            if self.lookahead > 0:
                prefetch = Prefetcher(iterator, self._lookahead_groups(), self.lookahead,
                                      self._stats)
                iterator = None               # the lookahead thread's now
            while True:
                if updates is not None:
                    updates.worker.wait_for_room(self.max_queued_batches)
                t0 = time.perf_counter()
                try:
                    batch = prefetch.get() if prefetch is not None else next(iterator, END)
                finally:
                    self._stats["loader_wait_seconds"] += time.perf_counter() - t0
                if batch is END:
                    break
                self._stats["batches"] += 1
                if updates is not None:
                    updates.begin_batch(self._batch_no)
                self._batch_no += 1
                yield batch
                if updates is not None:
                    updates.end_batch()
        except BaseException as exc:
            primary = exc
            raise
        finally:
            self._updates = None
            self._finish(primary, updates, prefetch)

    def _finish(self, primary, updates, prefetch):
        """Stop the pass's threads, apply what is queued and remove the hooks. A worker error
        or timeout is raised only when the pass ended normally (``primary`` is None); one the
        training thread has already seen is not raised again."""
        problems = []
        try:
            if prefetch is not None:
                prefetch.stop(_JOIN_SECONDS)
            if updates is not None:
                problems = updates.stop(_JOIN_SECONDS)
        finally:
            if updates is not None:
                updates.remove_hooks()
        if not problems:
            return
        if primary is None:
            raise problems[0]
        if isinstance(primary, GeneratorExit):
            # closed by ``break``, an exception in the loop's body or garbage collection:
            # nowhere to raise. A worker error is raised by the next flush(), close() or pass.
            if not isinstance(problems[0], PipelineTimeout):
                self._unreported = problems[0]
            warnings.warn(f"mlkv Pipeline: pending updates were not applied when the pass was "
                          f"closed: {problems[0]}", RuntimeWarning, stacklevel=2)
        else:
            for problem in problems:
                note(primary, f"while closing the mlkv Pipeline: {problem!r}")

    # ---- helpers ------------------------------------------------------------------------
    def _pass_in_progress(self):
        """The generator of a pass that has started and not ended, or None."""
        gen = self._active() if self._active is not None else None
        if gen is None or inspect.getgeneratorstate(gen) in (inspect.GEN_CREATED,
                                                             inspect.GEN_CLOSED):
            return None
        return gen

    def _lookahead_groups(self) -> list:
        """``[(store, [ids_of, ...])]``: one lookahead per store covers all its modules."""
        groups = {}
        for module, ids_of in self.modules.items():
            if ids_of is not None:
                groups.setdefault(module.store, []).append(ids_of)
        return list(groups.items())

    def _raise_unreported(self):
        exc, self._unreported = self._unreported, None
        if exc is not None:
            raise PipelineError("the update worker of an earlier pass failed") from exc


def _describe(module, index: int) -> str:
    """``module <index> (<type> at <store path>)``, for messages."""
    path = getattr(module.store, "path", None)
    where = f" at {path!r}" if path else ""
    return f"module {index} ({type(module).__name__}{where})"


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
