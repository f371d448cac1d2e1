"""Checks of a store against a dict model of what it should hold, shared by test modules."""

from __future__ import annotations

import numpy as np


def assert_store_holds(store, model: dict, touched: set, batch: int = 500) -> None:
    """``store`` holds exactly ``model``: length, every row, ``items(batch=batch)`` (each key
    once), and none of the ``touched`` keys the model lacks."""
    assert len(store) == len(model)
    keys = np.array(sorted(model), dtype=np.int64)
    if keys.size:
        np.testing.assert_array_equal(store.get(keys), np.stack([model[k] for k in keys]))
    seen = {}
    for ks, vs in store.items(batch=batch):
        for k, v in zip(ks.tolist(), vs):
            assert k not in seen
            seen[k] = v
    assert set(seen) == set(model)
    for k, v in seen.items():
        np.testing.assert_array_equal(v, model[k])
    absent = np.array(sorted(touched - set(model)), dtype=np.int64)
    assert not store.contains(absent).any()
