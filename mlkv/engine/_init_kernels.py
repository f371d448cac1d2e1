"""Numba kernel of the stores' initializer: a new row drawn from its key and the store's seed.

A row depends only on ``(key, seed)``, not on the batch it was created in nor on the order of
creation, so a row created in one process is the row any other creates.
"""

import numpy as np

from .._jit import kernel
from ._index_kernels import mix64

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53
_SHIFT11 = np.uint64(11)


@kernel
def _unit(base, j):
    """The j-th uniform float64 in [0, 1) of a row's stream."""
    return np.float64(mix64(base + np.uint64(j + 1) * _GOLDEN) >> _SHIFT11) * _TO_UNIT


@kernel
def init_values(keys, seed, kind, scale, out):
    """Deterministic initial rows: ``out[i]`` depends only on (``keys[i]``, ``seed``).

    kind 0: U(-scale, scale); kind 1: N(0, scale**2) by Box-Muller; kind 2: zeros.
    """
    seed_mix = mix64(np.uint64(seed) + _GOLDEN)
    for i in range(keys.shape[0]):
        base = mix64(np.uint64(keys[i]) ^ seed_mix)
        for j in range(out.shape[1]):
            if kind == 0:
                out[i, j] = (2.0 * _unit(base, j) - 1.0) * scale
            elif kind == 1:
                u1 = _unit(base, 2 * j)
                u2 = _unit(base, 2 * j + 1)
                out[i, j] = np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2) * scale
            else:
                out[i, j] = 0.0
