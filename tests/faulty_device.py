"""A fault-injecting segment-file device, for tests only.

:class:`FaultyDevice` is a :class:`mlkv.engine.device.FileDevice` whose system calls can be
made to fail the way real disks fail. With nothing armed it behaves exactly as its parent. A
test opens a store on it (``monkeypatch.setattr(mlkv.store.Store, "_device_class",
FaultyDevice)``), arms a fault on ``store.engine.device`` and keeps operating until it fires:

``fail_write_after_bytes``
    Writes succeed until this many more bytes have been written. The write that crosses the
    budget writes only a prefix (rounded down to ``block_bytes`` under ``O_DIRECT``, which
    needs aligned lengths), for real, and then raises ``OSError(ENOSPC)``: the torn, partial
    write a full disk gives. Every later write fails the same way (the disk stays full).
``fail_fsync``
    ``fsync`` raises ``OSError(EIO)``.
``short_reads``
    Page reads return a prefix of what was asked (half, rounded down to a block); row reads
    run the real Numba kernel with an fd table pointing every segment at an empty file
    (``/dev/null``), so the kernel's own short-read path fires.

``write_faults``, ``fsync_faults`` and ``read_faults`` count the faults fired.

:meth:`FaultyDevice.armed` makes a subclass armed from construction on, for faults that must
fire while a store is being opened (the tail-page read of recovery).
"""

from __future__ import annotations

import errno
import os
import threading

import numpy as np

from mlkv.engine.device import FileDevice


def _byte_views(buffers, nbytes):
    """Byte views of the first ``nbytes`` of ``buffers`` (each still starts where it did)."""
    views = []
    for buf in buffers:
        if nbytes <= 0:
            break
        view = memoryview(buf).cast("B")
        views.append(view[:nbytes])
        nbytes -= len(views[-1])
    return views


class FaultyDevice(FileDevice):
    """A FileDevice whose writes, fsyncs and reads fail on demand (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_write_after_bytes: int | None = None
        self.fail_fsync = False
        self.short_reads = False
        self.write_faults = 0
        self.fsync_faults = 0
        self.read_faults = 0
        self._count_lock = threading.Lock()     # row reads run on several threads
        self._empty_fd = -1

    @classmethod
    def armed(cls, **faults):
        """A subclass whose instances start with ``faults`` armed; it lists them in ``instances``."""
        instances = []

        def __init__(self, *args, **kwargs):
            cls.__init__(self, *args, **kwargs)
            for name, value in faults.items():
                if not hasattr(self, name):
                    raise AttributeError(f"FaultyDevice has no fault {name!r}")
                setattr(self, name, value)
            instances.append(self)

        return type(f"Armed{cls.__name__}", (cls,), {"__init__": __init__, "instances": instances})

    @property
    def faults(self) -> int:
        """Faults fired so far, of every kind."""
        return self.write_faults + self.fsync_faults + self.read_faults

    def _count(self, name: str) -> None:
        with self._count_lock:
            setattr(self, name, getattr(self, name) + 1)

    # ---- system calls ----------------------------------------------------------------------
    def _pwritev(self, fd, buffers, offset):
        budget = self.fail_write_after_bytes
        total = sum(memoryview(b).nbytes for b in buffers)
        if budget is None or total <= budget:
            written = super()._pwritev(fd, buffers, offset)
            if budget is not None:
                self.fail_write_after_bytes = budget - written
            return written
        prefix = budget - budget % self.block_bytes if self.direct else budget
        if prefix > 0:
            os.pwritev(fd, _byte_views(buffers, prefix), offset)
        self.fail_write_after_bytes = 0
        self._count("write_faults")
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: {prefix} of "
                                    f"{total} bytes written at offset {offset})")

    def _fsync(self, fd):
        if self.fail_fsync:
            self._count("fsync_faults")
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected fsync failure)")
        super()._fsync(fd)

    def _preadv(self, fd, buffers, offset):
        if not self.short_reads:
            return super()._preadv(fd, buffers, offset)
        total = sum(memoryview(b).nbytes for b in buffers)
        prefix = total // 2 // self.block_bytes * self.block_bytes
        self._count("read_faults")
        return os.preadv(fd, _byte_views(buffers, prefix), offset) if prefix else 0

    def _read_part(self, addrs, out, scratch, fds=None):
        if not self.short_reads:
            return super()._read_part(addrs, out, scratch, fds)
        with self._count_lock:
            if self._empty_fd < 0:
                self._empty_fd = os.open(os.devnull, os.O_RDONLY)
            self.read_faults += 1
        empty = np.full_like(self._fds if fds is None else fds, self._empty_fd)
        return super()._read_part(addrs, out, scratch, empty)

    def close(self):
        try:
            super().close()
        finally:
            if self._empty_fd >= 0:
                os.close(self._empty_fd)
                self._empty_fd = -1
