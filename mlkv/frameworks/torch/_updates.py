"""The update worker: one thread that applies a pass's updates in FIFO order.

The training thread queues two kinds of item under the worker's condition ``cond``:

- an update (:class:`Update`): the coalesced gradient one backward handed over, applied with
  ``module._apply_update``; ``applied_seq`` then says how far the worker got;
- a release (a list of ``(counts, slots)``): queued when a batch ends, behind that batch's
  updates, it takes one off each counter the batch's reads added (see
  :mod:`mlkv.frameworks.torch._staleness`); ``released`` counts them.

Every wait of the training thread on the worker goes through :meth:`UpdateWorker.wait`:
bounded by ``timeout`` (then a :class:`PipelineTimeout` saying what the worker is doing) and
raising the worker's error instead of waiting for a worker that is gone.

An exception in ``_apply_update`` ends the thread. It is raised once, itself, in the training
thread (:meth:`UpdateWorker.raise_error`); afterwards the pass can only fail, with a
:class:`PipelineError` caused by it.

Decisions
---------
*One worker, FIFO.* Several workers could reorder two updates of one row; one worker keeps
the store's order that of serial training, and the store's kernels release the GIL, so it
overlaps the training thread's compute.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import NamedTuple

import numpy as np

from ._errors import PipelineError, PipelineTimeout, note


class Update(NamedTuple):
    """One queued update: ``module._apply_update(ids, grads, step)``, made in ``batch``."""

    seq: int
    module: object
    ids: np.ndarray
    grads: np.ndarray
    step: int
    batch: int


class UpdateWorker:
    """The thread applying one pass's queued updates and releases, and the waits on it.

    Parameters
    ----------
    names : dict
        ``{module: name}`` for messages.
    timeout : float
        Seconds any wait on the worker may last.
    stats : dict
        The pipeline's counters; the worker adds to them under ``cond``.
    """

    def __init__(self, names: dict, timeout: float, stats: dict):
        self.names, self.timeout, self.stats = names, timeout, stats
        self.cond = threading.Condition(threading.Lock())
        self.queue = collections.deque()   # Update, release list, or None: the stop marker
        self.next_seq = 0                  # sequence number of the next update queued
        self.applied_seq = -1              # last update applied
        self.ended = 0                     # releases queued (batches ended)
        self.released = 0                  # of those, releases done
        self.busy = None                   # (update, since) while applying, for messages
        self.error = None                  # the exception that ended the thread
        self.error_reported = False        # raised in the training thread already
        self.thread = threading.Thread(target=self._run, name="mlkv-pipeline-updates",
                                       daemon=True)
        self.thread.start()

    # ---- the training thread's side; callers hold ``cond`` ----------------------------------
    def submit(self, module, ids, grads, step, batch) -> int:
        """Queue an update; returns its sequence number."""
        self.raise_error()
        seq = self.next_seq
        self.next_seq += 1
        self.queue.append(Update(seq, module, ids, grads, step, batch))
        self.cond.notify_all()
        return seq

    def release(self, releases: list) -> None:
        """Queue the release of a batch's reads, behind every update queued so far."""
        self.queue.append(releases)
        self.ended += 1
        self.cond.notify_all()

    def raise_error(self) -> None:
        """Raise the worker's error: itself the first time, then a PipelineError from it."""
        if self.error is None:
            return
        if not self.error_reported:
            self.error_reported = True
            raise self.error
        raise PipelineError("the pipeline's update worker failed earlier; the pass cannot go "
                            "on") from self.error

    def wait(self, ready, make_timeout, stat: str) -> None:
        """Wait on ``cond`` until ``ready()``; raise the worker's error or ``make_timeout()``.

        The seconds spent waiting are added to ``stats[stat]``.
        """
        if ready():
            return
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        try:
            while not ready():
                self.raise_error()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise make_timeout()
                self.cond.wait(remaining)
        finally:
            self.stats[stat] += time.monotonic() - t0

    def state(self) -> str:
        """What the worker is doing, for timeout messages."""
        if self.busy is not None:
            update, since = self.busy
            doing = (f"it has been applying the update of batch {update.batch} to "
                     f"{self.names[update.module]} for {time.monotonic() - since:.1f} s")
        else:
            doing = "it is idle" if self.thread.is_alive() else "it is not running"
        return f"{self._queued_updates()} updates queued; {doing}"

    # ---- the training thread's side; callers do not hold ``cond`` ---------------------------
    def wait_for_room(self, max_queued_batches: int) -> None:
        """Keep the training thread at most ``max_queued_batches`` ended batches ahead."""
        with self.cond:
            self.wait(lambda: self.ended - self.released < max_queued_batches,
                      lambda: PipelineTimeout(
                          f"the training thread waited {self.timeout:g} s for the update "
                          f"worker to catch up to max_queued_batches={max_queued_batches} "
                          f"({self.state()})"),
                      "queue_wait_seconds")

    def drain(self) -> None:
        """Wait until everything queued so far is applied (a failed worker never gets there:
        its error is raised)."""
        with self.cond:
            target, ended = self.next_seq - 1, self.ended
            self.wait(lambda: self.applied_seq >= target and self.released >= ended,
                      lambda: PipelineTimeout(
                          f"the update worker did not apply the pipeline's pending updates "
                          f"within {self.timeout:g} s ({self.state()})"),
                      "queue_wait_seconds")

    def stop(self, join_seconds: float) -> list:
        """Apply everything queued, then end the thread.

        Returns the problems (the worker's error, a timeout) the training thread has not
        seen. A worker that failed or is stuck has what it has not taken dropped, so nothing
        reaches the store after the pass is over; a stuck one is left behind (a daemon).
        """
        with self.cond:
            seen = self.error_reported
        problems = []
        if not seen:                       # an error already raised needs no drain to show
            try:
                self.drain()
            except BaseException as exc:               # noqa: BLE001 - returned
                problems.append(exc)
        failed = seen or bool(problems)
        with self.cond:
            if failed:
                dropped = self._queued_updates()
                self.queue.clear()
                if dropped and problems:
                    note(problems[0], f"{dropped} queued updates were not applied")
            self.queue.append(None)        # the stop marker, behind everything queued
            self.cond.notify_all()
        self.thread.join(0.0 if failed else join_seconds)
        error = self.error                 # it may have failed after a drain timed out
        if error is not None and not seen and all(p is not error for p in problems):
            problems.append(error)
        return problems

    def _queued_updates(self) -> int:
        return sum(1 for item in self.queue if isinstance(item, Update))

    # ---- the worker thread ------------------------------------------------------------------
    def _run(self):
        cond, stats = self.cond, self.stats
        while True:
            with cond:
                while not self.queue:
                    cond.wait()
                item = self.queue.popleft()
                if item is None:
                    return
                if not isinstance(item, Update):   # a release: cheap, done under the lock
                    for counts, slots in item:
                        counts[slots] -= 1
                    self.released += 1
                    cond.notify_all()
                    continue
                self.busy = (item, time.monotonic())
            t0 = time.perf_counter()
            try:
                item.module._apply_update(item.ids, item.grads, item.step)
            except BaseException as exc:              # noqa: BLE001 - handed to training
                with cond:
                    self.error = exc
                    self.busy = None
                    cond.notify_all()
                return
            with cond:
                self.applied_seq = item.seq
                self.busy = None
                stats["updates"] += 1
                stats["update_rows"] += item.ids.shape[0]
                stats["update_seconds"] += time.perf_counter() - t0
                cond.notify_all()
