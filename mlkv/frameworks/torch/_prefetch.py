"""The lookahead: a thread that reads batches ahead and brings their rows into memory.

With ``lookahead=k`` the thread takes batches from the loader up to ``k`` ahead of the one
being trained on and, for each, calls ``store.lookahead(ids)`` once per store with the union
of the ids its modules will be called with: the rows come into the store's mutable region
while the training thread computes, so the later read finds them in memory. ``lookahead``
does its disk reads without the store's lock and the store's kernels release the GIL, so the
reads overlap the training thread's compute and its own reads and updates of the store. A
lookahead never changes a value, so it never changes a number.

Batches come out in the loader's order. An error in the loader, in an ``ids_of`` or in a
lookahead travels in the place of the batch it concerns and is raised by :meth:`get` in the
training thread.
"""

from __future__ import annotations

import queue
import threading
import time
import types

import numpy as np
import torch

from ._autograd import flat_ids

END = object()          # what get() returns after the loader's last batch


def ids_array(ids) -> np.ndarray:
    """A flat int64 numpy array of ``ids`` (a tensor, array or sequence)."""
    if isinstance(ids, torch.Tensor):
        return flat_ids(ids)
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class Prefetcher:
    """A started lookahead thread over ``iterator``.

    Parameters
    ----------
    iterator : iterator
        The loader's batches; the thread owns it from now on (and closes a generator).
    groups : list
        ``[(store, [ids_of, ...])]``: each store with the ``ids_of`` of its modules.
    k : int
        Batches the thread may hold ahead of the training thread (>= 1).
    stats : dict
        The pipeline's counters; the thread adds the ``lookahead_*`` ones.
    """

    def __init__(self, iterator, groups: list, k: int, stats: dict):
        self.iterator = iterator
        self.groups = groups
        self.stats = stats
        self.room = threading.Semaphore(k)      # one permit per batch the thread may hold
        self.items = queue.SimpleQueue()        # (batch, None), (END, None) or (None, error)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mlkv-pipeline-lookahead",
                                       daemon=True)
        self.thread.start()

    def get(self):
        """The next batch, or ``END``; raises the error met in its place."""
        batch, error = self.items.get()
        self.room.release()             # the batch taken is now trained on, not ahead
        if error is not None:
            raise error
        return batch

    def stop(self, join_seconds: float) -> None:
        """Stop taking batches; wait up to ``join_seconds`` for a loader call in progress."""
        self.stopping.set()
        self.room.release()             # wake the thread if it waits for room
        self.thread.join(join_seconds)

    def _run(self):
        iterator, self.iterator = self.iterator, None     # held by this frame only
        try:
            while True:
                self.room.acquire()
                if self.stopping.is_set():
                    return
                try:
                    batch = next(iterator)
                except StopIteration:
                    self.items.put((END, None))
                    return
                self._look_ahead(batch)
                self.items.put((batch, None))
        except BaseException as exc:                      # noqa: BLE001 - handed to training
            self.items.put((None, exc))
        finally:
            # a loader generator is closed in the thread that ran it, and the reference goes
            # now: the error handed over keeps this frame alive through its traceback
            if isinstance(iterator, types.GeneratorType):
                iterator.close()
            del iterator

    def _look_ahead(self, batch) -> None:
        t0 = time.perf_counter()
        rows = 0
        for store, ids_ofs in self.groups:
            ids = np.unique(np.concatenate([ids_array(ids_of(batch)) for ids_of in ids_ofs]))
            if ids.shape[0]:
                store.lookahead(ids)
            rows += ids.shape[0]
        self.stats["lookahead_seconds"] += time.perf_counter() - t0
        self.stats["lookahead_batches"] += 1
        self.stats["lookahead_rows"] += rows
