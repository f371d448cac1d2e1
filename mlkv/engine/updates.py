"""The fused optimizer step: a read-modify-write of rows and their state, in the log.

The rows are read and updated by one kernel pass (:mod:`._update_kernels`), after the
evictions, disk reads and row creations it asks for, as :mod:`.ops`'s operations do. A
training step's update takes the addresses its read just found (``Engine.last_read``), and
with a helper thread (``threads=2``) may run on it while the caller goes on.
"""

from __future__ import annotations

import os

import numpy as np

from . import _batch_kernels as BK
from . import _pair_kernels as PK
from . import _rule_kernels as RK
from . import _update_kernels as UK
from .ops import Engine, create_missing, lookahead


def coalesce(keys: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``keys`` (first-seen order) and the sum of each one's gradient rows, in
    position order (as torch coalesces a sparse gradient)."""
    distinct, inverse = BK.unique_inverse(keys)
    summed = np.empty((distinct.shape[0], grads.shape[1]), dtype=grads.dtype)
    BK.sum_rows_first_seen(grads, inverse, summed)
    return distinct, summed


def update(eng: Engine, keys: np.ndarray, grads: np.ndarray, rule: int, rule_state_dim: int,
           hyper: np.ndarray, init, unique: bool = False, wait: bool = True) -> int:
    """Apply an update rule to the rows of ``keys`` (see :mod:`._update_kernels`); returns
    how many keys it was given (repeats included, as ``gets`` counts them).

    0. Repeated keys are found (unless the caller says the keys are ``unique``); their
       gradients are summed inside the kernel, as torch coalesces a sparse gradient. A rule
       linear in the gradient (sgd) needs no sum: the kernel applies every row in turn.
    1. The rows are brought into the mutable region (the lookahead path) and absent keys
       created with ``init = (kind, scale, seed)``, a share of the buffer pool at a time.
    2. One kernel pass applies the rule in place. A row evicted in between (a batch larger
       than the pool) sends the loop back to step 1 from there.

    When :func:`read_or_init` (a training step's forward) just read as many keys and no
    upsert, delete or compaction came since, the kernel takes the read's address of every
    position whose key is the same as a hint instead of probing the index again (see
    ``_update_kernels._locate_rows``).

    ``wait=False``, with a helper thread awake (see :mod:`.helper`): the kernel pass runs on
    the helper and this returns at once; ``eng.pending`` holds the update (its own copy of
    the keys, and ``grads``, which the caller must not change) until :func:`finish_update`,
    which every later store call runs first. A training step's Python then runs beside its
    update.
    """
    given = keys.shape[0]
    hint_keys, hints = _read_hints(eng, keys)
    order = offsets = NONE
    if not unique and rule not in RK.LINEAR_RULES:
        keys, inverse = BK.unique_inverse(keys)
        if keys.shape[0] < inverse.shape[0]:
            order, offsets = BK.group_positions(inverse, keys.shape[0])
    helper = eng.helper
    posting = (not wait and helper is not None and keys.shape[0] >= PK.PAIR_MIN_KEYS
               and helper.lock.acquire(blocking=False))
    if posting and order is NONE:    # the caller's own keys: a copy the caller cannot change
        keys = keys.copy()
    job = (keys, grads, rule, rule_state_dim, hyper, init, order, offsets, hint_keys, hints,
           eng.epoch)
    if posting:
        log, idx = eng.log, eng.index
        seq = PK.post_update(helper.control, idx.slot_keys, idx.slot_addrs, log.words,
                             log.dirty, log.geo, log.marks, keys, grads, order, offsets,
                             hint_keys, hints, rule, rule_state_dim, hyper)
        if seq:
            eng.pending = (helper, seq, job, os.getpid())
            return given
        helper.lock.release()
        helper.wake()
    _update_from(eng, job, 0)
    return given


def finish_update(eng: Engine) -> None:
    """Wait for the update :func:`update` left to the helper, if any, and do what it could
    not (evictions, rows on disk or absent)."""
    if eng.pending is None:
        return
    helper, seq, job, pid = eng.pending
    eng.pending = None
    if pid != os.getpid():
        # a child forked while the update ran: no helper runs here, and its copy of the
        # buffer pool is not the store's (the parent holds the store); nothing to wait for
        return
    try:
        pos, status = PK.join_update(helper.control, seq)
    finally:
        helper.lock.release()
    if status == UK.DONE:
        eng.log.shift_read_only()
    else:
        _update_from(eng, job, pos)


def _update_from(eng: Engine, job: tuple, pos: int) -> None:
    """:func:`update`'s loop, from position ``pos`` of its (grouped) keys."""
    keys, grads, rule, rule_state_dim, hyper, init, order, offsets, hint_keys, hints, epoch = job
    log, idx = eng.log, eng.index
    update_rows = UK.UPDATE_ROWS[rule]
    while True:
        if eng.epoch != epoch:   # rows were created (upserted) on the way: hints unusable
            hint_keys = hints = NONE
        pos, status = update_rows(
            idx.slot_keys, idx.slot_addrs, log.words, log.vals, log.f32, log.dirty, log.geo,
            log.marks, keys, grads, order, offsets, hint_keys, hints, rule_state_dim, hyper,
            pos)
        if status == UK.DONE:     # training rows were just read: usually all in memory
            break
        if status == UK.NO_FRAME:
            log.make_room()
        else:                     # COLD or MISSING: bring in (or create) a share from here
            # a quarter of the pool, so none is evicted before its update
            ahead = keys[pos:pos + max(1, log.n_frames // 4 * eng.layout.records_per_page)]
            create_missing(eng, ahead, *init)
            lookahead(eng, ahead)
    log.shift_read_only()


#: an empty int64 vector, for no hints and no groups
NONE = np.empty(0, dtype=np.int64)


def _read_hints(eng: Engine, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The keys the last :func:`read_or_init` read and the addresses it found, if it read as
    many keys as ``keys`` and nothing since may have left a record there that is no longer its
    key's; else no hints. The kernel takes a position's hint only where its key is the
    read's (comparing there costs nothing; comparing the arrays here cost 2.5 µs a batch)."""
    last = eng.last_read
    if last is None or last[2] != eng.epoch or last[0].shape[0] != keys.shape[0]:
        return NONE, NONE
    return last[0], last[1]
