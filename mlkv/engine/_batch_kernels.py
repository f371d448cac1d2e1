"""Numba kernels over one batch of keys that may repeat: plain int64 arrays.

``np.unique(return_inverse=True)`` (and ``torch.unique``) sort the batch; a lookup or an
update only needs each distinct key once and where every position's key went. A small
open-addressing table does that in one pass, in first-seen order, several times faster than
the sort for batches of thousands of keys. The gradient of a key that repeats is the sum of
its positions' rows, in position order, as torch coalesces a sparse gradient.
"""

import numpy as np

from .._jit import kernel
from ._index_kernels import key_hash


@kernel
def unique_inverse(ids):
    """``(unique, inverse)``: the distinct ``ids`` in first-seen order, and for each position
    the index of its id in ``unique`` (``unique[inverse] == ids``)."""
    n = ids.shape[0]
    bits = 4
    while (1 << bits) < 2 * n:
        bits += 1
    capacity = 1 << bits
    shift = np.uint64(64 - bits)        # the top bits of the hash, as the index takes them
    table_ids = np.empty(capacity, dtype=np.int64)
    table_pos = np.full(capacity, -1, dtype=np.int64)    # index into unique; -1: empty
    unique = np.empty(n, dtype=np.int64)
    inverse = np.empty(n, dtype=np.int64)
    n_unique = 0
    for i in range(n):
        key = ids[i]
        slot = np.int64(key_hash(key) >> shift)
        while table_pos[slot] >= 0 and table_ids[slot] != key:
            slot = (slot + 1) & (capacity - 1)
        if table_pos[slot] < 0:
            table_ids[slot] = key
            table_pos[slot] = n_unique
            unique[n_unique] = key
            n_unique += 1
        inverse[i] = table_pos[slot]
    return unique[:n_unique], inverse


@kernel
def sum_rows_first_seen(grads, inverse, out):
    """``out[r] = `` the sum of ``grads[i]`` over the positions ``i`` with ``inverse[i] == r``,
    in position order: the gradient of each distinct row of a lookup.

    ``inverse`` must be in first-seen order, as :func:`unique_inverse` returns it (row ``r``
    first appears after rows ``0 .. r-1``): a row's first position assigns and later ones add,
    so ``out`` need not start at zeros (``np.empty`` will do: no zeroing pass) and the sums
    equal those of adding into zeros. Rows ``>= `` the number seen are left untouched. Raises
    ValueError when ``inverse`` is not in first-seen order.
    """
    seen = 0
    for i in range(inverse.shape[0]):
        r = inverse[i]
        src = grads[i]
        dst = out[r]
        if r == seen:
            for j in range(src.shape[0]):
                dst[j] = src[j]
            seen += 1
        elif 0 <= r < seen:
            for j in range(src.shape[0]):
                dst[j] += src[j]
        else:
            raise ValueError("inverse is not in first-seen order (see unique_inverse)")
    return seen


@kernel
def group_positions(inverse, n_keys):
    """``(order, offsets)``: the positions of key ``k`` are ``order[offsets[k]:offsets[k + 1]]``,
    in position order (a counting sort of ``inverse``, whose values are in ``[0, n_keys)``)."""
    offsets = np.zeros(n_keys + 1, dtype=np.int64)
    for i in range(inverse.shape[0]):
        offsets[inverse[i] + 1] += 1
    for k in range(n_keys):
        offsets[k + 1] += offsets[k]
    fill = offsets[:-1].copy()
    order = np.empty(inverse.shape[0], dtype=np.int64)
    for i in range(inverse.shape[0]):
        k = inverse[i]
        order[fill[k]] = i
        fill[k] += 1
    return order, offsets
