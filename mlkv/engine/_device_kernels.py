"""Numba kernels of the segment-file device (see :mod:`mlkv.engine.device`).

They call libc's ``pread`` directly: a kernel runs with the GIL released, so several Python
threads each reading their share of a batch keep many disk reads in flight.
"""

import numpy as np
from numba import types

from .._jit import kernel

_pread = types.ExternalFunction(
    "pread", types.int64(types.int32, types.voidptr, types.uint64, types.int64))
_fadvise = types.ExternalFunction(
    "posix_fadvise", types.int32(types.int32, types.int64, types.int64, types.int32))
POSIX_FADV_DONTNEED = 4


@kernel
def read_records(fds, segment_bits, addrs, record_bytes, block_bytes, max_run_bytes,
                 scratch, out, drop_cache):
    """Read the records at sorted ``addrs`` into ``out[i, :record_bytes]``.

    Reads are whole aligned blocks of ``block_bytes`` (as O_DIRECT needs). Records whose
    blocks touch are served by one ``pread`` of up to ``max_run_bytes``; a block is read once
    for every record it holds. ``scratch`` must be aligned and hold ``max_run_bytes`` plus
    two blocks (and at least one record). With ``drop_cache`` (buffered I/O), each run's pages are dropped from the OS
    page cache right after it is read, so a batch never holds more than one run there.
    Returns the bytes read, or ``-(1 + i)`` if the read for ``addrs[i]`` failed
    or came back short.
    """
    n = addrs.shape[0]
    seg_mask = (np.int64(1) << segment_bits) - 1
    total = 0
    i = 0
    while i < n:
        seg = addrs[i] >> segment_bits
        run_start = (addrs[i] & seg_mask) // block_bytes * block_bytes
        run_end = ((addrs[i] & seg_mask) + record_bytes + block_bytes - 1) // block_bytes * block_bytes
        j = i + 1
        while j < n and (addrs[j] >> segment_bits) == seg:
            s = (addrs[j] & seg_mask) // block_bytes * block_bytes
            e = ((addrs[j] & seg_mask) + record_bytes + block_bytes - 1) // block_bytes * block_bytes
            if s > run_end or e - run_start > max_run_bytes:
                break
            if e > run_end:
                run_end = e
            j += 1
        length = run_end - run_start
        if length > scratch.shape[0]:
            return -(1 + i)
        got = _pread(fds[seg], scratch.ctypes.data, length, run_start)
        if got != length:
            return -(1 + i)
        if drop_cache:
            _fadvise(fds[seg], run_start, length, POSIX_FADV_DONTNEED)
        total += length
        for k in range(i, j):
            o = (addrs[k] & seg_mask) - run_start
            out[k, :] = scratch[o:o + record_bytes]
        i = j
    return total
