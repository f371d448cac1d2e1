"""Numba kernels that share a batch's work in memory with the process's helper thread.

:mod:`mlkv.engine.helper` keeps one helper thread per process. While it is awake it spins in
:func:`serve`, a kernel that waits for a job in the control block below.
:func:`read_resident_pair` posts the second half of its batch there, finds and copies the
first half itself, then either waits for the helper's half or, if the helper never claimed
it, does it too: a batch never waits on a thread that is not running, and the caller's half
starts at once. A hand-over costs about 0.3 µs; a Python ``Semaphore`` round trip cost 44 µs
here, half a batch's work.

Control block: an int64 vector, each field a thread spins on on a cache line of its own::

    word   0  SEQ     number of the last job posted (by the caller, store_release)
    word   8  CLAIM   number of the last job whose second half was claimed: the helper and
                      the caller both try compare_exchange(SEQ - 1 -> SEQ); one wins
    word  16  DONE    number of the last job finished (by the helper, or by the caller
                      when it claimed the second half itself)
    word  24  STATE   AWAKE while the helper spins in serve(), ASLEEP once it left
    word  32  STOP    1: serve() returns at once, for good
    word  40  RESULT  what the helper's part returned (a read: how many keys it left for
                      later; an update: the position reached)
    word  41  STATUS  an update's status (``_update_kernels.DONE``, ...)
    word  42  KIND    JOB_READ or JOB_UPDATE
    word  43  HELPED  how many jobs the helper did its part of (a count for tests and stats)
    word  48+ ARGS    the job's arrays, as addresses and sizes, and its scalars

The caller writes the job's words, then SEQ (release); the helper reads SEQ (acquire), claims,
reads the job. Numbers only grow, so a helper that saw a job late cannot claim a newer one.

Only the first and third loops of :func:`._log_kernels.read_resident` are shared, which
write nothing but the batch's own outputs: finding the rows of the mutable region (nothing
moves there during a call) and copying them out, positions ``[0, n/2)`` on the caller and
``[n/2, n)`` on the helper, so neither writes a cache line of the other's outputs. The keys
left for later (absent, on disk, below ``read_only``: they may move records) are resolved after,
by the caller alone. Jobs are float32 stores' (the helper rebuilds each array from its address
with a float32 or int64 pointer); other dtypes read on one thread.

An update is not split: split by record so that no row is written by both threads, it ran
slower than on one thread (half of a step's rows were read into the other core's cache a
moment before, and a 50 % branch on the owner of each row mispredicts). Instead a whole
update can be left to the helper (:func:`post_update`) while the caller returns to Python,
and joined (:func:`join_update`) before the store's next call.
"""

import numba
import numpy as np

from .._jit import (compare_exchange, inline_kernel, kernel, load_acquire, pointer_to,
                    spin_pause, store_release)
from ._log_kernels import M_HEAD, M_READ_ONLY, _copy_rows_out, _find_mutable_rows, resolve_later
from ._rule_kernels import RULE_ADAGRAD, RULE_ROWWISE_ADAGRAD, RULE_SGD
from ._update_kernels import _update_adagrad, _update_adam, _update_rowwise_adagrad, _update_sgd

SEQ, CLAIM, DONE, STATE, STOP, RESULT, STATUS, KIND, HELPED, ARGS = \
    0, 8, 16, 24, 32, 40, 41, 42, 43, 48
CONTROL_WORDS = 80
ASLEEP, AWAKE = 0, 1
JOB_READ, JOB_UPDATE = 1, 2
#: a batch of fewer keys is read on one thread. A Zipf ``get`` of 128 rows took 9.4 µs on two
#: threads against 8.7 µs on one; of 256, 9.7 against 11.2; of 512, 12.0 against 15.6; of
#: 2,048, 28 against 46 (262,144 rows of 64 float32 in memory)
PAIR_MIN_KEYS = 256

# pointer types for rebuilding arrays from their addresses
_F32 = np.empty(0, dtype=np.float32)
_F64 = np.empty(0, dtype=np.float64)
_I64 = np.empty(0, dtype=np.int64)
_U8 = np.empty(0, dtype=np.uint8)


@inline_kernel
def _vector(control, slot, like, n):
    return numba.carray(pointer_to(control[slot], like), n)


@inline_kernel
def _matrix(control, slot, like, rows, columns):
    return numba.carray(pointer_to(control[slot], like), (rows, columns))


@kernel
def serve(control, spin_limit):
    """The helper thread's loop: run the jobs posted in ``control`` until ``spin_limit`` spins
    pass with none (returns False: the thread sleeps until woken), or until STOP (True)."""
    store_release(control, STATE, AWAKE)
    seen = load_acquire(control, SEQ)
    spins = 0
    while spins < spin_limit:
        if load_acquire(control, STOP):
            break
        seq = load_acquire(control, SEQ)
        if seq == seen:
            spins += 1
            spin_pause()
            continue
        seen = seq
        if compare_exchange(control, CLAIM, seq - 1, seq):
            if control[KIND] == JOB_READ:
                _helpers_half(control)
            else:
                _helpers_update(control)
            control[HELPED] += 1
            store_release(control, DONE, seq)
        spins = 0
    store_release(control, STATE, ASLEEP)
    return load_acquire(control, STOP) != 0


@kernel
def _helpers_half(control):
    """The second half of the read posted in ``control`` (see ``read_resident_pair``)."""
    a = ARGS
    n, lo = control[a + 1], control[a + 2]
    keys = _vector(control, a, _I64, n)
    addrs, src = _vector(control, a + 3, _I64, n), _vector(control, a + 4, _I64, n)
    out = _matrix(control, a + 5, _F32, n, control[a + 6])
    slot_keys = _vector(control, a + 7, _I64, control[a + 8])
    slot_addrs = _vector(control, a + 9, _I64, control[a + 8])
    vals = _matrix(control, a + 10, _F32, control[a + 11], control[a + 12])
    geo = _vector(control, a + 13, _I64, control[a + 14])
    control[RESULT] = _find_mutable_rows(slot_keys, slot_addrs, vals, geo, control[a + 15],
                                         control[a + 16], keys[lo:], addrs[lo:], src[lo:])
    _copy_rows_out(vals, src[lo:], out[lo:])


@kernel
def read_resident_pair(control, slot_keys, slot_addrs, words, vals, dirty, geo, marks, keys,
                       start, out, addrs_out, cold_pos, n_cold, n_absent, policy, counters):
    """:func:`._log_kernels.read_resident` of a float32 store with values wanted, its first
    and third loops shared with the helper (see the module docstring). Returns ``(position
    reached, n_cold, n_absent, asleep)``: ``asleep`` True when the helper was asleep at the
    end (the caller wakes it for the next batch)."""
    head, read_only = marks[M_HEAD], marks[M_READ_ONLY]
    n = keys.shape[0] - start
    keys_v, addrs_v, out_v = keys[start:], addrs_out[start:], out[start:]
    src = np.empty(n, dtype=np.int64)
    half = n // 2
    seq = 0
    if n >= PAIR_MIN_KEYS and load_acquire(control, STATE) == AWAKE:
        a = ARGS
        control[a], control[a + 1], control[a + 2] = keys_v.ctypes.data, n, half
        control[a + 3], control[a + 4] = addrs_v.ctypes.data, src.ctypes.data
        control[a + 5], control[a + 6] = out_v.ctypes.data, out.shape[1]
        control[a + 7], control[a + 8] = slot_keys.ctypes.data, slot_keys.shape[0]
        control[a + 9] = slot_addrs.ctypes.data
        control[a + 10], control[a + 11] = vals.ctypes.data, vals.shape[0]
        control[a + 12] = vals.shape[1]
        control[a + 13], control[a + 14] = geo.ctypes.data, geo.shape[0]
        control[a + 15], control[a + 16] = head, read_only
        control[KIND] = JOB_READ
        seq = control[SEQ] + 1
        store_release(control, SEQ, seq)
    mine = half if seq else n
    later = _find_mutable_rows(slot_keys, slot_addrs, vals, geo, head, read_only, keys_v[:mine],
                               addrs_v[:mine], src[:mine])
    _copy_rows_out(vals, src[:mine], out_v[:mine])
    if seq:
        if compare_exchange(control, CLAIM, seq - 1, seq):    # the helper never came
            later += _find_mutable_rows(slot_keys, slot_addrs, vals, geo, head, read_only,
                                        keys_v[half:], addrs_v[half:], src[half:])
            _copy_rows_out(vals, src[half:], out_v[half:])
            store_release(control, DONE, seq)
        else:
            while load_acquire(control, DONE) != seq:
                spin_pause()
            later += control[RESULT]
    stop, n_cold, n_absent = resolve_later(
        slot_keys, slot_addrs, words, vals, dirty, geo, marks, keys, start, later, src, True,
        out, addrs_out, cold_pos, n_cold, n_absent, policy, counters)
    return stop, n_cold, n_absent, load_acquire(control, STATE) != AWAKE


# ---- a whole update, left to the helper while the caller goes on ---------------------------
@kernel
def post_update(control, slot_keys, slot_addrs, words, dirty, geo, marks, keys, grads, order,
                offsets, hint_keys, hints, rule, rule_state_dim, hyper):
    """Hand ``_update_kernels.UPDATE_ROWS[rule]`` of these arguments (from position 0, a
    float32 store) to the helper if it is awake. Returns the job's number, or 0 (nothing
    posted). The caller must keep every array alive and the store untouched until
    :func:`join_update` of that number has returned."""
    if load_acquire(control, STATE) != AWAKE:
        return 0
    a = ARGS
    control[a], control[a + 1] = slot_keys.ctypes.data, slot_keys.shape[0]
    control[a + 2] = slot_addrs.ctypes.data
    control[a + 3], control[a + 4], control[a + 5] = words.ctypes.data, words.shape[0], \
        words.shape[1]
    control[a + 6], control[a + 7], control[a + 8] = dirty.ctypes.data, geo.ctypes.data, \
        geo.shape[0]
    control[a + 9], control[a + 10] = marks.ctypes.data, marks.shape[0]
    control[a + 11], control[a + 12] = keys.ctypes.data, keys.shape[0]
    control[a + 13], control[a + 14], control[a + 15] = grads.ctypes.data, grads.shape[0], \
        grads.shape[1]
    control[a + 16], control[a + 17] = order.ctypes.data, order.shape[0]
    control[a + 18], control[a + 19] = offsets.ctypes.data, offsets.shape[0]
    control[a + 20], control[a + 21] = hint_keys.ctypes.data, hint_keys.shape[0]
    control[a + 22], control[a + 23] = hints.ctypes.data, hyper.ctypes.data
    control[a + 24], control[a + 25], control[a + 26] = hyper.shape[0], rule, rule_state_dim
    control[KIND] = JOB_UPDATE
    seq = control[SEQ] + 1
    store_release(control, SEQ, seq)
    return seq


@kernel
def join_update(control, seq):
    """Wait for update job ``seq`` to be done, doing it here if the helper never claimed it.
    Returns ``update_rows``'s ``(position, status)``."""
    if compare_exchange(control, CLAIM, seq - 1, seq):
        _helpers_update(control)
        store_release(control, DONE, seq)
    else:
        while load_acquire(control, DONE) != seq:
            spin_pause()
    return control[RESULT], control[STATUS]


@kernel
def _helpers_update(control):
    """The update posted in ``control`` (see :func:`post_update`)."""
    a = ARGS
    slot_keys = _vector(control, a, _I64, control[a + 1])
    slot_addrs = _vector(control, a + 2, _I64, control[a + 1])
    frames, page_words = control[a + 4], control[a + 5]
    words = _matrix(control, a + 3, _I64, frames, page_words)
    vals = _matrix(control, a + 3, _F32, frames, 2 * page_words)
    dirty = _vector(control, a + 6, _U8, frames)
    geo = _vector(control, a + 7, _I64, control[a + 8])
    marks = _vector(control, a + 9, _I64, control[a + 10])
    keys = _vector(control, a + 11, _I64, control[a + 12])
    grads = _matrix(control, a + 13, _F32, control[a + 14], control[a + 15])
    order = _vector(control, a + 16, _I64, control[a + 17])
    offsets = _vector(control, a + 18, _I64, control[a + 19])
    hint_keys = _vector(control, a + 20, _I64, control[a + 21])
    hints = _vector(control, a + 22, _I64, control[a + 21])
    hyper = _vector(control, a + 23, _F64, control[a + 24])
    rule, state_dim = control[a + 25], control[a + 26]
    if rule == RULE_SGD:
        stop, status = _update_sgd(slot_keys, slot_addrs, words, vals, vals, dirty, geo, marks,
                                   keys, grads, order, offsets, hint_keys, hints, state_dim,
                                   hyper, 0)
    elif rule == RULE_ADAGRAD:
        stop, status = _update_adagrad(slot_keys, slot_addrs, words, vals, vals, dirty, geo,
                                       marks, keys, grads, order, offsets, hint_keys, hints,
                                       state_dim, hyper, 0)
    elif rule == RULE_ROWWISE_ADAGRAD:
        stop, status = _update_rowwise_adagrad(slot_keys, slot_addrs, words, vals, vals, dirty,
                                               geo, marks, keys, grads, order, offsets,
                                               hint_keys, hints, state_dim, hyper, 0)
    else:
        stop, status = _update_adam(slot_keys, slot_addrs, words, vals, vals, dirty, geo, marks,
                                    keys, grads, order, offsets, hint_keys, hints, state_dim,
                                    hyper, 0)
    control[RESULT], control[STATUS] = stop, status
