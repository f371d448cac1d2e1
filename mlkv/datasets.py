"""Real data for examples and tests: MovieLens-100K and small knowledge graphs.

The files ship inside two wheels that are installed without their dependencies::

    pip install --no-deps recbole pykeen

They are located with :func:`importlib.util.find_spec` and read with numpy; neither package is
ever imported (that would pull in their dependencies), and no data is copied into this
repository (the MovieLens licence forbids redistribution). This module imports numpy only.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

__all__ = ["KG_NAMES", "kg_triples", "movielens_100k", "movielens_split"]

# name -> (wheel, folder inside the wheel, files in split order, whether the files have a header)
_KG = {
    "umls": ("pykeen", "datasets/umls", ("train.txt", "valid.txt", "test.txt"), False),
    "kinships": ("pykeen", "datasets/kinships", ("train.txt", "valid.txt", "test.txt"), False),
    "nations": ("pykeen", "datasets/nations", ("train.txt", "valid.txt", "test.txt"), False),
    "ml-100k": ("recbole", "dataset_example/ml-100k", ("ml-100k.kg",), True),
}
KG_NAMES = tuple(_KG)
_SPLITS = ("train", "valid", "test")


def _wheel_file(package: str, *parts: str) -> str:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {package!r} wheel is not installed; its data files are needed here. "
            f"Install it with: pip install --no-deps {package}")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *parts)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{'/'.join(parts)} not found in the installed {package!r} package "
        f"({', '.join(spec.submodule_search_locations)}); reinstall it with: "
        f"pip install --no-deps --force-reinstall {package}")


def movielens_100k() -> dict:
    """Load the 100,000 ratings of MovieLens-100K from the ``recbole`` wheel.

    Returns
    -------
    dict
        ``user`` (int64, the file's ids 1..943), ``item`` (int64, ids 1..1682), ``rating``
        (float32, 1..5) and ``timestamp`` (int64, Unix seconds), one entry per rating, in the
        order of ``recbole/dataset_example/ml-100k/ml-100k.inter``.

    Raises
    ------
    FileNotFoundError
        If ``recbole`` is not installed (``pip install --no-deps recbole``).
    """
    path = _wheel_file("recbole", "dataset_example", "ml-100k", "ml-100k.inter")
    with open(path, encoding="utf-8") as f:
        header = [field.split(":")[0] for field in f.readline().rstrip("\r\n").split("\t")]
    wanted = ("user_id", "item_id", "rating", "timestamp")
    missing = [name for name in wanted if name not in header]
    if missing:
        raise ValueError(f"{path}: columns {missing} not in the header {header}")
    table = np.loadtxt(path, delimiter="\t", skiprows=1, dtype=np.float64, ndmin=2,
                       usecols=[header.index(name) for name in wanted])
    return {"user": table[:, 0].astype(np.int64), "item": table[:, 1].astype(np.int64),
            "rating": table[:, 2].astype(np.float32), "timestamp": table[:, 3].astype(np.int64)}


def movielens_split(data: dict, test_fraction: float = 0.1, seed: int = 0) -> tuple[dict, dict]:
    """Split a dict of equal-length arrays into random train and test rows.

    Parameters
    ----------
    data : dict
        Arrays of one length, such as the result of :func:`movielens_100k`.
    test_fraction : float
        Share of rows in the test part, strictly between 0 and 1 (rounded to whole rows).
    seed : int
        Seed of the permutation: the same seed always gives the same split.

    Returns
    -------
    (dict, dict)
        ``(train, test)`` with the same keys as ``data``. Every row is in exactly one part, and
        each part keeps the rows in their original order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    lengths = {len(v) for v in data.values()}
    if len(lengths) != 1:
        raise ValueError(f"arrays of different lengths: { {k: len(v) for k, v in data.items()} }")
    n = lengths.pop()
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    test_rows, train_rows = np.sort(order[:n_test]), np.sort(order[n_test:])
    return ({k: np.asarray(v)[train_rows] for k, v in data.items()},
            {k: np.asarray(v)[test_rows] for k, v in data.items()})


def kg_triples(name: str, split: str | None = None) -> dict:
    """Load a knowledge graph as integer triples.

    Parameters
    ----------
    name : str
        ``"umls"``, ``"kinships"`` or ``"nations"`` (from the ``pykeen`` wheel), or
        ``"ml-100k"`` (the Freebase graph around MovieLens-100K's films, from ``recbole``).
    split : {None, "train", "valid", "test"}
        For the pykeen graphs, only the triples of that split (``None``: all of them, in the
        order train, valid, test). ``ml-100k`` has no splits and accepts only ``None``.

    Returns
    -------
    dict
        ``head``, ``relation``, ``tail``: int64 arrays, one entry per triple. ``entities`` and
        ``relations``: lists of the string labels, sorted, so that ``entities[head[i]]`` is the
        label of the head of triple ``i``. Ids come from the whole graph, whatever ``split``,
        so ids agree between splits.

    Raises
    ------
    FileNotFoundError
        If the wheel that holds the graph is not installed.
    """
    key = name.lower()
    if key not in _KG:
        raise ValueError(f"unknown graph {name!r}; choose one of {', '.join(KG_NAMES)}")
    package, folder, files, header = _KG[key]
    if split is not None and (len(files) == 1 or split not in _SPLITS):
        allowed = "None" if len(files) == 1 else f"None or one of {_SPLITS}"
        raise ValueError(f"split of {name!r} must be {allowed}, got {split!r}")
    parts = []
    for file in files:
        path = _wheel_file(package, *folder.split("/"), file)
        parts.append(np.loadtxt(path, dtype=str, delimiter="\t", comments=None,
                                skiprows=int(header), ndmin=2, encoding="utf-8"))
    for path, part in zip(files, parts):
        if part.shape[1] != 3:
            raise ValueError(f"{path}: expected 3 columns, found {part.shape[1]}")
    triples = np.concatenate(parts)
    entities, ent_ids = np.unique(triples[:, [0, 2]], return_inverse=True)
    relations, rel_ids = np.unique(triples[:, 1], return_inverse=True)
    ent_ids = ent_ids.reshape(-1, 2)
    rows = slice(None)
    if split is not None:
        bounds = np.cumsum([0] + [len(p) for p in parts])
        i = _SPLITS.index(split)
        rows = slice(bounds[i], bounds[i + 1])
    return {"head": ent_ids[rows, 0].astype(np.int64), "relation": rel_ids[rows].astype(np.int64),
            "tail": ent_ids[rows, 1].astype(np.int64),
            "entities": entities.tolist(), "relations": relations.tolist()}
