"""The guard every :class:`mlkv.Store` call runs under (``with store._op(write) as engine``).

It holds the store's lock for the operation and refuses to start one on a closed store, on a
store stopped by a device error, or (``write``) a write on a read-only store. A device error
raised inside stops the store: what is in memory may no longer match the disk, so every
later call fails until the store is reopened at its last checkpoint.
"""

from __future__ import annotations

from .engine.updates import finish_update
from .errors import ClosedStoreError, DeviceError, ReadOnlyError


class Operation:
    """The context of ``Store._op`` (a class: a training step makes two store calls, and
    a generator-based context manager cost a microsecond each)."""

    __slots__ = ("store", "write")

    def __init__(self, store, write: bool):
        self.store, self.write = store, write

    def __enter__(self):
        s = self.store
        s._lock.acquire()
        if s._closed:
            error = ClosedStoreError(f"store at {s.path!r} is closed")
        elif s._failure is not None:
            error = DeviceError(
                f"store at {s.path!r} stopped after a device error ({s._failure}); close and "
                f"reopen it to return to checkpoint {s.checkpoint_id}")
        elif self.write and s.readonly:
            error = ReadOnlyError(f"store at {s.path!r} is open read-only")
        else:
            eng = s._engine
            if eng.pending is None:
                return eng
            try:                 # an update left to the helper thread: finish it first
                finish_update(eng)
                return eng
            except BaseException as exc:
                self.__exit__(type(exc), exc, None)
                raise
        s._lock.release()
        raise error

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, DeviceError):
            self.store._failure = exc
        self.store._lock.release()
