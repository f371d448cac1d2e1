"""Verification: read every page of the log and check it, and check every index entry.

1. Pages ``[begin, tail)`` are read from the segment files in order, a few MiB at a time.
   Every slot of a page must hold a record whose checksum matches, or be all zeros (see
   :mod:`mlkv.engine._checksum_kernels`). Pages below ``head`` have left memory, so they
   must be on disk: one that is not is reported missing. Pages at or above ``head`` may not
   be written yet (their newest version is in memory), so only what is on disk is checked.
2. Every index entry must point at a valid, live record of its key: below ``head`` in the
   pages just read, above it in the buffer pool.

Verification reads and never writes; it holds the index entries (16 bytes a row) sorted by
address beside the store while it runs.
"""

from __future__ import annotations

import numpy as np

from ..progress import Progress
from . import _checksum_kernels as CK
from .buffers import aligned_empty, release
from .layout import FIRST_ADDRESS_PAGE

READ_BYTES = 8 << 20
#: damaged pages and bad index entries listed in a report (all are counted)
MAX_LISTED = 1000


def verify(eng, progress: bool | None = None) -> dict:
    """Check every page and index entry of an engine's log; see the module docstring.

    Returns a report: ``ok``; ``pages_checked``; ``damaged_pages``, a list of
    ``{"page", "location", "problem", "slots"}`` (``problem`` is ``"checksum"`` or
    ``"missing"``; ``slots`` the damaged record slots, ``records_per_page`` standing for the
    padding after the last one); ``bad_entries``, a list of
    ``{"key", "address"}`` whose record is not the key's live row; ``n_damaged_pages`` and
    ``n_bad_entries`` (the lists stop at 1000).
    """
    log, layout, device = eng.log, eng.layout, eng.device
    page_bits, page_bytes = layout.page_bits, layout.page_bytes
    record_words = layout.record_bytes // 8
    head_page, tail = log.head >> page_bits, log.tail
    first = max(FIRST_ADDRESS_PAGE, log.begin >> page_bits)
    stop = (tail + page_bytes - 1) >> page_bits
    pages_per_segment = 1 << (layout.segment_bits - page_bits)
    keys, addrs = eng.index.entries()
    order = np.argsort(addrs, kind="stable")
    keys, addrs = keys[order], addrs[order]
    report = {"ok": True, "pages_checked": 0, "damaged_pages": [], "bad_entries": [],
              "n_damaged_pages": 0, "n_bad_entries": 0}
    chunk_pages = max(1, READ_BYTES // page_bytes)
    buf = aligned_empty(chunk_pages * page_bytes)
    bad = np.empty(layout.records_per_page + 1, dtype=np.int64)
    with Progress(stop - first, "verify", show=progress) as bar:
        page = first
        while page < stop:
            take = min(chunk_pages, stop - page, pages_per_segment - page % pages_per_segment)
            got = device.read_pages(page, buf[:take * page_bytes])
            words = buf[:got * page_bytes].view(np.int64)
            pages = words.reshape(got, page_bytes // 8)
            for p in range(page, page + got):
                n_bad = CK.check_page(pages[p - page], p << page_bits, record_words,
                                      _records_on(p, tail, layout), bad)
                if n_bad:
                    _damaged(report, device, p, "checksum", bad[:n_bad])
            for p in range(page + got, min(page + take, head_page)):
                _damaged(report, device, p, "missing", bad[:0])
            # entries whose records were just read (and have left memory)
            lo, hi = np.searchsorted(addrs, [page << page_bits,
                                             min(page + got, head_page) << page_bits])
            if hi > lo:
                _check_entries(report, words, page << page_bits, keys[lo:hi], addrs[lo:hi],
                               record_words)
            report["pages_checked"] += got
            bar.update(take)
            page += take
    release(buf)
    # entries whose records are in the buffer pool
    lo = np.searchsorted(addrs, log.head)
    for p in np.unique(addrs[lo:] >> page_bits):
        in_page = slice(*np.searchsorted(addrs, [p << page_bits, (p + 1) << page_bits]))
        _check_entries(report, log.words[p % log.n_frames], int(p) << page_bits,
                       keys[in_page], addrs[in_page], record_words)
    report["ok"] = not (report["n_damaged_pages"] or report["n_bad_entries"])
    return report


def _records_on(page: int, tail: int, layout) -> int:
    """Record slots of ``page`` that lie below the tail."""
    start = page << layout.page_bits
    return min(layout.records_per_page, max(0, tail - start) // layout.record_bytes)


def _damaged(report, device, page, problem, slots) -> None:
    report["n_damaged_pages"] += 1
    if len(report["damaged_pages"]) < MAX_LISTED:
        report["damaged_pages"].append({"page": int(page), "location": device.page_location(page),
                                        "problem": problem, "slots": slots.tolist()})


def _check_entries(report, words, first_address, keys, addrs, record_words) -> None:
    bad = np.empty(keys.shape[0], dtype=np.int64)
    n_bad = CK.check_entries(words, first_address, addrs, keys, record_words, bad)
    report["n_bad_entries"] += n_bad
    room = MAX_LISTED - len(report["bad_entries"])
    report["bad_entries"] += [{"key": int(keys[i]), "address": int(addrs[i])}
                              for i in bad[:min(n_bad, room)]]
