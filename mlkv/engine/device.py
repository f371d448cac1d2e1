"""Segment files: where log pages go when they leave memory, and where cold rows come from.

The log's address space is cut into segment files of ``2**segment_bits`` bytes,
``segment-000000.log``, ``segment-000001.log``, ...; page ``p`` sits at byte
``(p << page_bits) % segment_bytes`` of segment ``(p << page_bits) >> segment_bits``.

The OS page cache must not become a second, unbounded cache of the table. Where the file
system allows it, segments are opened with ``O_DIRECT``: page writes and row reads bypass the
page cache entirely. Elsewhere (tmpfs, some network file systems) the device falls back to
buffered I/O with ``POSIX_FADV_RANDOM`` and drops what it read or wrote with
``POSIX_FADV_DONTNEED`` right after each read run or page write.

Reads of cold rows are sorted by address, merged into runs of adjacent blocks, and split over
``io_threads`` Python threads, each running a GIL-free kernel that calls ``pread``: a batch
keeps many reads in flight instead of waiting on the disk one row at a time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading

import numpy as np

from ..errors import DeviceError
from . import _device_kernels as K
from .buffers import aligned_empty

BLOCK_BYTES = 4096
MAX_RUN_BYTES = 64 << 10
MIN_ROWS_PER_THREAD = 16
DEFAULT_IO_THREADS = 32


class FileDevice:
    """Segment files in one directory.

    Parameters
    ----------
    directory : str
        Where the segment files live.
    page_bits, segment_bits : int
        Log geometry (see :mod:`mlkv.engine.layout`).
    readonly : bool
        Open files read-only; writes raise ``DeviceError``.
    direct : bool or None
        Use ``O_DIRECT``; ``None`` tries it and falls back to buffered I/O.
    io_threads : int
        Threads a batch's cold reads are split over.
    """

    def __init__(self, directory, page_bits, segment_bits, readonly=False, direct=None,
                 io_threads=DEFAULT_IO_THREADS):
        self.directory = directory
        self.page_bits = page_bits
        self.segment_bits = segment_bits
        self.readonly = readonly
        block = _direct_block_bytes(directory) if direct is not False else 0
        if direct and not block:
            raise DeviceError(f"O_DIRECT is not supported by the file system of {directory!r}")
        self.direct = bool(block)
        #: unit of row reads: the device's O_DIRECT alignment (often 512 bytes), else 4 KiB
        self.block_bytes = block or BLOCK_BYTES
        self.io_threads = max(1, int(io_threads))
        self.bytes_read = 0
        self.bytes_written = 0
        self._fds = np.full(16, -1, dtype=np.int32)
        # Reads may run outside the store's lock (a lookahead), beside other reads and beside
        # a compaction: each read takes a scratch set of its own, and files are closed only
        # once no read is in flight.
        self._scratch_sets = []                 # free sets: one buffer per I/O thread
        self._readers = 0
        self._idle = threading.Condition()
        self._pool = None
        for name in sorted(os.listdir(directory)):
            if name.startswith("segment-") and name.endswith(".log"):
                self._open(int(name[8:-4]), create=False)

    # ---- files ---------------------------------------------------------------------------
    def segment_path(self, segment: int) -> str:
        return os.path.join(self.directory, f"segment-{segment:06d}.log")

    def location(self, address: int) -> str:
        """Where log ``address`` is stored: its segment file and byte offset (for messages)."""
        offset = address & ((1 << self.segment_bits) - 1)
        return f"{self.segment_path(address >> self.segment_bits)} at byte {offset:,}"

    def page_location(self, page: int) -> str:
        return self.location(page << self.page_bits)

    def segments(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(self._fds >= 0)]

    def disk_bytes(self) -> int:
        return sum(os.fstat(int(self._fds[s])).st_size for s in self.segments())

    def _open(self, segment: int, create: bool) -> int:
        if segment >= self._fds.shape[0]:
            grown = np.full(max(segment + 1, 2 * self._fds.shape[0]), -1, dtype=np.int32)
            grown[:self._fds.shape[0]] = self._fds
            self._fds = grown
        if self._fds[segment] < 0:
            flags = os.O_RDONLY if self.readonly else os.O_RDWR | (os.O_CREAT if create else 0)
            if self.direct:
                flags |= os.O_DIRECT
            try:
                fd = os.open(self.segment_path(segment), flags, 0o644)
            except OSError as exc:
                raise DeviceError(f"cannot open {self.segment_path(segment)}: {exc}") from exc
            if not self.direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[segment] = fd
        return int(self._fds[segment])

    # ---- writes --------------------------------------------------------------------------
    def write_pages(self, first_page: int, pages: list) -> None:
        """Write consecutive whole pages (aligned uint8 arrays) starting at ``first_page``."""
        if self.readonly:
            raise DeviceError("device is read-only")
        pages_per_segment = 1 << (self.segment_bits - self.page_bits)
        page = first_page
        while pages:
            segment = page // pages_per_segment
            take = min(len(pages), pages_per_segment - page % pages_per_segment)
            fd = self._open(segment, create=True)
            offset = (page % pages_per_segment) << self.page_bits
            length = take << self.page_bits
            try:
                written = self._pwritev(fd, pages[:take], offset)
                if written == length and not self.direct:
                    # written pages leave the page cache: flush them, then drop them
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            except OSError as exc:
                raise DeviceError(f"writing {self.segment_path(segment)}: {exc}") from exc
            if written != length:
                raise DeviceError(f"short write to {self.segment_path(segment)}: "
                                  f"{written} of {length} bytes")
            self.bytes_written += length
            pages = pages[take:]
            page += take

    def read_page(self, page: int, out: np.ndarray) -> None:
        """Read one whole page into ``out`` (an aligned uint8 array of the page size)."""
        pages_per_segment = 1 << (self.segment_bits - self.page_bits)
        fd = self._open(page // pages_per_segment, create=False)
        try:
            got = self._preadv(fd, [out], (page % pages_per_segment) << self.page_bits)
        except OSError as exc:
            raise DeviceError(f"reading page {page} of {self.page_location(page)}: {exc}") from exc
        if got != out.nbytes:
            raise DeviceError(f"short read of page {page} ({self.page_location(page)}): "
                              f"{got} of {out.nbytes} bytes")
        self.bytes_read += got

    def read_pages(self, first_page: int, out: np.ndarray) -> int:
        """Read consecutive pages of one segment into ``out`` (aligned, whole pages).

        Returns how many whole pages the segment file holds from ``first_page`` on (0 when
        the file does not exist): pages never written are not there.
        """
        pages_per_segment = 1 << (self.segment_bits - self.page_bits)
        segment = first_page // pages_per_segment
        if (first_page + (out.nbytes >> self.page_bits) - 1) // pages_per_segment != segment:
            raise ValueError("read_pages: the pages must lie in one segment")
        if not os.path.exists(self.segment_path(segment)):
            return 0
        fd = self._open(segment, create=False)
        offset = (first_page % pages_per_segment) << self.page_bits
        try:
            got = self._preadv(fd, [out], offset)
        except OSError as exc:
            raise DeviceError(f"reading {self.page_location(first_page)}: {exc}") from exc
        if not self.direct:
            os.posix_fadvise(fd, offset, got, os.POSIX_FADV_DONTNEED)
        self.bytes_read += got
        return got >> self.page_bits

    def sync(self) -> None:
        """Make every write so far durable (fsync each segment)."""
        for s in self.segments():
            try:
                self._fsync(int(self._fds[s]))
            except OSError as exc:
                raise DeviceError(f"fsync of {self.segment_path(s)} failed: {exc}") from exc

    # ---- system calls (one place, so a test device can make them fail) ----------------------
    def _pwritev(self, fd: int, buffers: list, offset: int) -> int:
        return os.pwritev(fd, buffers, offset)

    def _preadv(self, fd: int, buffers: list, offset: int) -> int:
        return os.preadv(fd, buffers, offset)

    def _fsync(self, fd: int) -> None:
        os.fsync(fd)

    # ---- reads ---------------------------------------------------------------------------
    def read_records(self, addrs: np.ndarray, record_bytes: int) -> np.ndarray:
        """Records at sorted, unique ``addrs``, as a uint8 array ``[len(addrs), record_bytes]``."""
        out = np.empty((addrs.shape[0], record_bytes), dtype=np.uint8)
        scratch_bytes = max(MAX_RUN_BYTES, record_bytes) + 2 * self.block_bytes
        n_threads = min(self.io_threads, max(1, addrs.shape[0] // MIN_ROWS_PER_THREAD))
        bounds = np.linspace(0, addrs.shape[0], n_threads + 1).astype(np.int64)
        with self._idle:
            self._readers += 1
            scratch = self._scratch_sets.pop() if self._scratch_sets else []
            if self._pool is None and n_threads > 1:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.io_threads, thread_name_prefix="mlkv-io")
        try:
            if not scratch or scratch[0].nbytes < scratch_bytes:
                scratch = [aligned_empty(scratch_bytes) for _ in range(self.io_threads)]
            args = [(addrs[lo:hi], out[lo:hi], scratch[t])
                    for t, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]
            if len(args) <= 1:
                results = [self._read_part(*a) for a in args]
            else:
                results = list(self._pool.map(lambda a: self._read_part(*a), args))
        finally:
            with self._idle:
                self._scratch_sets.append(scratch)
                self._readers -= 1
                self._idle.notify_all()
        self.bytes_read += sum(results)
        return out



    def _read_part(self, addrs, out, scratch, fds=None) -> int:
        got = K.read_records(self._fds if fds is None else fds, self.segment_bits, addrs,
                             out.shape[1], self.block_bytes, MAX_RUN_BYTES, scratch, out,
                             not self.direct)
        if got < 0:
            address = int(addrs[-got - 1])
            segment = address >> self.segment_bits
            raise DeviceError(
                f"short read at log address {address} in {self.segment_path(segment)}")
        return got

    def remove_segments_below(self, segment: int) -> int:
        """Delete the segment files numbered below ``segment`` (their data is dead).

        Also those a crash left behind after an earlier compaction. Returns bytes deleted.
        """
        if self.readonly:
            raise DeviceError("device is read-only")
        with self._idle:                # no read in flight, and none starts meanwhile
            self._idle.wait_for(lambda: self._readers == 0)
            for s in self.segments():
                if s < segment:
                    os.close(int(self._fds[s]))
                    self._fds[s] = -1
        freed = 0
        for name in os.listdir(self.directory):
            if name.startswith("segment-") and name.endswith(".log") and int(name[8:-4]) < segment:
                path = os.path.join(self.directory, name)
                freed += os.path.getsize(path)
                os.remove(path)
        return freed

    def close(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._readers == 0)
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            for s in self.segments():
                os.close(int(self._fds[s]))
                self._fds[s] = -1


def _direct_block_bytes(directory: str) -> int:
    """The smallest read size O_DIRECT accepts in ``directory`` (512 or 4096), 0 if none."""
    # a name of its own: several processes may open one store at once
    probe = os.path.join(directory, f".direct-probe-{os.getpid()}-{os.urandom(6).hex()}")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return 0
    try:
        buf = aligned_empty(BLOCK_BYTES)
        buf[:] = 0
        if os.pwritev(fd, [buf], 0) != BLOCK_BYTES:
            return 0
        for block in (512, 1024, 2048, BLOCK_BYTES):
            try:
                if os.preadv(fd, [buf[block:2 * block]], block) == block:
                    return block
            except OSError:
                continue
        return 0
    except OSError:
        return 0
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)
