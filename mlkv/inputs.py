"""Checks and conversions of the arrays users hand to a store: arrays in, clear errors out."""

from __future__ import annotations

import numpy as np


def as_keys(keys) -> np.ndarray:
    """``keys`` as a contiguous int64 vector.

    Any integer dtype (and lists of ints) is accepted; floats, objects and arrays that are
    not 1-D are refused with ``TypeError`` / ``ValueError``.
    """
    if is_ready(keys, _INT64, 1):           # the common case, checked first: runs every batch
        return keys
    arr = np.asarray(keys)
    if arr.ndim != 1:
        raise ValueError(f"keys must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"keys must be integers (int64), got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
        raise ValueError("keys must fit in int64; got uint64 values above 2**63 - 1")
    return np.ascontiguousarray(arr, dtype=np.int64)


def as_values(values, n: int, dim: int, dtype: np.dtype) -> np.ndarray:
    """``values`` as a contiguous ``[n, dim]`` array of ``dtype`` (numbers are converted)."""
    if is_ready(values, dtype, 2) and values.shape == (n, dim):
        return values
    arr = np.asarray(values)
    if n == 0 and arr.size == 0:
        return np.empty((0, dim), dtype=dtype)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"values must be numbers ({dtype.name}), got dtype {arr.dtype}")
    if arr.shape != (n, dim):
        raise ValueError(f"values must have shape ({n}, {dim}) for {n} keys, got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


_INT64 = np.dtype(np.int64)


def is_ready(arr, dtype, ndim: int) -> bool:
    """Whether ``arr`` is already a C-contiguous ndarray of ``dtype`` with ``ndim`` dimensions."""
    return (type(arr) is np.ndarray and arr.dtype == dtype and arr.ndim == ndim
            and arr.flags.c_contiguous)
