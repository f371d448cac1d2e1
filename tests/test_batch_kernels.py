"""The batch kernels (distinct keys, grouped positions, summed rows) against plain Python."""

import numpy as np
import pytest

from mlkv.engine._batch_kernels import group_positions, sum_rows_first_seen, unique_inverse


def reference_unique_inverse(ids):
    """Distinct ids in first-seen order, and each position's index among them (a dict)."""
    seen = {}
    inverse = [seen.setdefault(k, len(seen)) for k in ids.tolist()]
    return np.array(list(seen), dtype=np.int64), np.array(inverse, dtype=np.int64)


@pytest.mark.parametrize("n, high", [(0, 1), (1, 1), (7, 3), (4096, 1 << 18), (4096, 50),
                                     (10_000, 1 << 62)])
def test_unique_inverse_matches_the_reference(n, high):
    rng = np.random.default_rng(n + high % 1000)
    ids = rng.integers(-high, high, n, dtype=np.int64)
    if n > 3:
        ids[:3] = [np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0]
    unique, inverse = unique_inverse(ids)
    want_unique, want_inverse = reference_unique_inverse(ids)
    np.testing.assert_array_equal(unique, want_unique)
    np.testing.assert_array_equal(inverse, want_inverse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, high, dim", [(0, 1, 4), (1, 1, 1), (4096, 300, 64), (50, 7, 3)])
def test_sum_rows_first_seen_matches_the_reference(dtype, n, high, dim):
    """Each distinct row's gradient, summed in position order as a plain loop adds into
    zeros, whatever the output buffer held before (it is reused between steps)."""
    rng = np.random.default_rng(n + dim)
    _, inverse = unique_inverse(rng.integers(0, high, n))
    n_rows = int(inverse.max()) + 1 if n else 0
    grads = rng.standard_normal((n, dim)).astype(dtype)
    out = np.full((n_rows + 2, dim), np.nan, dtype)       # stale contents, spare rows
    assert sum_rows_first_seen(grads, inverse, out) == n_rows
    expected = np.zeros((n_rows, dim), dtype)
    for i in range(n):                              # position order, one add at a time
        expected[inverse[i]] = expected[inverse[i]] + grads[i]
    np.testing.assert_array_equal(out[:n_rows], expected)
    assert np.isnan(out[n_rows:]).all()             # rows past the distinct ones untouched


def test_sum_rows_first_seen_refuses_another_order():
    grads = np.ones((3, 2), np.float32)
    out = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="first-seen order"):
        sum_rows_first_seen(grads, np.array([1, 0, 0]), out)


@pytest.mark.parametrize("n, n_keys", [(0, 0), (1, 1), (7, 3), (4096, 4000), (4096, 50)])
def test_group_positions_lists_each_keys_positions_in_order(n, n_keys):
    rng = np.random.default_rng(n + n_keys)
    inverse = rng.integers(0, max(n_keys, 1), n) if n_keys else np.empty(0, np.int64)
    order, offsets = group_positions(inverse, n_keys)
    assert offsets.shape == (n_keys + 1,) and offsets[0] == 0 and offsets[-1] == n
    for k in range(n_keys):
        assert order[offsets[k]:offsets[k + 1]].tolist() == np.flatnonzero(inverse == k).tolist()
