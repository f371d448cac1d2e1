"""Bounded staleness: the pending-read side table, the read gate and the update sink.

While a pass iterates with ``staleness=s``, every module has two hooks (see
:mod:`mlkv.frameworks.torch.modules`):

- ``_update_sink`` (:meth:`BoundedStaleness.sink`): backward hands the coalesced gradient of
  the batch over instead of applying it; it is queued for the update worker
  (:mod:`mlkv.frameworks.torch._updates`), which applies it in the order it was made.
- ``_read_gate`` (:meth:`BoundedStaleness.gate`): before a module reads rows, it waits until
  none of them has more than ``s`` pending updates, then counts the read as pending. When the
  batch ends, a release queued behind its updates takes the counts off again.

So a read may miss the updates of at most ``s`` earlier batches to its rows, and rows the
recent batches did not touch are never waited for (MLKV's per-record bound, not a global
barrier).

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

*Hooks are plain attributes the modules check*, so a module outside a pipeline pays nothing.
"""

from __future__ import annotations

import numpy as np

from ._errors import PipelineError, PipelineTimeout
from ._updates import UpdateWorker

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)    # Fibonacci hashing: odd, bits well spread


class PendingTable:
    """Pending-read counters of one store's rows, in ``2**bits`` slots indexed by a hash of
    the id. Kept across passes: ``stamp`` holds pipeline-wide batch numbers."""

    def __init__(self, bits: int):
        self.counts = np.zeros(1 << bits, dtype=np.int32)
        self.stamp = np.full(1 << bits, -1, dtype=np.int64)   # last batch that counted a slot
        self.shift = np.uint64(64 - bits)
        self.batch_slots = []     # slots the current batch counted
        self.sunk_seq = -1        # last update queued for this store in the current batch

    def slots(self, ids) -> np.ndarray:
        """The slot of each id (int64 ids, any sequence)."""
        keys = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64)
        with np.errstate(over="ignore"):
            return ((keys * _GOLDEN) >> self.shift).astype(np.intp)


class BoundedStaleness:
    """The hooks of one pass on every module, and the update worker behind them.

    Parameters
    ----------
    names : dict
        ``{module: name}`` of the pipeline's modules (for messages).
    tables : dict
        ``{store: PendingTable}`` of the pipeline, kept across passes; missing ones are made.
    table_bits : int
        log2 of the slots of a new table.
    staleness : int
        Pending updates a read may find on one of its rows.
    timeout : float
        Seconds any wait may last before :class:`PipelineTimeout`.
    stats : dict
        The pipeline's counters.

    Raises :class:`PipelineError` when a module already has hooks (before changing anything).
    """

    def __init__(self, names: dict, tables: dict, table_bits: int, staleness: int,
                 timeout: float, stats: dict):
        for module, name in names.items():
            if module._read_gate is not None or module._update_sink is not None:
                raise PipelineError(f"{name} already has a read gate or update sink: is "
                                    f"another Pipeline iterating over it?")
        self.names, self.staleness, self.stats = names, staleness, stats
        self.tables = {}              # module -> PendingTable
        for module in names:
            if module.store not in tables:
                tables[module.store] = PendingTable(table_bits)
            self.tables[module] = tables[module.store]
        self.batch = -1               # pipeline-wide number of the current batch
        self.batch_open = False
        self.worker = UpdateWorker(names, timeout, stats)
        gate, sink = self.gate, self.sink        # keep the bound methods to compare
        self.installed = (gate, sink)
        for module in names:
            module._read_gate, module._update_sink = gate, sink

    # ---- batches (training thread) ----------------------------------------------------------
    def begin_batch(self, batch: int) -> None:
        self.batch = batch
        self.batch_open = True

    def end_batch(self) -> None:
        """Queue the release of the reads this batch counted, behind its updates."""
        self.batch_open = False
        with self.worker.cond:
            releases = []
            for table in dict.fromkeys(self.tables.values()):
                if table.batch_slots:
                    releases.append((table.counts, np.concatenate(table.batch_slots)))
                table.batch_slots = []
                table.sunk_seq = -1
            self.worker.release(releases)

    # ---- the hooks (training thread) --------------------------------------------------------
    def gate(self, module, ids) -> None:
        """``_read_gate``: wait until no row of ``ids`` has more than ``staleness`` pending
        updates, then count this read as pending until the current batch's updates are
        applied."""
        table, worker, s = self.tables[module], self.worker, self.staleness
        slots = np.unique(table.slots(ids))
        with worker.cond:
            worker.raise_error()
            if not self.batch_open:
                raise PipelineError(f"{self.names[module]} read rows outside a batch of the "
                                    f"pipeline")
            # a read after a backward of this batch sees its updates, as in serial code
            seq = table.sunk_seq
            worker.wait(lambda: worker.applied_seq >= seq,
                        lambda: self._timeout(module, ids, table, None), "gate_wait_seconds")
            fresh = slots[table.stamp[slots] != self.batch]    # not yet counted this batch
            if fresh.shape[0] == 0:
                return
            if table.counts[fresh].max() > s:
                self.stats["gate_waits"] += 1
                worker.wait(lambda: table.counts[fresh].max() <= s,
                            lambda: self._timeout(module, ids, table, fresh),
                            "gate_wait_seconds")
            seen = int(table.counts[fresh].max())
            self.stats["max_pending_seen"] = max(self.stats["max_pending_seen"], seen)
            table.counts[fresh] += 1
            table.stamp[fresh] = self.batch
            table.batch_slots.append(fresh)

    def sink(self, module, ids, grads, step) -> None:
        """``_update_sink``: queue the update for the worker. It is applied later, so it
        queues copies of ``ids`` and ``grads``."""
        ids = np.array(ids, dtype=np.int64).reshape(-1)
        grads = np.array(grads)
        table = self.tables[module]
        with self.worker.cond:
            table.sunk_seq = self.worker.submit(module, ids, grads, step, self.batch)

    # ---- the end of the pass ----------------------------------------------------------------
    def stop(self, join_seconds: float) -> list:
        """End the open batch, apply what is queued and stop the worker; returns the problems
        the training thread has not seen (see :meth:`UpdateWorker.stop`)."""
        if self.batch_open:
            self.end_batch()
        worker = self.worker
        problems = worker.stop(join_seconds)
        if problems or worker.error is not None or worker.thread.is_alive():
            for table in self.tables.values():     # leave no count a later pass waits on
                table.counts[:] = 0
        return problems

    def remove_hooks(self) -> None:
        """Remove the hooks this pass installed (not ones installed since by someone else)."""
        gate, sink = self.installed
        for module in self.names:
            if module._read_gate is gate:
                module._read_gate = None
            if module._update_sink is sink:
                module._update_sink = None

    def _timeout(self, module, ids, table, fresh) -> PipelineTimeout:
        ids = np.unique(ids)
        if fresh is None:
            what = f"{ids.shape[0]} ids waited for the updates this batch already made to them"
        else:
            blocked = fresh[table.counts[fresh] > self.staleness]
            n = int(np.isin(table.slots(ids), blocked).sum())
            what = (f"{n} of {ids.shape[0]} ids waited for earlier updates (more than "
                    f"staleness={self.staleness} pending)")
        return PipelineTimeout(
            f"{self.names[module]}: {what} and {self.worker.timeout:g} s passed without the "
            f"update worker applying them ({self.worker.state()})")
