"""Numba kernel of the fused read-modify-write: an update rule applied inside the log.

See :mod:`mlkv.engine._log_kernels` for the arrays a kernel takes and the resumable
protocol, and :mod:`mlkv.engine._rule_kernels` for the rules.
"""

import numpy as np

from .._jit import inline_kernel, kernel
from ._index_kernels import PREFETCH_DISTANCE, find_slot, find_slots
from ._log_kernels import (G_DIM, G_RECORD_WORDS, G_STATE_BASE, G_VALUE_BASE,
                           G_VALUES_PER_WORD, M_HEAD, M_READ_ONLY, _frame_word, _prefetch_span,
                           _ring_origin, allocate, move_record)
from ._rule_kernels import (RULE_ADAGRAD, RULE_ADAM, RULE_ROWWISE_ADAGRAD, RULE_SGD, RULES,
                            apply_rule)

#: why :func:`update_rows` stopped before the end of the batch
DONE, NO_FRAME, COLD, MISSING = range(4)


@inline_kernel
def _sum_positions(grads, order, first, stop, summed):
    """``summed = `` the sum of ``grads[order[first:stop]]`` in that order."""
    summed[:] = grads[order[first]]
    for q in range(first + 1, stop):
        row = grads[order[q]]
        for j in range(summed.shape[0]):
            summed[j] += row[j]


@inline_kernel
def _flat_views(words, vals, f32):
    """The frames as flat int64, value and float32 state vectors (one view each per call)."""
    return words.reshape(words.size), vals.reshape(vals.size), f32.reshape(f32.size)


@inline_kernel
def _row_starts(geo, at):
    """Where the values and the state of the record whose first word is ``at`` start in the
    flat value and state views."""
    return at * geo[G_VALUES_PER_WORD] + geo[G_VALUE_BASE], at * 2 + geo[G_STATE_BASE]


@inline_kernel
def _locate_rows(slot_keys, slot_addrs, words, dirty, geo, marks, keys, order, offsets,
                 hint_keys, hints, start):
    """Find the record of every key of ``keys[start:]`` in the mutable region, copying it
    there first if it sits in memory below ``read_only``. Returns ``(at, stop, status)``:
    each record's first word in the flat frames, and where and why the search stopped (see
    ``update_rows``).

    Without ``hints`` the index is probed for every key, a few keys ahead. With them (the
    keys a read just before read, ``hint_keys``, and the address it found for each, with no
    insert, delete or upsert since: see :func:`mlkv.engine.updates.update`), a position whose
    key is its hint's key and whose hinted address is at or above ``read_only`` has its live
    record there: records there never move, and ``read_only`` only rises, so it was there
    all along. Other keys are looked up.
    """
    head = marks[M_HEAD]
    read_only = marks[M_READ_ONLY]
    origin = _ring_origin(geo, head)
    hinted = hints.shape[0] > 0
    grouped = offsets.shape[0] > 0
    # views from start, indexed from 0 (see _index_kernels._probe_ahead); hints are per
    # position of the batch, found through order when grouped
    keys = keys[start:]
    if grouped:
        offsets = offsets[start:]
    elif hinted:
        hint_keys, hints = hint_keys[start:], hints[start:]
    n = keys.shape[0]
    addrs = np.empty(0 if hinted else n, dtype=np.int64)
    # No key is inserted here, so the slots found up front stay valid. A repeat of a key
    # moved to the tail earlier in this call has moved: addresses below read_only are read
    # again from the index.
    slots = addrs if hinted else find_slots(slot_keys, slot_addrs, keys, 0, addrs)
    at = np.empty(n, dtype=np.int64)
    for k in range(n):
        if hinted:
            p = order[offsets[k]] if grouped else k      # a position of keys[k] in the batch
            a = hints[p] if hint_keys[p] == keys[k] else -1
        else:
            a = addrs[k]
        if a < read_only:
            s = find_slot(slot_keys, slot_addrs, keys[k]) if hinted else slots[k]
            if s < 0:
                return at, start + k, MISSING
            a = slot_addrs[s]
            if a < head:
                return at, start + k, COLD
            if a < read_only:
                new = allocate(words, dirty, geo, marks)
                if new < 0:
                    return at, start + k, NO_FRAME
                a = move_record(words, geo, origin, slot_addrs, s, a, new)
        f, w = _frame_word(geo, origin, a)
        dirty[f] = 1
        at[k] = f * words.shape[1] + w
    return at, start + n, DONE


def _row_loops_for(rule):
    """``(apply_each, apply_summed)``: :func:`update_rows`'s two row loops (a gradient row per
    record, or the sum of several) with update rule ``rule`` fixed when they compile.

    They are compiled apart from ``update_rows``, each with the one inlined rule it runs: with
    both in one loop body, the sgd loop ran 1.6x slower (154 µs against 96 µs for 4,096 rows
    in cache).
    """

    @kernel
    def apply_each(words, vals, f32, geo, at, grads, rule_state_dim, hyper):
        """The rule on the record whose first word is ``at[k]``, with gradient ``grads[k]``."""
        flat_words, flat_vals, flat_state = _flat_views(words, vals, f32)
        dim, record_words = geo[G_DIM], geo[G_RECORD_WORDS]
        n = at.shape[0]
        for k in range(n):
            if k + PREFETCH_DISTANCE < n:
                _prefetch_span(flat_words, at[k + PREFETCH_DISTANCE], record_words, True)
            v0, s0 = _row_starts(geo, at[k])
            apply_rule(rule, flat_vals[v0:v0 + dim], flat_state[s0:s0 + rule_state_dim],
                       grads[k], hyper)

    @kernel
    def apply_summed(words, vals, f32, geo, at, grads, order, offsets, rule_state_dim, hyper):
        """The rule on the record at ``at[k]``, with the sum of gradient rows
        ``grads[order[offsets[k]:offsets[k + 1]]]`` (taken as it is when only one)."""
        flat_words, flat_vals, flat_state = _flat_views(words, vals, f32)
        dim, record_words = geo[G_DIM], geo[G_RECORD_WORDS]
        summed = np.empty(dim, dtype=grads.dtype)
        n = at.shape[0]
        for k in range(n):
            if k + PREFETCH_DISTANCE < n:
                _prefetch_span(flat_words, at[k + PREFETCH_DISTANCE], record_words, True)
            v0, s0 = _row_starts(geo, at[k])
            values, state = flat_vals[v0:v0 + dim], flat_state[s0:s0 + rule_state_dim]
            first, last = offsets[k], offsets[k + 1]
            # one call per case, each with its own gradient array: a variable that is either
            # array cost reference counting on every row (50 µs a batch of 4,096)
            if last - first == 1:
                apply_rule(rule, values, state, grads[order[first]], hyper)
            else:
                _sum_positions(grads, order, first, last, summed)
                apply_rule(rule, values, state, summed, hyper)

    return apply_each, apply_summed


#: the row loops of each rule, named: ``update_rows`` reaches them as globals (see
#: :func:`_apply_each`)
(_each_sgd, _summed_sgd), (_each_adagrad, _summed_adagrad), \
    (_each_rowwise_adagrad, _summed_rowwise_adagrad), (_each_adam, _summed_adam) = \
    (_row_loops_for(rule) for rule in (RULE_SGD, RULE_ADAGRAD, RULE_ROWWISE_ADAGRAD, RULE_ADAM))


@inline_kernel
def _apply_each(rule, words, vals, f32, geo, at, grads, rule_state_dim, hyper):
    """``apply_each`` of ``rule``, a constant where this is inlined: Numba prunes the other
    rules' branches before it compiles anything.

    Not a tuple of kernels, nor kernels in ``update_rows``'s closure: Numba types a tuple of
    kernels as first-class functions (experimental, called through pointers), and the disk
    cache never finds a kernel whose closure holds kernels (its key hashes the closure's
    contents, and a kernel pickles with an id new in every process), so every process
    compiled ``update_rows`` again: 2.7 s at its first backward.
    """
    if rule == RULE_SGD:
        _each_sgd(words, vals, f32, geo, at, grads, rule_state_dim, hyper)
    elif rule == RULE_ADAGRAD:
        _each_adagrad(words, vals, f32, geo, at, grads, rule_state_dim, hyper)
    elif rule == RULE_ROWWISE_ADAGRAD:
        _each_rowwise_adagrad(words, vals, f32, geo, at, grads, rule_state_dim, hyper)
    else:
        _each_adam(words, vals, f32, geo, at, grads, rule_state_dim, hyper)


@inline_kernel
def _apply_summed(rule, words, vals, f32, geo, at, grads, order, offsets, rule_state_dim,
                  hyper):
    """``apply_summed`` of ``rule`` (see :func:`_apply_each`)."""
    if rule == RULE_SGD:
        _summed_sgd(words, vals, f32, geo, at, grads, order, offsets, rule_state_dim, hyper)
    elif rule == RULE_ADAGRAD:
        _summed_adagrad(words, vals, f32, geo, at, grads, order, offsets, rule_state_dim, hyper)
    elif rule == RULE_ROWWISE_ADAGRAD:
        _summed_rowwise_adagrad(words, vals, f32, geo, at, grads, order, offsets,
                                rule_state_dim, hyper)
    else:
        _summed_adam(words, vals, f32, geo, at, grads, order, offsets, rule_state_dim, hyper)


def _update_rows_for(rule):
    """The kernel below with update rule ``rule`` fixed when it compiles (see UPDATE_ROWS);
    its closure holds ``rule`` alone (see :func:`_apply_each`)."""

    @kernel
    def update_rows(slot_keys, slot_addrs, words, vals, f32, dirty, geo, marks, keys, grads,
                    order, offsets, hint_keys, hints, rule_state_dim, hyper, start):
        """Apply the update rule to the rows of ``keys[start:]`` with ``grads``.

        ``offsets`` empty: ``grads[i]`` is a gradient of ``keys[i]``, and a key that repeats
        gets the rule once per position, in position order: exact for a rule linear in the
        gradient (sgd; torch's SGD adds an uncoalesced sparse gradient the same way).
        Otherwise the keys are unique, ``grads`` has a row per position of a batch whose
        keys repeat, and the gradient of ``keys[i]`` is the sum of rows
        ``order[offsets[i]:offsets[i + 1]]``, in that order (see
        :func:`._batch_kernels.group_positions`): summed here, row by row, rather than into a
        table of summed rows first (one pass over the gradient instead of three).

        A row in the mutable region (at or above ``read_only``) is updated in place; a row in
        memory below it is first copied to the tail (the checkpoint's copy stays untouched).
        ``hint_keys``, ``hints``: empty, or the keys a read just read and their addresses (see
        :func:`_locate_rows`). Returns ``(position, status)``: ``DONE`` at the end;
        ``NO_FRAME`` when the tail needs a page with no free frame; ``COLD`` when
        ``keys[position]``'s row is on disk only, and ``MISSING`` when it is absent: the
        caller brings the row in or creates it, and resumes.
        """
        at, stop, status = _locate_rows(slot_keys, slot_addrs, words, dirty, geo, marks, keys,
                                        order, offsets, hint_keys, hints, start)
        if offsets.shape[0] == 0:
            _apply_each(rule, words, vals, f32, geo, at[:stop - start], grads[start:stop],
                        rule_state_dim, hyper)
        else:
            _apply_summed(rule, words, vals, f32, geo, at[:stop - start], grads, order,
                          offsets[start:stop + 1], rule_state_dim, hyper)
        return stop, status

    return update_rows


#: ``update_rows`` per rule code. Each is compiled (and cached) with its rule as a constant,
#: so only that rule's loop is left and LLVM vectorizes it: a rule chosen at run time inside
#: the row loop kept every rule's loops and made each row 3-5x slower.
UPDATE_ROWS = tuple(_update_rows_for(rule) for rule in range(len(RULES)))
#: the same, named, for kernels that call one (see ``_pair_kernels._helpers_update``)
_update_sgd, _update_adagrad, _update_rowwise_adagrad, _update_adam = UPDATE_ROWS
