"""Compaction: reclaim the disk held by dead records.

Every update that copies a row to the tail leaves the older record dead, so the log grows with
the update traffic, not with the table. Compaction reclaims whole segment files from the front
of the log::

    begin            cut (a segment boundary, at most head)                  tail
      | oldest segments |  ... the rest of the log ...                          |
      +-----------------+-------------------------------------------------------+
        live records here are copied to the tail, then these files are deleted

1. ``cut`` is the last segment boundary at or below ``head`` (segments still partly in
   memory are never compacted).
2. Every key whose record lies below ``cut`` is read and copied to the tail (the lookahead
   path: address-sorted reads, and a copy only if the index still points at what was read).
3. A checkpoint commits the new ``begin = cut``; only then are the old segment files deleted,
   so a crash at any point reopens either before or after the compaction, never half-way.
"""

from __future__ import annotations

import numpy as np

from ..progress import Progress
from . import _log_kernels as K
from . import checkpoint, ops

#: index slots scanned at a time, and keys moved per read-and-copy batch: both bound the
#: memory compaction needs beside the store's own
SLOT_CHUNK = 1 << 18
BATCH_KEYS = 1 << 14


def due(eng: ops.Engine, share: float) -> bool:
    """Whether dead records are more than ``share`` of the log and a segment could be freed."""
    segment_bits, mark = eng.layout.segment_bits, eng.log.mark
    # the segment test first: it is cheaper, and false while the log fits in memory (this
    # runs after every write)
    return ((mark[K.M_HEAD] >> segment_bits) > (mark[K.M_BEGIN] >> segment_bits)
            and ops.dead_fraction(eng) > share)


def compact(directory: str, eng: ops.Engine, progress: bool | None = None,
            changed: bool = True) -> dict:
    """Move the live records out of the oldest segments and delete those segments.

    Returns ``{"rows_moved", "bytes_freed", "checkpoint_id"}``: ``bytes_freed`` is the size of
    the segment files deleted (the moved rows take new space at the tail). Nothing to do
    gives zeros and ``checkpoint_id`` None. ``progress``: see :class:`mlkv.progress.Progress`;
    ``changed``: rows were written since the last checkpoint (see :func:`checkpoint.save`).
    """
    log, layout = eng.log, eng.layout
    segment_bits = layout.segment_bits
    cut = (log.head >> segment_bits) << segment_bits
    if cut <= log.begin:
        return {"rows_moved": 0, "bytes_freed": 0, "checkpoint_id": None}
    counts = dict(eng.counts)               # moving rows is not a read the user made
    eng.epoch += 1                          # rows move (see ops.Engine.epoch)
    moved = 0
    # Copies to the tail change addresses but never move keys between slots, so the slots
    # can be scanned a chunk at a time while rows move.
    bar = Progress(eng.index.capacity, "compact", show=progress, unit="index slots")
    for lo in range(0, eng.index.capacity, SLOT_CHUNK):
        addrs = eng.index.slot_addrs[lo:lo + SLOT_CHUNK]
        below = (addrs != 0) & (addrs < cut)
        keys = eng.index.slot_keys[lo:lo + SLOT_CHUNK][below]
        keys = keys[np.argsort(addrs[below], kind="stable")]     # read in log order
        for b in range(0, keys.shape[0], BATCH_KEYS):
            ops.lookahead(eng, np.ascontiguousarray(keys[b:b + BATCH_KEYS]))
        moved += keys.shape[0]
        if ((addrs != 0) & (addrs < cut)).any():
            raise AssertionError(f"compaction left live records below {cut}")
        bar.update(addrs.shape[0])
    bar.close()
    eng.counts.update(counts)
    log.move_begin(cut)
    checkpoint_id = checkpoint.save(directory, log, eng.index, eng.device, changed)
    freed = eng.device.remove_segments_below(cut >> segment_bits)
    return {"rows_moved": moved, "bytes_freed": freed, "checkpoint_id": checkpoint_id}
