"""mlkv.datasets against facts known about the data, and the in-memory MovieLens baseline.

The expected counts are the published sizes of the datasets; each test also re-reads the files
with plain Python (``open`` and ``str.split``) and compares. Nothing is skipped when the
``recbole`` or ``pykeen`` wheel is missing: the loaders' FileNotFoundError (which says how to
install it) is the failure.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import mlkv.datasets as ds

# (triples, entities, relations, (train, valid, test)) as published for these benchmarks
KG_FACTS = {
    "umls": (6529, 135, 46, (5216, 652, 661)),
    "kinships": (10686, 104, 25, (8544, 1068, 1074)),
    "nations": (1992, 14, 55, (1592, 199, 201)),
}


def wheel_path(package, *parts):
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"pip install --no-deps {package}"
    return os.path.join(next(iter(spec.submodule_search_locations)), *parts)


def plain_rows(path, header):
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [line.split("\t") for line in lines[int(header):] if line]


def test_movielens_100k():
    data = ds.movielens_100k()
    assert set(data) == {"user", "item", "rating", "timestamp"}
    assert {k: v.dtype for k, v in data.items()} == {
        "user": np.int64, "item": np.int64, "rating": np.float32, "timestamp": np.int64}
    assert all(len(v) == 100_000 for v in data.values())
    assert len(np.unique(data["user"])) == 943 and len(np.unique(data["item"])) == 1682
    assert data["user"].min() == 1 and data["user"].max() == 943
    assert data["item"].min() == 1 and data["item"].max() == 1682
    assert set(np.unique(data["rating"]).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}

    rows = plain_rows(wheel_path("recbole", "dataset_example", "ml-100k", "ml-100k.inter"), True)
    assert len(rows) == 100_000
    assert data["user"].tolist() == [int(r[0]) for r in rows]
    assert data["item"].tolist() == [int(r[1]) for r in rows]
    assert data["rating"].tolist() == [float(r[2]) for r in rows]
    assert data["timestamp"].tolist() == [int(r[3]) for r in rows]
    # one rating per (user, item) pair, which the split test relies on
    assert len({(r[0], r[1]) for r in rows}) == 100_000


def pairs(d):
    return set(zip(d["user"].tolist(), d["item"].tolist()))


def test_movielens_split():
    data = ds.movielens_100k()
    train, test = ds.movielens_split(data, test_fraction=0.1, seed=0)
    assert len(train["user"]) == 90_000 and len(test["user"]) == 10_000
    assert set(train) == set(test) == set(data)
    assert not pairs(train) & pairs(test)
    assert pairs(train) | pairs(test) == pairs(data)
    for part in (train, test):   # rows stay whole: every (user, item) keeps its rating and time
        key = {(u, i): (r, t) for u, i, r, t in zip(*(data[k].tolist() for k in
                                                      ("user", "item", "rating", "timestamp")))}
        assert all(key[(u, i)] == (r, t) for u, i, r, t in zip(
            *(part[k].tolist() for k in ("user", "item", "rating", "timestamp"))))

    again = ds.movielens_split(data, test_fraction=0.1, seed=0)
    other = ds.movielens_split(data, test_fraction=0.1, seed=1)
    for a, b in zip((train, test), again):
        assert all(np.array_equal(a[k], b[k]) for k in data)
    assert pairs(other[1]) != pairs(test)
    assert len(ds.movielens_split(data, test_fraction=0.25)[1]["user"]) == 25_000
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            ds.movielens_split(data, test_fraction=bad)


@pytest.mark.parametrize("name", sorted(KG_FACTS))
def test_pykeen_graphs(name):
    n_triples, n_entities, n_relations, split_sizes = KG_FACTS[name]
    g = ds.kg_triples(name)
    assert len(g["head"]) == len(g["relation"]) == len(g["tail"]) == n_triples
    assert all(g[k].dtype == np.int64 for k in ("head", "relation", "tail"))
    assert len(g["entities"]) == n_entities and len(g["relations"]) == n_relations
    assert g["entities"] == sorted(g["entities"]) and g["relations"] == sorted(g["relations"])
    assert set(g["head"].tolist()) | set(g["tail"].tolist()) == set(range(n_entities))
    assert set(g["relation"].tolist()) == set(range(n_relations))

    rows = []
    for split, size in zip(("train", "valid", "test"), split_sizes):
        part = plain_rows(wheel_path("pykeen", "datasets", name, f"{split}.txt"), False)
        assert len(part) == size
        s = ds.kg_triples(name, split)
        assert s["entities"] == g["entities"] and s["relations"] == g["relations"]
        assert [[s["entities"][h], s["relations"][r], s["entities"][t]]
                for h, r, t in zip(s["head"], s["relation"], s["tail"])] == part
        rows += part
    assert [[g["entities"][h], g["relations"][r], g["entities"][t]]
            for h, r, t in zip(g["head"], g["relation"], g["tail"])] == rows
    with pytest.raises(ValueError):
        ds.kg_triples(name, "validation")


def test_movielens_graph():
    g = ds.kg_triples("ml-100k")
    rows = plain_rows(wheel_path("recbole", "dataset_example", "ml-100k", "ml-100k.kg"), True)
    assert len(rows) == len(g["head"]) == 91_631
    assert len(g["entities"]) == len({r[0] for r in rows} | {r[2] for r in rows}) == 34_628
    assert len(g["relations"]) == len({r[1] for r in rows}) == 24
    assert [[g["entities"][h], g["relations"][r], g["entities"][t]]
            for h, r, t in zip(g["head"], g["relation"], g["tail"])] == rows
    with pytest.raises(ValueError):
        ds.kg_triples("ml-100k", "train")
    with pytest.raises(ValueError, match="unknown graph"):
        ds.kg_triples("fb15k")


@pytest.mark.parametrize("package", ["recbole", "pykeen"])
def test_missing_wheel_says_how_to_install(monkeypatch, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real(name, *a))
    load = ds.movielens_100k if package == "recbole" else lambda: ds.kg_triples("umls")
    with pytest.raises(FileNotFoundError, match=f"pip install --no-deps {package}"):
        load()


def test_loading_imports_neither_wheel_nor_torch():
    code = ("import sys, mlkv.datasets as d; d.movielens_100k(); d.kg_triples('umls'); "
            "d.kg_triples('ml-100k'); "
            "print([m for m in ('torch', 'recbole', 'pykeen') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_in_memory_baseline_learns():
    from movielens_baseline import torch_embedding, train_mf

    train, test = ds.movielens_split(ds.movielens_100k(), test_fraction=0.1, seed=0)
    mean = sum(train["rating"].tolist()) / len(train["rating"])
    mean_rmse = (sum((r - mean) ** 2 for r in test["rating"].tolist()) / len(test["rating"])) ** 0.5
    assert 1.0 < mean_rmse < 1.2

    start = time.perf_counter()
    history = []
    result = train_mf(train, test, torch_embedding, "adam", history=history)
    elapsed = time.perf_counter() - start
    assert result == history[-1]
    assert result < 1.0 and result < mean_rmse - 0.1, (result, mean_rmse)
    assert elapsed < 120, elapsed
    # same seed, same result; and the other optimizers learn too (one epoch each, for speed)
    for opt in ("sgd", "adagrad", "adam"):
        once = [train_mf(train, test, torch_embedding, opt, epochs=1, seed=3) for _ in range(2)]
        assert once[0] == once[1] and once[0] < mean_rmse, (opt, once)
