"""Bit and byte layouts of addresses, records and record headers.

Logical address
---------------
A logical address is a byte offset into the ever-growing log::

    63                 segment_bits                page_bits                 0
    +-----------------------+---------------------------+--------------------+
    |   segment number      |  page within segment      |  byte within page  |
    +-----------------------+---------------------------+--------------------+

Records never straddle a page: a page holds ``records_per_page`` records from its start and
the bytes after the last one are padding. The log starts at page 1 (``FIRST_ADDRESS_PAGE``;
page 0 is a hole in segment 0 that takes no disk), so no record lives at address 0 and an
index slot holding 0 is empty. ``-1`` is "no address" in the arrays operations return.

Record
------
Every record of a store has the same size, a multiple of 8 bytes::

    offset 0        8        16                     16 + dim*itemsize (rounded up to 4)
    +--------+--------+----------------------------+---------------------------+-----+
    | header |  key   |  value[dim]  (store dtype) | state[state_dim] (float32)| pad |
    +--------+--------+----------------------------+---------------------------+-----+

Header (one little-endian uint64)
---------------------------------
::

    63        56 55        48 47                              16 15               0
    +-----------+------------+---------------------------------+------------------+
    | reserved  |   flags    |     checksum (32 bits)          | pending reads    |
    +-----------+------------+---------------------------------+------------------+

- ``pending reads``: rows handed to training whose update has not come back (staleness).
  Kept in memory only: the checksum leaves it out.
- ``checksum``: written when the record's page is flushed (see
  :mod:`mlkv.engine._checksum_kernels`); it covers the rest of the header, the key, the
  values, the state and the record's own logical address, so a flipped bit, a torn page or a
  page written to the wrong place is caught when the record is read back.
- ``flags``: bit 0 ``VALID`` (a written record; all-zero padding has it clear),
  bit 1 ``TOMBSTONE`` (the key was deleted here).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

HEADER_BYTES = 8
KEY_BYTES = 8
FIRST_ADDRESS_PAGE = 1

# header words as int64, the type the kernels write them as
FLAGS_SHIFT = np.int64(48)
FLAG_VALID = np.int64(1)
FLAG_TOMBSTONE = np.int64(2)
CHECKSUM_SHIFT = np.int64(16)
PENDING_MASK = np.int64(0xFFFF)
#: header bits the checksum covers: all but the pending counter and the checksum itself
CHECKED_HEADER_MASK = np.int64(-(1 << 48))      # bits 48..63 (the flags and above)


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """Byte offsets of one store's records and how they pack into pages.

    The derived sizes are computed once (every store call reads some of them).
    """

    dim: int
    itemsize: int
    state_dim: int
    page_bits: int
    segment_bits: int

    @functools.cached_property
    def value_offset(self) -> int:
        return HEADER_BYTES + KEY_BYTES

    @functools.cached_property
    def value_bytes(self) -> int:
        return self.dim * self.itemsize

    @functools.cached_property
    def state_offset(self) -> int:
        return _round_up(self.value_offset + self.value_bytes, 4)

    @functools.cached_property
    def state_bytes(self) -> int:
        return 4 * self.state_dim

    @functools.cached_property
    def record_bytes(self) -> int:
        return _round_up(self.state_offset + self.state_bytes, 8)

    @functools.cached_property
    def page_bytes(self) -> int:
        return 1 << self.page_bits

    @functools.cached_property
    def records_per_page(self) -> int:
        return self.page_bytes // self.record_bytes

    def check(self, memory_bytes: int, min_frames: int) -> None:
        """Raise ValueError unless a record fits a page and the budget ``min_frames`` pages."""
        if self.records_per_page < 1:
            raise ValueError(
                f"a record of {self.record_bytes} bytes does not fit a page of "
                f"{self.page_bytes} bytes: raise page_bits")
        if memory_bytes < min_frames * self.page_bytes:
            raise ValueError(
                f"memory_bytes={memory_bytes} is below the minimum buffer pool of "
                f"{min_frames} pages of {self.page_bytes} bytes")


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
