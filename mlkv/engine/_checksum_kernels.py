"""Numba kernels of record checksums: written at flush, checked on every read from disk.

A record's checksum is 32 bits kept in its own header (see :mod:`mlkv.engine.layout`)::

    h = mix64(address)
    h = (h ^ (header & CHECKED_HEADER_MASK)) * M       # flags and reserved bits
    h = (h ^ word_k) * M      for every later word     # key, values, state, padding
    checksum = mix64(h) >> 32

``M`` is odd, so each step is a bijection of ``h`` for a fixed word and of the word for a
fixed ``h``: any change to a single word changes the final state, and the checksum then
misses it with a chance of about 2**-32. Seeding with the address catches a page written to
the wrong place. The multiply chain costs a few cycles a word, so sealing a page as it is
flushed adds little to the write.

A slot of a page is sound when it holds a valid record whose checksum matches, or is all
zeros (the padding after the last record, or the unwritten end of the tail page).
"""

import numpy as np

from .._jit import inline_kernel, kernel
from ._index_kernels import mix64
from .layout import CHECKED_HEADER_MASK, CHECKSUM_SHIFT, FLAG_TOMBSTONE, FLAG_VALID, FLAGS_SHIFT

_MULT = np.uint64(0x9E3779B97F4A7C15)
_SHIFT32 = np.uint64(32)
_CHECKSUM_BITS = np.int64(0xFFFFFFFF) << CHECKSUM_SHIFT
_LOW32 = np.int64(0xFFFFFFFF)


@inline_kernel
def record_checksum(words, base, record_words, address):
    """Checksum of the record at ``words[base:base + record_words]`` stored at ``address``."""
    h = mix64(np.uint64(address))
    h = (h ^ np.uint64(words[base] & CHECKED_HEADER_MASK)) * _MULT
    for k in range(base + 1, base + record_words):
        h = (h ^ np.uint64(words[k])) * _MULT
    return np.int64(mix64(h) >> _SHIFT32)


@inline_kernel
def _valid(header):
    return (header >> FLAGS_SHIFT) & FLAG_VALID != 0


@inline_kernel
def _stored_checksum(header):
    return (header >> CHECKSUM_SHIFT) & _LOW32


@kernel
def seal_pages(words, page_bits, record_words, first_page, stop_page):
    """Write the checksum into every valid record of pages ``[first_page, stop_page)``.

    ``words`` is the buffer pool viewed as int64 ``[n_frames, page_bytes // 8]``; page ``p``
    lives in frame ``p % n_frames``.
    """
    n_frames = words.shape[0]
    n_records = words.shape[1] // record_words
    for p in range(first_page, stop_page):
        page = words[p % n_frames]
        first_address = p << page_bits
        for r in range(n_records):
            base = r * record_words
            header = page[base]
            if _valid(header):
                c = record_checksum(page, base, record_words, first_address + base * 8)
                page[base] = (header & ~_CHECKSUM_BITS) | (c << CHECKSUM_SHIFT)


@kernel
def check_page(page, first_address, record_words, n_records, bad):
    """Damaged slots among the first ``n_records`` of one page (int64 view).

    Writes their slot numbers to ``bad`` and returns how many there are. When every slot of
    the page is checked, the padding after the last one must be zeros too; damage there is
    reported as slot number ``records_per_page``. ``bad`` holds ``records_per_page + 1``.
    """
    n_bad = 0
    for r in range(n_records):
        base = r * record_words
        header = page[base]
        if _valid(header):
            sound = _stored_checksum(header) == record_checksum(
                page, base, record_words, first_address + base * 8)
        else:
            sound = True
            for k in range(base, base + record_words):
                if page[k] != 0:
                    sound = False
                    break
        if not sound:
            bad[n_bad] = r
            n_bad += 1
    per_page = page.shape[0] // record_words
    if n_records == per_page:
        for k in range(per_page * record_words, page.shape[0]):
            if page[k] != 0:
                bad[n_bad] = per_page
                n_bad += 1
                break
    return n_bad


@kernel
def first_bad_record(records, addrs, keys):
    """Index of the first record read from disk that is not the intact, live record of
    ``keys[i]`` at ``addrs[i]``; -1 when every one is.

    ``records`` is int64 ``[n, record_words]``, one record per row.
    """
    record_words = records.shape[1]
    for i in range(records.shape[0]):
        header = records[i, 0]
        if (not _valid(header) or (header >> FLAGS_SHIFT) & FLAG_TOMBSTONE != 0
                or records[i, 1] != keys[i]
                or _stored_checksum(header) != record_checksum(records[i], 0, record_words,
                                                               addrs[i])):
            return i
    return -1


@kernel
def check_entries(chunk, first_address, addrs, keys, record_words, bad):
    """Index entries whose record in ``chunk`` is not a valid, live record of their key.

    ``chunk`` is the log bytes ``[first_address, first_address + 8 * chunk.size)`` viewed as
    int64; every ``addrs[i]`` lies inside it. Writes positions into ``bad``; returns the count.
    """
    n_bad = 0
    for i in range(addrs.shape[0]):
        base = (addrs[i] - first_address) >> 3
        if (base + record_words > chunk.shape[0] or not _valid(chunk[base])
                or (chunk[base] >> FLAGS_SHIFT) & FLAG_TOMBSTONE != 0
                or chunk[base + 1] != keys[i]):
            bad[n_bad] = i
            n_bad += 1
    return n_bad
