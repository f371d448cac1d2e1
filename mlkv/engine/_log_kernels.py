"""Numba kernels of the HybridLog's batched operations (see :mod:`mlkv.engine.ops`).

Every kernel works on plain arrays of one store:

- ``slot_keys, slot_addrs``: the hash index (:mod:`._index_kernels`).
- ``words``: the buffer pool's frames viewed as int64, shape ``[n_frames, page_bytes // 8]``;
  ``vals`` the same memory viewed as the store dtype and ``f32`` as float32. Page ``p`` lives
  in frame ``p % n_frames`` while ``head <= p * page_bytes <= tail``.
- ``dirty``: uint8 per frame, set by every write so the page is flushed before reuse.
- ``geo``: int64 geometry, indexed by the ``G_*`` constants below.
- ``marks``: int64 markers, indexed by the ``M_*`` constants; kernels advance the tail.

Kernels that append take a ``start`` position and stop early, returning the position
reached, when the tail needs a page beyond ``marks[M_LIMIT_PAGE]`` (no free frame). The caller
evicts the oldest pages and calls again from there: a batch never waits on a callback, and a
batch larger than the whole buffer pool works. Every key's change is made only after its
allocation succeeded, so a stop leaves no half-written key.
"""

import numpy as np

from .._jit import inline_kernel, kernel, prefetch, prefetch_for_write
from ._index_kernels import (PREFETCH_DISTANCE, _first_homes, _probe_ahead, find_slot,
                             mix64)

# geometry. Value and state positions are counted in elements of the views that hold them
# (``vals``: the store dtype; ``f32``), so kernels index with a multiply and an add: the
# record at word ``w`` of a frame has value ``j`` at ``w * G_VALUES_PER_WORD + G_VALUE_BASE + j``.
G_PAGE_BITS, G_FRAMES, G_RECORD_WORDS, G_DIM, G_STATE_DIM, G_VALUE_BASE, G_STATE_BASE, \
    G_VALUES_PER_WORD = range(8)
N_GEOMETRY = 8
# markers
M_BEGIN, M_HEAD, M_READ_ONLY, M_TAIL, M_OPEN_PAGE, M_LIMIT_PAGE = range(6)
N_MARKS = 6


POLICY_FIFO, POLICY_SECOND_CHANCE, POLICY_FREQUENCY = 0, 1, 2
FREQUENCY_THRESHOLD = 2
#: read_resident's mark of a key its first loop leaves to the second
_LATER = -2


@kernel
def allocate(words, dirty, geo, marks):
    """Address of one new record at the tail, or -1 when its page has no free frame.

    Records never straddle pages: a record that would cross the page end starts the next
    page. A page is zeroed when first opened, so padding and fresh state read as zeros.
    """
    page_bits = geo[G_PAGE_BITS]
    record_bytes = geo[G_RECORD_WORDS] * 8
    tail = marks[M_TAIL]
    page = tail >> page_bits
    if (tail & ((1 << page_bits) - 1)) + record_bytes > (1 << page_bits):
        page += 1
        tail = page << page_bits
    if page > marks[M_OPEN_PAGE]:
        if page > marks[M_LIMIT_PAGE]:
            return -1
        words[page % geo[G_FRAMES], :] = 0
        marks[M_OPEN_PAGE] = page
    dirty[page % geo[G_FRAMES]] = 1
    marks[M_TAIL] = tail + record_bytes
    return tail


@inline_kernel
def _ring_origin(geo, head):
    """``(page, frame)`` of ``head``, for :func:`_frame_word` (markers move only between
    kernel calls, so a kernel takes it once)."""
    page = head >> geo[G_PAGE_BITS]
    return page, page % geo[G_FRAMES]


@inline_kernel
def _frame_word(geo, origin, address):
    """(frame, word offset) of an in-memory address (at or above head), ``origin`` being
    ``_ring_origin(geo, head)``. The frames hold the pages from head's on, one lap of the ring
    at most, so a subtraction finds the frame: a division per row cost 6 µs a batch of 4,096
    rows in each of the read and update loops."""
    page_bits, n_frames = geo[G_PAGE_BITS], geo[G_FRAMES]
    f = origin[1] + (address >> page_bits) - origin[0]
    if f >= n_frames:
        f -= n_frames
    return f, (address & ((1 << page_bits) - 1)) >> 3


@inline_kernel
def move_record(words, geo, origin, slot_addrs, slot, address, new):
    """Copy the in-memory record at ``address`` to ``new`` (just allocated at the tail) and
    point index slot ``slot`` there (the copy-to-tail of FASTER's RCU); returns ``new``."""
    n_words = geo[G_RECORD_WORDS]
    f0, w0 = _frame_word(geo, origin, address)
    f1, w1 = _frame_word(geo, origin, new)
    words[f1, w1:w1 + n_words] = words[f0, w0:w0 + n_words]
    slot_addrs[slot] = new
    return new


@inline_kernel
def _admit(policy, counters, key, counted):
    """Whether a read of a row below read_only copies it to the tail (see policy.py).

    ``counted``: this read is already counted in the frequency counters (by :func:`_count`),
    or is the first pass's own read, which counts as one more.
    """
    if policy == POLICY_SECOND_CHANCE:
        return True
    if policy == POLICY_FREQUENCY:
        c = np.int64(mix64(np.uint64(key)) & np.uint64(counters.shape[0] - 1))
        return np.int64(counters[c]) + (0 if counted else 1) >= FREQUENCY_THRESHOLD
    return False


@inline_kernel
def _count(policy, counters, key):
    """Count one read of ``key`` for the frequency policy (saturating at 255)."""
    if policy == POLICY_FREQUENCY:
        c = np.int64(mix64(np.uint64(key)) & np.uint64(counters.shape[0] - 1))
        if counters[c] < 255:
            counters[c] += 1


@inline_kernel
def _copy_values_out(vals, frame, first, out, i):
    # Unsigned offsets into a row view let LLVM emit plain vector loads; a signed 2-D index
    # compiles to gathers, twice as slow.
    row = vals[frame]
    u = np.uint64(first)
    for j in range(out.shape[1]):
        out[i, j] = row[u + np.uint64(j)]


@kernel
def _find_mutable_rows(slot_keys, slot_addrs, vals, geo, head, read_only, keys, addrs, src):
    """Every key's address in ``addrs`` (-1 if absent) and, if its row is in the mutable
    region (at or above ``read_only``), where its values start in ``vals``'s flat data in
    ``src``; else ``src`` is ``_LATER``. Returns how many are ``_LATER``.

    The first loop of :func:`read_resident`, compiled on its own: with the rarer cases'
    code in the same loop body, every key was slower."""
    origin = _ring_origin(geo, head)
    homes = _first_homes(slot_keys, keys)
    later = 0
    for i in range(keys.shape[0]):
        s = _probe_ahead(slot_keys, slot_addrs, keys, i, homes)
        if s >= 0:
            a = slot_addrs[s]
            addrs[i] = a
            if a >= read_only:
                src[i] = _value_offset(vals, geo, origin, a)
                continue
        else:
            addrs[i] = -1
        src[i] = _LATER
        later += 1
    return later


@inline_kernel
def _prefetch_span(flat, first, count, for_write):
    """Prefetch the cache lines of ``flat[first:first + count]`` (nothing if ``first`` < 0)."""
    if first >= 0:
        last = first + count - 1
        step = 64 // flat.itemsize
        if for_write:
            for k in range(first, last, step):
                prefetch_for_write(flat, k)
            prefetch_for_write(flat, last)
        else:
            for k in range(first, last, step):
                prefetch(flat, k)
            prefetch(flat, last)


@inline_kernel
def _prefetch_record(flat_words, geo, head, origin, address, for_write):
    """Prefetch the cache lines of the record at ``address``, if it is in memory.

    ``flat_words`` is the frames as one int64 vector and ``head`` the caller's copy of
    ``marks[M_HEAD]`` (``origin``: see :func:`_frame_word`): a reshape, or a load of
    ``marks``, once per row made a row loop up to twice as slow.
    """
    if address >= head:
        f, w = _frame_word(geo, origin, address)
        _prefetch_span(flat_words, f * (1 << (geo[G_PAGE_BITS] - 3)) + w, geo[G_RECORD_WORDS],
                       for_write)


@kernel
def read_resident(slot_keys, slot_addrs, words, vals, dirty, geo, marks, keys, start,
                  want_values, out, addrs_out, cold_pos, n_cold, n_absent, policy, counters):
    """First pass of a read: serve rows in memory, list the rows on disk.

    For ``keys[start:]``: a missing key gets address -1; a row at or above ``head`` has its
    values copied into ``out`` (when ``want_values``), after being copied to the tail first
    if it sits below ``read_only`` and the policy admits it; a row below ``head`` is listed in
    ``cold_pos`` for :func:`finish_cold`. Returns ``(position reached, n_cold, n_absent)``:
    ``n_cold`` and ``n_absent`` (keys with no row) are the counts passed in plus this call's.

    Three loops. The first probes the index, a few keys ahead, and finds every row in the
    mutable region, where nothing moves during a call (a training step's rows). The second
    (:func:`resolve_later`) handles the other keys in order, if any: absent, on disk, or below
    ``read_only`` (moved if the policy admits). The third copies the values out, prefetching
    rows a few ahead. Finding and copying in one loop was twice as slow: the copy waited on
    its row while the loop's other work held the CPU. Together, the first loop's leaner body
    and the views from ``start`` (see :func:`_probe_ahead`) saved 6-8 µs a batch of 4,096
    keys. (:func:`._pair_kernels.read_resident_pair` runs the first and third loops on two
    threads.)
    """
    head = marks[M_HEAD]            # markers move only between kernel calls
    read_only = marks[M_READ_ONLY]
    n = keys.shape[0]
    # where each row's values start in the flat frames (-1: nothing to copy)
    src = np.empty(n - start, dtype=np.int64)
    later = _find_mutable_rows(slot_keys, slot_addrs, vals, geo, head, read_only, keys[start:],
                               addrs_out[start:], src)
    stop, n_cold, n_absent = resolve_later(
        slot_keys, slot_addrs, words, vals, dirty, geo, marks, keys, start, later, src, False,
        out, addrs_out, cold_pos, n_cold, n_absent, policy, counters)
    if want_values:
        _copy_rows_out(vals, src[:stop - start], out[start:stop])
    return stop, n_cold, n_absent


@inline_kernel
def resolve_later(slot_keys, slot_addrs, words, vals, dirty, geo, marks, keys, start, later,
                  src, copy_now, out, addrs_out, cold_pos, n_cold, n_absent, policy,
                  counters):
    """The second loop of :func:`read_resident`: the ``later`` keys of ``keys[start:]`` whose
    ``src`` is ``_LATER``, in order. Sets their ``src`` (-1 when there is nothing to copy),
    or, with ``copy_now``, copies their values into ``out`` at once and sets ``src`` to -1
    (when the other rows were copied already). Returns ``(position reached, n_cold,
    n_absent)``."""
    head = marks[M_HEAD]
    read_only = marks[M_READ_ONLY]
    origin = _ring_origin(geo, head)
    stop = keys.shape[0]
    # A read inserts and removes no key. A key's address is read again from the index when
    # its turn comes, so a repeat of a key copied to the tail earlier in this loop is found
    # there.
    for k in range(src.shape[0] if later else 0):
        if src[k] != _LATER:
            continue
        i = start + k
        src[k] = -1
        s = find_slot(slot_keys, slot_addrs, keys[i])
        if s < 0:
            n_absent += 1
            continue
        a = slot_addrs[s]
        if a < head:
            _count(policy, counters, keys[i])
            addrs_out[i] = a
            cold_pos[n_cold] = i
            n_cold += 1
            continue
        if a < read_only:
            # Admission is decided before this read is counted and the count comes after the
            # allocation, so a stop (no free frame) and the resumed call count it once.
            admit = _admit(policy, counters, keys[i], False)
            new = allocate(words, dirty, geo, marks) if admit else -1
            if admit and new < 0:
                stop = i
                break
            _count(policy, counters, keys[i])
            if admit:
                a = move_record(words, geo, origin, slot_addrs, s, a, new)
        addrs_out[i] = a
        if copy_now:
            f, w = _frame_word(geo, origin, a)
            _copy_values_out(vals, f, w * geo[G_VALUES_PER_WORD] + geo[G_VALUE_BASE], out, i)
        else:
            src[k] = _value_offset(vals, geo, origin, a)
    return stop, n_cold, n_absent


@inline_kernel
def _value_offset(vals, geo, origin, address):
    """Where the values of the in-memory record at ``address`` start in ``vals``'s flat data
    (``origin``: see :func:`_frame_word`)."""
    f, w = _frame_word(geo, origin, address)
    return f * vals.shape[1] + w * geo[G_VALUES_PER_WORD] + geo[G_VALUE_BASE]


@kernel
def _copy_rows_out(vals, src, out):
    """``out[k] = `` the row whose values start at ``src[k]`` in ``vals``'s flat data
    (skipping ``src`` -1), prefetching rows ahead.

    Compiled on its own, not inlined: inside the caller's loop body, the copy ran slower. The
    caller hands views that start at its first position: an offset added to every ``out``
    index cost 5 µs a batch of 4,096 rows."""
    flat = vals.reshape(vals.size)
    dim = out.shape[1]
    m = src.shape[0]
    for k in range(m):
        if k + PREFETCH_DISTANCE < m:
            _prefetch_span(flat, src[k + PREFETCH_DISTANCE], dim, False)
        o = src[k]
        if o >= 0:
            u = np.uint64(o)                 # unsigned: see _copy_values_out
            for j in range(dim):
                out[k, j] = flat[u + np.uint64(j)]


@kernel
def finish_cold(slot_keys, slot_addrs, words, dirty, geo, marks, keys, cold_pos, cold_addrs,
                rec_words, rec_vals, rec_index, start, want_values, out, policy, counters):
    """Second pass of a read: rows read from disk into ``rec_words`` (one record per row).

    Copies values into ``out`` and, where the policy admits, copies the
    record to the tail, but only if the index still points at the address that was read (a
    duplicate key in the batch, or a write since the read, has moved it: nothing to do).
    Returns the position reached in ``cold_pos``.
    """
    words_per_record = geo[G_RECORD_WORDS]
    value_base = geo[G_VALUE_BASE]
    origin = _ring_origin(geo, marks[M_HEAD])
    for c in range(start, cold_pos.shape[0]):
        i = cold_pos[c]
        r = rec_index[c]
        if want_values:
            _copy_values_out(rec_vals, r, value_base, out, i)
        if _admit(policy, counters, keys[i], True):
            s = find_slot(slot_keys, slot_addrs, keys[i])
            if s >= 0 and slot_addrs[s] == cold_addrs[c]:
                new = allocate(words, dirty, geo, marks)
                if new < 0:
                    return c
                f, w = _frame_word(geo, origin, new)
                words[f, w:w + words_per_record] = rec_words[r, :]
                slot_addrs[s] = new
    return cold_pos.shape[0]
