"""A small, seeded matrix-factorisation rating model on MovieLens-100K, for tests to compare with.

prediction(u, i) = <p_u, q_i> + b_u + b_i + mean, trained on the MSE plus an L2 penalty on the
rows a batch looks up (so every gradient stays sparse). The four tables are built by a
``make_embedding(num, dim, name)`` callable, so the same loop trains an in-memory
``nn.Embedding`` baseline (:func:`torch_embedding`) or any other module with the
``nn.Embedding`` forward signature (``LongTensor`` of ids -> ``(len(ids), dim)`` rows). The
optimizer named by ``train_mf`` updates only the tables that are ``nn.Embedding`` instances;
any other module is expected to update its own rows during backward.

>>> train, test = movielens_split(movielens_100k())
>>> train_mf(train, test, torch_embedding, "adam")              # doctest: +SKIP
0.89...
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

TABLES = ("user", "item", "user_bias", "item_bias")
INIT_STD = 0.1            # factor rows start N(0, INIT_STD^2); bias rows start at 0

# Tuned on the random 90/10 split of movielens_split(seed=0): each reaches its plateau, a test
# RMSE of about 0.89-0.90 (the global mean scores 1.115), in a few seconds on one core. The loss
# is a batch mean, so the SGD step per row is about 2 * lr / batch_size.
DEFAULTS = {
    "sgd": {"lr": 10.0, "dim": 32, "epochs": 25, "reg": 0.1},
    "adagrad": {"lr": 0.1, "dim": 32, "epochs": 12, "reg": 0.1},
    "adam": {"lr": 0.005, "dim": 32, "epochs": 12, "reg": 0.1},
}


def torch_embedding(num: int, dim: int, name: str) -> nn.Embedding:
    """In-memory table: ``nn.Embedding(sparse=True)``, factors N(0, INIT_STD^2), biases 0.

    Draws from torch's global generator, which :func:`train_mf` seeds before building tables.
    """
    table = nn.Embedding(num, dim, sparse=True)
    with torch.no_grad():
        if name.endswith("bias"):
            table.weight.zero_()
        else:
            table.weight.normal_(0.0, INIT_STD)
    return table


class MatrixFactorization(nn.Module):
    """Biased matrix factorisation over tables built by ``make_embedding(num, dim, name)``."""

    def __init__(self, num_users: int, num_items: int, dim: int, mean: float,
                 make_embedding: Callable[[int, int, str], nn.Module]):
        super().__init__()
        self.user = make_embedding(num_users, dim, "user")
        self.item = make_embedding(num_items, dim, "item")
        self.user_bias = make_embedding(num_users, 1, "user_bias")
        self.item_bias = make_embedding(num_items, 1, "item_bias")
        self.register_buffer("mean", torch.tensor(float(mean)))

    def forward(self, users: torch.Tensor, items: torch.Tensor):
        """Predicted ratings and the L2 penalty (mean over the batch) of the rows used."""
        p, q = self.user(users), self.item(items)
        bu, bi = self.user_bias(users).squeeze(-1), self.item_bias(items).squeeze(-1)
        pred = (p * q).sum(-1) + bu + bi + self.mean
        penalty = ((p * p).sum(-1) + (q * q).sum(-1) + bu * bu + bi * bi).mean()
        return pred, penalty


def make_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    """``"sgd"``, ``"adagrad"`` or ``"adam"`` (``SparseAdam``) over sparse-gradient parameters."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "adam":
        return torch.optim.SparseAdam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(DEFAULTS)}")


def rmse(model: MatrixFactorization, data: dict, batch_size: int = 8192) -> float:
    """Root mean squared error of ``model`` on ``data``, predictions clipped to [1, 5]."""
    users = torch.from_numpy(data["user"])
    items = torch.from_numpy(data["item"])
    ratings = torch.from_numpy(data["rating"]).double()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(users), batch_size):
            sl = slice(start, start + batch_size)
            pred, _ = model(users[sl], items[sl])
            total += float(((pred.double().clamp(1.0, 5.0) - ratings[sl]) ** 2).sum())
    return (total / len(users)) ** 0.5


def train_mf(train: dict, test: dict,
             make_embedding: Callable[[int, int, str], nn.Module] = torch_embedding,
             optimizer: str = "adam", epochs: int | None = None, batch_size: int = 1024,
             seed: int = 0, *, dim: int | None = None, lr: float | None = None,
             reg: float | None = None, history: list | None = None) -> float:
    """Train biased MF on ``train`` and return the RMSE on ``test``.

    Parameters
    ----------
    train, test : dict
        ``user``, ``item`` (int64 ids) and ``rating`` arrays, as from
        ``mlkv.datasets.movielens_split``.
    make_embedding : callable
        ``make_embedding(num, dim, name)`` -> module with the ``nn.Embedding`` forward
        signature; ``name`` is one of ``TABLES`` and ``num`` is the largest id + 1.
    optimizer : {"sgd", "adagrad", "adam"}
        Applied to the tables that are ``nn.Embedding``; other tables update themselves.
    epochs, dim, lr, reg : optional
        Default to ``DEFAULTS[optimizer]``.
    batch_size : int
        Rows per step; each epoch visits the training rows in a fresh seeded order.
    seed : int
        Seeds the table initialisation (torch's global generator) and the batch order.
    history : list, optional
        If given, the test RMSE after each epoch is appended to it.
    """
    if optimizer not in DEFAULTS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(DEFAULTS)}")
    settings = dict(DEFAULTS[optimizer])
    for key, value in (("epochs", epochs), ("dim", dim), ("lr", lr), ("reg", reg)):
        if value is not None:
            settings[key] = value
    num_users = int(max(train["user"].max(), test["user"].max())) + 1
    num_items = int(max(train["item"].max(), test["item"].max())) + 1
    mean = float(np.mean(train["rating"], dtype=np.float64))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # tiny ops; with busy cores, 2 threads ran 10x slower than 1
    try:
        # explicit opt-out: silences a warning that Adagrad's sparse step would print
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            return _train(train, test, make_embedding, optimizer, batch_size, seed, settings,
                          num_users, num_items, mean, history)
    finally:
        torch.set_num_threads(threads)


def _train(train, test, make_embedding, optimizer, batch_size, seed, settings, num_users,
           num_items, mean, history):
    torch.manual_seed(seed)
    model = MatrixFactorization(num_users, num_items, settings["dim"], mean, make_embedding)
    tables = [getattr(model, name) for name in TABLES]
    params = [t.weight for t in tables if isinstance(t, nn.Embedding)]
    opt = make_optimizer(optimizer, params, settings["lr"]) if params else None

    users = torch.from_numpy(train["user"])
    items = torch.from_numpy(train["item"])
    ratings = torch.from_numpy(train["rating"]).float()
    rng = np.random.default_rng(seed)
    for _ in range(settings["epochs"]):
        order = torch.from_numpy(rng.permutation(len(users)))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            pred, penalty = model(users[rows], items[rows])
            loss = torch.mean((pred - ratings[rows]) ** 2) + settings["reg"] * penalty
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if opt is not None:
                opt.step()
        if history is not None:
            history.append(rmse(model, test))
    return rmse(model, test)
