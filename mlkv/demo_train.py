"""``mlkv demo``'s training part: one model trained in memory and with its tables on disk.

A biased matrix-factorisation rating model on MovieLens-100K (the ``recbole`` wheel's copy,
read by :mod:`mlkv.datasets`; a seeded random 90/10 split) is trained twice from the same
initial rows, over the same batches in the same order, with the same optimizer (Adagrad):

1. in memory: ``nn.Embedding(sparse=True)`` tables and ``torch.optim.Adagrad``;
2. on disk: :class:`~mlkv.frameworks.torch.KVEmbedding` tables whose buffer pools hold a few
   pages (by default 24 of 4 KiB: 96 KiB for a user table of 258 KiB and an item table of
   460 KiB, rows and their Adagrad state), so most rows are read back from disk; trained
   through ``Pipeline(lookahead=2, staleness=2)``, which reads the rows of the next batches
   on a background thread and lets a row's read miss at most 2 of its pending updates.

prediction(u, i) = <p_u, q_i> + b_u + b_i + mean. Each table row holds ``dim`` factors and
the bias in its last column, so one lookup a side serves both; the loss is the batch's mean
squared error plus ``reg`` times the mean squared norm of the rows it looked up (so every
gradient stays sparse). After each epoch both models are scored on the test ratings (RMSE,
predictions clipped to [1, 5]); the run passes when the final RMSEs differ by at most
``tolerance`` (2 %) relative to the in-memory one. Staleness makes the two runs differ
slightly; with ``staleness=0`` they agree to float rounding (the store's Adagrad gives
torch's numbers).

Per epoch it prints samples/s of each run's training pass (the pass over the pipeline ends
when every pending update is applied; scoring is not timed) and the rows (and device bytes)
the two stores read from disk during the pass, on any thread: the lookahead, the training
step's lookups and the update worker's read-modify-writes.

This module imports numpy only; torch is imported by :func:`run`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

TORCH_HINT = "pip install torch==2.13.0"
RECBOLE_HINT = "pip install --no-deps recbole"
INIT_STD = 0.1        # factor columns start N(0, INIT_STD^2); the bias column starts at 0
KiB = 1 << 10
MiB = 1 << 20


class ShuffledBatches:
    """``(users, items, ratings)`` tensors of ``batch`` ratings; each pass (``iter``) visits
    all ratings in a fresh order drawn from a generator seeded once with ``seed``."""

    def __init__(self, users, items, ratings, batch: int, seed: int):
        self.users, self.items, self.ratings = users, items, ratings
        self.batch = batch
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.users.shape[0]

    def __iter__(self):
        order = self.rng.permutation(len(self))
        for lo in range(0, len(order), self.batch):
            rows = order[lo:lo + self.batch]
            yield self.users[rows], self.items[rows], self.ratings[rows]


def _forward(user, item, users, items, mean):
    """Predicted ratings and the L2 penalty (a batch mean) of the rows looked up."""
    p, q = user(users), item(items)
    pred = (p[:, :-1] * q[:, :-1]).sum(-1) + p[:, -1] + q[:, -1] + mean
    return pred, ((p * p).sum(-1) + (q * q).sum(-1)).mean()


def _rmse(torch, user, item, test: dict, mean: float) -> float:
    """Test RMSE, predictions clipped to [1, 5]."""
    with torch.no_grad():
        pred, _ = _forward(user, item, test["user"], test["item"], mean)
    return float((pred.double().clamp(1.0, 5.0) - test["rating"].double()).pow(2).mean().sqrt())


def _disk(stores) -> tuple[int, int]:
    """Rows read from disk and device bytes read, summed over ``stores``."""
    stats = [s.stats() for s in stores]
    return sum(s["disk_reads"] for s in stats), sum(s["bytes_read"] for s in stats)


def _load(out):
    """``(torch, train, test)`` with the splits as tensors, or None after saying what to
    install."""
    try:
        import torch
    except ImportError:
        out(f"  skipped: torch is not installed. Install it with: {TORCH_HINT}")
        return None
    from .datasets import movielens_100k, movielens_split
    try:
        data = movielens_100k()
    except FileNotFoundError:
        out("  skipped: MovieLens-100K comes from the recbole wheel, which is not installed. "
            f"Install it with: {RECBOLE_HINT}")
        return None
    parts = movielens_split(data, test_fraction=0.1, seed=0)
    return (torch, *({k: torch.from_numpy(part[k]) for k in ("user", "item", "rating")}
                     for part in parts))


def run(epochs: int = 8, dim: int = 32, lr: float = 0.1, reg: float = 0.1, batch: int = 1024,
        pages: int = 24, page_bits: int = 12, lookahead: int = 2, staleness: int = 2,
        tolerance: float = 0.02, seed: int = 0, path: str | None = None, out=print) -> dict:
    """Train the demo's model in memory and on mlkv tables; print and compare the RMSEs.

    Parameters
    ----------
    epochs, dim, lr, reg, batch : int or float
        Passes over the training ratings, factors a row, Adagrad's learning rate, the L2
        weight and ratings a step.
    pages, page_bits : int
        Each mlkv table's buffer pool: ``pages`` pages of ``2**page_bits`` bytes.
    lookahead, staleness : int
        The :class:`~mlkv.frameworks.torch.Pipeline`'s settings.
    tolerance : float
        Largest relative difference of the final test RMSEs that passes.
    seed : int
        Seeds the initial rows and the batch order (the data split is fixed).
    path : str, optional
        Keep the stores here (default: a temporary directory, removed at the end).
    out : callable
        Receives each line of the report.

    Returns
    -------
    dict
        ``skipped``: why the part did not run (torch or recbole missing), else None, with
        ``rmse_memory``, ``rmse_mlkv`` (final test RMSEs), ``relative_difference``, ``ok``
        (within ``tolerance``) and ``epochs`` (one dict of figures per epoch).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    loaded = _load(out)
    if loaded is None:
        return {"skipped": "missing dependency", "ok": False, "tolerance": tolerance}
    torch, train, test = loaded
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny ops: one thread is fastest and steadiest
    owned = path is None
    path = path or tempfile.mkdtemp(prefix="mlkv-demo-train-")
    try:
        # explicit opt-out: silences the warning Adagrad's sparse step would print
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            return _compare(torch, train, test, dict(
                epochs=epochs, dim=dim, lr=lr, reg=reg, batch=batch, pages=pages,
                page_bits=page_bits, lookahead=lookahead, staleness=staleness,
                tolerance=tolerance, seed=seed), path, out)
    finally:
        torch.set_num_threads(threads)
        if owned:
            shutil.rmtree(path, ignore_errors=True)


def _tables(torch, KVEmbedding, sizes, c, path, out):
    """The in-memory tables, their optimizer and the mlkv tables, from the same rows."""
    torch.manual_seed(c["seed"])
    init = {}
    for side, n in sizes.items():
        w = torch.randn(n, c["dim"] + 1) * INIT_STD
        w[:, -1] = 0.0
        init[side] = w
    dense = {side: torch.nn.Embedding.from_pretrained(w.clone(), freeze=False, sparse=True)
             for side, w in init.items()}
    opt = torch.optim.Adagrad([e.weight for e in dense.values()], lr=c["lr"])
    budget = c["pages"] << c["page_bits"]
    kv = {}
    for side, w in init.items():
        kv[side] = KVEmbedding(c["dim"] + 1, path=os.path.join(path, side), optimizer="adagrad",
                               lr=c["lr"], memory_bytes=budget, page_bits=c["page_bits"])
        kv[side].from_dense(w)
        record = kv[side].store.layout.record_bytes
        out(f"    {side} table: {w.shape[0]:5,} rows x {record} bytes (row and Adagrad state) "
            f"= {w.shape[0] * record / KiB:3,.0f} KiB, memory_bytes {budget / KiB:,.0f} KiB "
            f"({c['pages']} pages): {w.shape[0] * record / budget:.1f}x larger than memory")
    return dense, opt, kv


def _warm_up(torch, KVEmbedding, c, path):
    """Load (or compile) the kernels of the mlkv tables' lookup and update, outside timings."""
    with KVEmbedding(c["dim"] + 1, path=os.path.join(path, "warm-up"), optimizer="adagrad",
                     lr=c["lr"], memory_bytes=4 << c["page_bits"],
                     page_bits=c["page_bits"]) as table:
        table(torch.arange(64)).sum().backward()


def _compare(torch, train, test, c, path, out):
    from .frameworks.torch import KVEmbedding, Pipeline

    _warm_up(torch, KVEmbedding, c, path)
    mean = float(train["rating"].double().mean())
    sizes = {side: int(max(train[side].max(), test[side].max())) + 1 for side in ("user", "item")}
    out(f"  MovieLens-100K: {len(train['rating']):,} training and {len(test['rating']):,} test "
        f"ratings of {sizes['user'] - 1:,} users and {sizes['item'] - 1:,} films")
    out(f"  biased matrix factorisation, {c['dim']} factors, Adagrad lr {c['lr']:g}, batches of "
        f"{c['batch']:,}, seed {c['seed']}; trained twice from the same rows and batches:")
    out("  in memory: nn.Embedding(sparse=True) tables and torch.optim.Adagrad")
    out(f"  mlkv:      KVEmbedding(optimizer='adagrad') tables, through "
        f"Pipeline(lookahead={c['lookahead']}, staleness={c['staleness']})")
    dense, opt, kv = _tables(torch, KVEmbedding, sizes, c, path, out)
    stores = [kv["user"].store, kv["item"].store]
    args = (train["user"], train["item"], train["rating"].float(), c["batch"], c["seed"])
    dense_batches = ShuffledBatches(*args)
    pipe = Pipeline(ShuffledBatches(*args), {kv["user"]: lambda b: b[0],
                                             kv["item"]: lambda b: b[1]},
                    lookahead=c["lookahead"], staleness=c["staleness"])
    out("  epoch    in memory: test RMSE  samples/s     mlkv: test RMSE  samples/s  "
        "read from disk")
    history = []
    try:
        for epoch in range(1, c["epochs"] + 1):
            t0 = time.perf_counter()
            for users, items, ratings in dense_batches:
                pred, penalty = _forward(dense["user"], dense["item"], users, items, mean)
                loss = torch.mean((pred - ratings) ** 2) + c["reg"] * penalty
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            dense_s = time.perf_counter() - t0

            rows0, bytes0 = _disk(stores)
            t0 = time.perf_counter()
            for users, items, ratings in pipe:     # the pass ends with every update applied
                pred, penalty = _forward(kv["user"], kv["item"], users, items, mean)
                loss = torch.mean((pred - ratings) ** 2) + c["reg"] * penalty
                loss.backward()                    # the tables' updates go to the pipeline
            kv_s = time.perf_counter() - t0
            rows1, bytes1 = _disk(stores)

            fig = {"rmse_memory": _rmse(torch, dense["user"], dense["item"], test, mean),
                   "rmse_mlkv": _rmse(torch, kv["user"], kv["item"], test, mean),
                   "samples_per_s_memory": len(dense_batches) / dense_s,
                   "samples_per_s_mlkv": len(dense_batches) / kv_s,
                   "disk_rows": rows1 - rows0, "disk_bytes": bytes1 - bytes0}
            history.append(fig)
            out(f"  {epoch:5d}  {fig['rmse_memory']:21.4f}  {fig['samples_per_s_memory']:9,.0f}"
                f"  {fig['rmse_mlkv']:18.4f}  {fig['samples_per_s_mlkv']:9,.0f}  "
                f"{fig['disk_rows']:,} rows, {fig['disk_bytes'] / MiB:,.1f} MiB")
    finally:
        pipe.close()
        for table in kv.values():
            table.close()
    a, b = history[-1]["rmse_memory"], history[-1]["rmse_mlkv"]
    rel = abs(b - a) / a
    ok = rel <= c["tolerance"]
    out(f"  final test RMSE: in memory {a:.5f}, mlkv {b:.5f}: {rel:.3%} apart, "
        f"{'within' if ok else 'MORE than'} the {c['tolerance']:.0%} allowed")
    return {"skipped": None, "rmse_memory": a, "rmse_mlkv": b, "relative_difference": rel,
            "tolerance": c["tolerance"], "ok": ok, "epochs": history}
