"""The process's helper thread: a second core for the rows of a batch in memory.

A store opened with ``threads=2`` shares the in-memory part of its large reads with one
helper thread, the same for every store of the process, and leaves it the updates it is
allowed not to wait for (see :mod:`._pair_kernels` for how the work is split and handed
over, and :func:`.updates.update`). The helper spins in a
Numba kernel, holding no GIL, for about a millisecond after its last job, so the next batch
of a training loop finds it awake; then it sleeps on an ``Event`` until a store wakes it.
A batch that finds it asleep runs on one thread and wakes it for the next.

Only one operation at a time posts to the helper (:attr:`Helper.lock`, taken without
waiting: an operation that finds it taken runs on one thread). After a ``fork`` the child
starts with a new, sleeping helper of its own, and the parent's thread is stopped at exit.
"""

from __future__ import annotations

import atexit
import os
import threading

import numpy as np

from . import _pair_kernels as PK

#: spins of :func:`._pair_kernels.serve` with no job before the helper sleeps: about 1 ms
#: here (a ``pause`` is some 40-70 cycles)
SPIN_LIMIT = 30_000


class Helper:
    """One helper thread and its control block."""

    def __init__(self):
        self.control = np.zeros(PK.CONTROL_WORDS, dtype=np.int64)
        #: held by the operation that posts to :attr:`control`
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None

    def wake(self) -> None:
        """Start the thread, or wake it: it helps from the next batch on."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mlkv-helper", daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if PK.serve(self.control, SPIN_LIMIT):
                return

    def stop(self) -> None:
        """Stop the thread for good (at exit)."""
        self.control[PK.STOP] = 1
        if self._thread is not None:
            self._wake.set()
            self._thread.join(timeout=5)


_helper: Helper | None = None
_create_lock = threading.Lock()


def helper() -> Helper:
    """The process's helper (created on first use; its thread starts at the first wake)."""
    global _helper
    if _helper is None:
        with _create_lock:
            if _helper is None:
                _helper = Helper()
    return _helper


def check_threads(threads) -> None:
    """Raise ``ValueError`` unless ``threads`` (a store's option) is 1 or 2."""
    if (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
            or threads not in (1, 2)):
        raise ValueError(f"threads must be 1 or 2, got {threads!r}")


def for_store(threads: int, dtype) -> Helper | None:
    """The helper a store opened with ``threads`` shares its work with: the process's, for a
    float32 store with 2 (the helper's kernels read float32 rows), else None."""
    return helper() if threads == 2 and dtype == np.float32 else None


def _forget_in_child() -> None:
    # the parent's thread does not exist in a forked child; its control block says what the
    # parent's helper was doing
    global _helper, _create_lock
    _helper, _create_lock = None, threading.Lock()


@atexit.register
def _stop_at_exit() -> None:
    if _helper is not None:
        _helper.stop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
