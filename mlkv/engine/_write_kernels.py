"""Numba kernels that write rows into the HybridLog: upserts and deletes (tombstones).

The arrays and the resumable protocol are those of :mod:`mlkv.engine._log_kernels`.
"""

import numpy as np

from .._jit import kernel
from ._index_kernels import PREFETCH_DISTANCE, find_slot, find_slots, remove_slot
from ._log_kernels import (M_HEAD, M_READ_ONLY, G_STATE_BASE, G_STATE_DIM, G_VALUE_BASE,
                           G_VALUES_PER_WORD, _frame_word, _prefetch_record, _ring_origin,
                           allocate)
from .layout import FLAG_TOMBSTONE, FLAG_VALID, FLAGS_SHIFT


@kernel
def write_rows(slot_keys, slot_addrs, words, vals, f32, dirty, geo, marks, keys, values,
               start):
    """Upsert ``keys[start:]`` with ``values``; optimizer state is reset to zeros.

    In place at or above ``read_only``; elsewhere a new record at the tail. A key repeated in
    the batch is written twice, the second time in place: the last write wins.
    Returns ``(position reached, keys inserted)``.
    """
    value_base = geo[G_VALUE_BASE]
    values_per_word = geo[G_VALUES_PER_WORD]
    state_base = geo[G_STATE_BASE]
    state_dim = geo[G_STATE_DIM]
    head = marks[M_HEAD]
    read_only = marks[M_READ_ONLY]
    origin = _ring_origin(geo, head)         # rows written are at or above head
    flat_vals = vals.reshape(vals.size)      # one view for the call, not one per row
    flat_words = words.reshape(words.size)
    row_values = vals.shape[1]
    inserted = 0
    n = keys.shape[0]
    # Slots of present keys stay valid while others are inserted; an absent key's empty slot
    # may be taken by an earlier insert of this batch, so absent keys are looked up again.
    # Addresses found up front stay valid at or above read_only; below it, a repeat of a key
    # appended earlier in this batch has moved, so those are read again.
    addrs = np.empty(n, dtype=np.int64)
    slots = find_slots(slot_keys, slot_addrs, keys, start, addrs)
    for i in range(start, n):
        if i + PREFETCH_DISTANCE < n:
            _prefetch_record(flat_words, geo, head, origin, addrs[i + PREFETCH_DISTANCE], True)
        s = slots[i - start]
        if s < 0:
            s = find_slot(slot_keys, slot_addrs, keys[i])
        a = addrs[i]
        if s >= 0 and a < read_only:
            a = slot_addrs[s]
        if s >= 0 and a >= read_only:
            f, w = _frame_word(geo, origin, a)
            for k in range(state_dim):
                f32[f, w * 2 + state_base + k] = 0.0
        else:
            new = allocate(words, dirty, geo, marks)
            if new < 0:
                return i, inserted
            f, w = _frame_word(geo, origin, new)
            words[f, w] = FLAG_VALID << FLAGS_SHIFT
            words[f, w + 1] = keys[i]
            if s >= 0:
                slot_addrs[s] = new
            else:
                slot_keys[-s - 1] = keys[i]
                slot_addrs[-s - 1] = new
                inserted += 1
        dirty[f] = 1
        v0 = np.uint64(f * row_values + w * values_per_word + value_base)  # see _copy_values_out
        for j in range(values.shape[1]):
            flat_vals[v0 + np.uint64(j)] = values[i, j]
    return keys.shape[0], inserted


@kernel
def delete_rows(slot_keys, slot_addrs, words, dirty, geo, marks, keys, start):
    """Remove ``keys[start:]`` from the index, appending a tombstone record for each.

    Absent keys are skipped. Returns ``(position reached, keys removed)``.
    """
    removed = 0
    origin = _ring_origin(geo, marks[M_HEAD])
    for i in range(start, keys.shape[0]):
        s = find_slot(slot_keys, slot_addrs, keys[i])
        if s < 0:
            continue
        new = allocate(words, dirty, geo, marks)
        if new < 0:
            return i, removed
        f, w = _frame_word(geo, origin, new)
        words[f, w] = (FLAG_VALID | FLAG_TOMBSTONE) << FLAGS_SHIFT
        words[f, w + 1] = keys[i]
        remove_slot(slot_keys, slot_addrs, s)
        removed += 1
    return keys.shape[0], removed

