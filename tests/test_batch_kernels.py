"""The batch kernels of the torch adapters against plain Python references."""

import numpy as np
import pytest

from mlkv.frameworks.torch._batch_kernels import unique_inverse


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
