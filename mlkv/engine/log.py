"""The HybridLog: a page ring in memory (the buffer pool) over segment files on a device.

Markers, all logical addresses (byte offsets into the log)::

    begin              head                  read_only                  tail
      |   on disk only   |  in memory, immutable  |  in memory, mutable    |
      +------------------+------------------------+------------------------+---> grows
                         |<----------- at most n_frames pages ------------>|

- ``[read_only, tail)``: updates happen in place.
- ``[head, read_only)``: in memory but immutable; an update copies the record to the tail.
- ``[begin, head)``: on disk only.

The buffer pool is ``n_frames = memory_bytes // page_bytes`` frames; page ``p`` lives in frame
``p % n_frames``. The allocator owns the markers: kernels append at the tail up to
``limit_page`` (the last page with a free frame); :meth:`HybridLog.make_room` then evicts the
oldest pages (writing them out if dirty) and moves ``head`` and ``read_only`` up.
"""

from __future__ import annotations

import numpy as np

from ..config import MIN_FRAMES
from ..errors import CorruptionError
from . import _checksum_kernels as CK
from . import _log_kernels as K
from .buffers import aligned_empty
from .layout import FIRST_ADDRESS_PAGE, RecordLayout

MUTABLE_FRACTION = 0.9


def geometry(layout: RecordLayout, n_frames: int) -> np.ndarray:
    """The ``geo`` array kernels take (indexed by ``_log_kernels.G_*``)."""
    geo = np.zeros(K.N_GEOMETRY, dtype=np.int64)
    geo[K.G_PAGE_BITS] = layout.page_bits
    geo[K.G_FRAMES] = n_frames
    geo[K.G_RECORD_WORDS] = layout.record_bytes // 8
    geo[K.G_DIM] = layout.dim
    geo[K.G_STATE_DIM] = layout.state_dim
    geo[K.G_VALUE_BASE] = layout.value_offset // layout.itemsize
    geo[K.G_STATE_BASE] = layout.state_offset // 4
    geo[K.G_VALUES_PER_WORD] = 8 // layout.itemsize
    return geo


def kernel_dtype(dtype) -> np.dtype:
    """The dtype kernels move values as: Numba has no float16, so its bits travel as uint16."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint16) if dtype == np.float16 else dtype


class HybridLog:
    """Buffer pool and markers of one store.

    Parameters
    ----------
    layout : RecordLayout
        Record and page geometry.
    dtype : numpy.dtype
        Dtype of the embedding values.
    memory_bytes : int
        Budget of the page frames.
    device : FileDevice
        Where evicted pages go.
    """

    def __init__(self, layout: RecordLayout, dtype, memory_bytes: int, device):
        self.layout = layout
        self.device = device
        self.n_frames = max(MIN_FRAMES, memory_bytes // layout.page_bytes)
        self.mutable_pages = max(1, int(self.n_frames * MUTABLE_FRACTION))
        #: how many pages one eviction writes at once (fewer, larger writes)
        self.evict_pages = max(1, self.n_frames // 16)
        self.frames = aligned_empty(self.n_frames * layout.page_bytes).reshape(
            self.n_frames, layout.page_bytes)
        self.words = self.frames.view(np.int64)
        self.vals = self.frames.view(kernel_dtype(dtype))
        self.f32 = self.frames.view(np.float32)
        self.dirty = np.zeros(self.n_frames, dtype=np.uint8)
        self.geo = geometry(layout, self.n_frames)
        self.marks = np.zeros(K.N_MARKS, dtype=np.int64)
        #: the same markers read as Python ints: 10x cheaper than indexing the array, and
        #: markers are read after every kernel call
        self.mark = memoryview(self.marks)
        self.restore(FIRST_ADDRESS_PAGE << layout.page_bits, FIRST_ADDRESS_PAGE << layout.page_bits)

    # ---- markers -------------------------------------------------------------------------
    @property
    def begin(self) -> int:
        return self.mark[K.M_BEGIN]

    @property
    def head(self) -> int:
        return self.mark[K.M_HEAD]

    @property
    def read_only(self) -> int:
        return self.mark[K.M_READ_ONLY]

    @property
    def tail(self) -> int:
        return self.mark[K.M_TAIL]

    def markers(self) -> dict:
        return {"begin": self.begin, "head": self.head, "read_only": self.read_only,
                "tail": self.tail}

    def _set_limit(self) -> None:
        self.marks[K.M_LIMIT_PAGE] = (self.head >> self.layout.page_bits) + self.n_frames - 1

    def _open_page(self) -> int:
        return self.mark[K.M_OPEN_PAGE]

    def shift_read_only(self) -> None:
        """Keep the newest ``mutable_pages`` pages mutable; older ones become read-only."""
        mark = self.mark                     # runs after every batch: see __init__
        page_bits, head = self.layout.page_bits, mark[K.M_HEAD]
        newest = max(mark[K.M_OPEN_PAGE], head >> page_bits)
        boundary = max(0, newest - self.mutable_pages + 1) << page_bits
        mark[K.M_READ_ONLY] = max(mark[K.M_READ_ONLY], head, min(boundary, mark[K.M_TAIL]))

    # ---- eviction and flushing -------------------------------------------------------------
    def make_room(self) -> None:
        """Evict the oldest pages so the tail can open at least one more page."""
        page_bits = self.layout.page_bits
        head_page = self.head >> page_bits
        open_page = self._open_page()
        # Keep the open tail page; evict a group of the oldest pages at once.
        last = min(head_page + self.evict_pages, open_page)
        if last <= head_page:
            raise AssertionError("buffer pool has no page to evict")
        self._flush_pages(head_page, last)
        self.marks[K.M_HEAD] = last << page_bits
        self.marks[K.M_READ_ONLY] = max(self.read_only, self.head)
        self._set_limit()

    def move_begin(self, address: int) -> None:
        """Drop the log below ``address`` (compaction moved its live records to the tail)."""
        if not self.begin <= address <= self.head:
            raise ValueError(f"begin {address} outside [{self.begin}, {self.head}]")
        self.marks[K.M_BEGIN] = address

    def seal(self) -> None:
        """Make every record below the tail read-only (at a checkpoint).

        A checkpoint's records must never change on disk afterwards: a reader at that
        checkpoint, or a reopen after a crash, reads them. Updating one in place and flushing
        its page again would leak the update into the checkpoint, so later updates copy to
        the tail instead, as FASTER does.
        """
        self.marks[K.M_READ_ONLY] = self.tail

    def flush(self) -> None:
        """Write every dirty in-memory page (for close and checkpoint); they stay in memory."""
        open_page = self._open_page()
        if open_page >= 0:
            self._flush_pages(self.head >> self.layout.page_bits, open_page + 1)

    def _flush_pages(self, first: int, stop: int) -> None:
        """Write the dirty pages among ``[first, stop)``, consecutive runs in one call each."""
        page = first
        while page < stop:
            if not self.dirty[page % self.n_frames]:
                page += 1
                continue
            run = page
            while run < stop and self.dirty[run % self.n_frames]:
                run += 1
            CK.seal_pages(self.words, self.layout.page_bits, self.layout.record_bytes // 8,
                          page, run)
            self.device.write_pages(page, [self.frames[p % self.n_frames] for p in range(page, run)])
            for p in range(page, run):
                self.dirty[p % self.n_frames] = 0
            page = run

    # ---- recovery --------------------------------------------------------------------------
    def restore(self, begin: int, tail: int) -> None:
        """Set the markers of a reopened log: everything on disk, the tail page reloaded."""
        page_bits = self.layout.page_bits
        tail_page = tail >> page_bits
        self.marks[K.M_BEGIN] = begin
        self.marks[K.M_HEAD] = tail_page << page_bits
        self.marks[K.M_READ_ONLY] = tail          # the checkpoint's records are sealed
        self.marks[K.M_TAIL] = tail
        if tail & (self.layout.page_bytes - 1):
            frame = self.frames[tail_page % self.n_frames]
            self.device.read_page(tail_page, frame)
            n_records = (tail & (self.layout.page_bytes - 1)) // self.layout.record_bytes
            bad = np.empty(self.layout.records_per_page + 1, dtype=np.int64)
            if CK.check_page(frame.view(np.int64), tail_page << page_bits,
                             self.layout.record_bytes // 8, n_records, bad):
                raise CorruptionError(
                    f"{self.device.page_location(tail_page)}: the log's tail page {tail_page} "
                    f"is damaged (records {bad[0]}... fail their checksum)")
            # A writer that crashed after the checkpoint may have appended to this page;
            # new records must land on zeros (fresh state, sound padding), as on a new page.
            frame[tail & (self.layout.page_bytes - 1):] = 0
            self.marks[K.M_OPEN_PAGE] = tail_page
        else:
            self.marks[K.M_OPEN_PAGE] = tail_page - 1
        self._set_limit()

    @property
    def resident_bytes(self) -> int:
        """Bytes of page frames that hold (or have held) log pages."""
        pages = self._open_page() + 1 - (self.head >> self.layout.page_bits)
        return max(0, min(pages, self.n_frames)) * self.layout.page_bytes

    @property
    def nbytes(self) -> int:
        return self.frames.nbytes
