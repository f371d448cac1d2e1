"""The store's lock file: one writer per store, across processes.

``flock`` on ``PATH/lock``: held while a store is open for writing and released by the OS if
the process dies, so a crash never leaves a store locked. Locks belong to open file
descriptions, so a second ``Store`` on the same path in the same process is refused too.
"""

from __future__ import annotations

import fcntl
import os

from .errors import StoreLockedError


def take(path: str) -> int:
    """Lock the store at ``path`` for writing; returns the descriptor to :func:`release`."""
    fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(
            f"store at {path!r} is open for writing elsewhere (another process, or another "
            f"Store object in this one); close it first or open with readonly=True") from None
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
