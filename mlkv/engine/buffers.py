"""Large arrays backed by anonymous memory maps.

The buffer pool and the index are the store's two large allocations. Taking them straight
from the kernel (``mmap``) rather than from malloc means:

- they are zero and take no resident memory until touched (an empty index slot is all zeros,
  so a fresh index costs nothing until keys land in it);
- parts can be handed back to the OS at once with ``madvise(MADV_DONTNEED)`` (the index
  releases the old slots as it rehashes), and all of it when the array is freed, instead of
  staying in malloc's heap;
- they are page-aligned, as ``O_DIRECT`` needs.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

PAGE_BYTES = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def anonymous(shape, dtype, hugepages: bool = False) -> np.ndarray:
    """A zeroed, page-aligned array whose memory is resident only where touched."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    # private, not mmap's default shared mapping: shared (shmem) memory gets no huge pages
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hugepages and nbytes >= 1 << 21 and hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)      # fewer TLB misses on random access
    return np.frombuffer(buf, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised-looking (in fact zero) page-aligned uint8 array of ``nbytes``."""
    return anonymous((nbytes,), np.uint8, hugepages=True)


def release(array: np.ndarray) -> None:
    """Give the whole pages inside a contiguous slice of an anonymous array back to the OS.

    They read as zeros afterwards. Only for arrays from :func:`anonymous`.
    """
    start = array.ctypes.data
    end = start + array.nbytes
    first = -(-start // PAGE_BYTES) * PAGE_BYTES
    last = end // PAGE_BYTES * PAGE_BYTES
    if last > first:
        _libc.madvise(first, last - first, _MADV_DONTNEED)
