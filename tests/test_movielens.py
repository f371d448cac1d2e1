"""MovieLens-100K matrix factorisation trained on KVEmbedding tables through the Pipeline.

The model, its loss, its seeds and its batches are those of ``movielens_baseline``; the four
tables are KVEmbedding modules whose buffer pools are far smaller than the tables (rows are
read back from disk), started from the baseline's initial rows, and trained with the same
optimizer (adagrad, torch's numbers) through a Pipeline with lookahead 2. The test RMSE must
stay within 2 % of the in-memory ``nn.Embedding`` baseline, serial (staleness 0) and with
bounded staleness 4.
"""

import numpy as np
import pytest
import torch
from movielens_baseline import DEFAULTS, MatrixFactorization, rmse, torch_embedding, train_mf

from mlkv.datasets import movielens_100k, movielens_split
from mlkv.frameworks.torch import KVEmbedding, Pipeline

OPTIMIZER = "adagrad"
BATCH = 1024
SEED = 0
# 96 frames of 4 KiB per table: the item table (1683 rows of 272 bytes, 450 KiB) does not fit,
# the others do. Smaller pools pass too but take minutes: rows go to and from disk every batch.
SMALL = {"memory_bytes": 384 << 10, "page_bits": 12}


@pytest.fixture(scope="module")
def data():
    return movielens_split(movielens_100k())


@pytest.fixture(scope="module")
def baseline(data):
    train, test = data
    return train_mf(train, test, torch_embedding, OPTIMIZER, batch_size=BATCH, seed=SEED)


class ShuffledBatches:
    """``(users, items, ratings)`` batches of ``train``, in a fresh seeded order each pass:
    the order ``movielens_baseline.train_mf`` visits them in."""

    def __init__(self, train, batch_size, seed):
        self.users = torch.from_numpy(train["user"])
        self.items = torch.from_numpy(train["item"])
        self.ratings = torch.from_numpy(train["rating"]).float()
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        order = torch.from_numpy(self.rng.permutation(len(self.users)))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            yield self.users[rows], self.items[rows], self.ratings[rows]


def train_kv(train, test, root, staleness, lookahead=2):
    """Train the baseline's model on KVEmbedding tables through a Pipeline; returns the test
    RMSE and the pipeline's and the item table's statistics."""
    settings = DEFAULTS[OPTIMIZER]
    num_users = int(max(train["user"].max(), test["user"].max())) + 1
    num_items = int(max(train["item"].max(), test["item"].max())) + 1
    mean = float(np.mean(train["rating"], dtype=np.float64))

    def make_embedding(num, dim, name):
        dense = torch_embedding(num, dim, name)         # the baseline's draws, in its order
        table = KVEmbedding(dim, path=str(root / name), optimizer=OPTIMIZER,
                            lr=settings["lr"], **SMALL)
        table.from_dense(dense.weight)
        return table

    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as the baseline: tiny ops
    try:
        torch.manual_seed(SEED)
        model = MatrixFactorization(num_users, num_items, settings["dim"], mean, make_embedding)
        tables = {model.user: lambda b: b[0], model.item: lambda b: b[1],
                  model.user_bias: lambda b: b[0], model.item_bias: lambda b: b[1]}
        loader = ShuffledBatches(train, BATCH, SEED)
        with Pipeline(loader, tables, lookahead=lookahead, staleness=staleness) as pipe:
            for _ in range(settings["epochs"]):
                for users, items, ratings in pipe:
                    pred, penalty = model(users, items)
                    loss = torch.mean((pred - ratings) ** 2) + settings["reg"] * penalty
                    loss.backward()
            stats = pipe.stats()
        result = rmse(model, test), stats, model.item.store.stats()
    finally:
        torch.set_num_threads(threads)
        for table in (model.user, model.item, model.user_bias, model.item_bias):
            table.close()
    return result


@pytest.mark.parametrize("staleness", [0, 4])
def test_kv_tables_through_pipeline_match_baseline(data, baseline, tmp_path, staleness):
    train, test = data
    error, stats, store_stats = train_kv(train, test, tmp_path, staleness)
    print(f"baseline RMSE {baseline:.5f}; KVEmbedding, staleness {staleness}: {error:.5f}; "
          f"{stats['gate_waits']} gate waits, most pending seen {stats['max_pending_seen']}")
    assert store_stats["misses"] > 0, "the test meant item rows to be read back from disk"
    assert stats["max_pending_seen"] <= staleness
    if staleness:
        assert stats["max_pending_seen"] > 0
    assert abs(error - baseline) <= 0.02 * baseline, (error, baseline)
