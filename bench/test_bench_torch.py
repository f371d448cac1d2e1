"""Training the embedding part: forward + backward + update, mlkv against torch.

Batches of 4,096 ids (uniform or Zipf over the table), dim 64, a table that fits in memory.
One training step is the embedding part alone: ``out = emb(ids)``, ``out.backward(w)`` with a
fixed random output gradient ``w`` (what a model above would hand back; no loss is computed,
so nothing but the embedding is timed), and the optimizer's update:

- torch: ``nn.Embedding(sparse=True)`` and ``torch.optim.SGD`` / ``Adagrad`` / ``SparseAdam``
  (``opt.step(); opt.zero_grad()``);
- mlkv: ``KVEmbedding`` with the same optimizer, fused (the update runs in backward);
- dense (sgd only): the least work any SGD step on these ids must do, by hand on a dense
  table, no autograd and no sparse gradient: ``out = W[ids]``, then
  ``W.index_add_(0, ids, w, alpha=-lr)`` (repeated ids add up, as summing their gradients
  first would): what torch's own ops reach without autograd or a sparse gradient;
- ceiling (sgd only): the same step in ``@njit`` loops over the dense array (gather the rows
  out, subtract ``lr * w`` row by row): what this machine's memory allows an SGD step on
  these ids, the ceiling of the resident benchmarks applied to training.

Both start from the same rows (``from_dense``) and see the same id sequence, with as many
threads each: one (scenario ``train``: torch with one intra-op thread, mlkv's kernels on the
calling thread), then two (``train2``: torch's two intra-op threads, its default on a
2-core machine, and ``KVEmbedding(threads=2)``, whose reads share the batch with mlkv's
helper thread). Issue 4's target: mlkv at least
1.5x torch's steps per second.
"""

from __future__ import annotations

import os

import pytest

import benchlib
from benchlib import BATCH, DIM, DISTS

torch = pytest.importorskip("torch")
from mlkv.frameworks.torch import KVEmbedding  # noqa: E402

OPTIMIZERS = ("sgd", "adagrad", "adam")
#: (system, optimizer) pairs timed; the dense step exists for plain SGD only
CASES = [(system, optimizer) for optimizer in OPTIMIZERS for system in ("torch", "mlkv")] + [
    ("dense", "sgd"), ("ceiling", "sgd")]
LR = 0.01


def _train_rows(sizes) -> int:
    return 1 << 12 if sizes.smoke else int(os.environ.get("MLKV_BENCH_TRAIN_ROWS", 1 << 18))


def _make(system, optimizer, n, weight, path, n_threads=1):
    """A module and its step function (forward, backward, update) for one batch of ids."""
    w = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(3))
    if system == "dense":
        table = weight.clone()

        def dense_step(ids):
            out = table.index_select(0, ids)
            table.index_add_(0, ids, w, alpha=-LR)
            return out

        return table, dense_step
    if system == "ceiling":
        return _ceiling_step(weight.numpy().copy(), w.numpy())
    if system == "torch":
        emb = torch.nn.Embedding(n, DIM, sparse=True)
        with torch.no_grad():
            emb.weight.copy_(weight)
        cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
               "adam": torch.optim.SparseAdam}[optimizer]
        opt = cls(emb.parameters(), lr=LR)

        def after():
            opt.step()
            opt.zero_grad()
    else:
        # records: 16 B header + 256 B values + state (up to 512 B for adam), all in memory
        emb = KVEmbedding(DIM, path=path, optimizer=optimizer, lr=LR,
                          memory_bytes=max(64 << 20, n * 1024), page_bits=20, threads=n_threads)
        emb.from_dense(weight)

        def after():
            pass

    def step(ids):
        out = emb(ids)
        out.backward(w)
        after()
        return out

    return emb, step


def _ceiling_step(table, w):
    """The SGD step of the ``ceiling`` system on a dense float32 array (see the docstring)."""
    import numba
    import numpy as np

    # row views: a 2-D index with a signed column compiles to vector gathers (see
    # bench/README.md, "Where the time goes"), row views to plain vector loads and stores
    @numba.njit(nogil=True, boundscheck=False)
    def gather(table, ids, out):
        for i in range(ids.shape[0]):
            src, dst = table[ids[i]], out[i]
            for j in range(src.shape[0]):
                dst[j] = src[j]

    @numba.njit(nogil=True, boundscheck=False)
    def sgd(table, ids, grads, lr):
        for i in range(ids.shape[0]):
            row, g = table[ids[i]], grads[i]
            for j in range(row.shape[0]):
                row[j] -= lr * g[j]

    lr = np.float32(LR)

    def step(ids):
        keys = ids.numpy()
        out = np.empty((keys.shape[0], table.shape[1]), dtype=np.float32)
        gather(table, keys, out)
        sgd(table, keys, w, lr)
        return torch.from_numpy(out)

    step(torch.zeros(1, dtype=torch.int64))            # compile outside the timings
    return table, step


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("system, optimizer, n_threads", [c + (1,) for c in CASES] + [
    (system, optimizer, 2) for optimizer in OPTIMIZERS for system in ("torch", "mlkv")])
def test_train_step(benchmark, sizes, bench_dir, system, optimizer, n_threads, dist):
    n = _train_rows(sizes)
    threads = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    weight = torch.rand(n, DIM, generator=torch.Generator().manual_seed(1)) * 0.2 - 0.1
    emb, step = _make(system, optimizer, n, weight,
                      os.path.join(bench_dir, f"train{n_threads}-{optimizer}-{dist}"), n_threads)
    rounds = benchlib.Rounds(dist, n, sizes.resident_batches, seed=200 + DISTS.index(dist))
    cpu = benchlib.CpuClock()
    warmup = 0 if sizes.smoke else 1

    def run(keys):
        with cpu:
            for k in keys:
                out = step(torch.from_numpy(k))
        return out

    try:
        out = benchmark.pedantic(run, setup=rounds.setup, rounds=sizes.rounds,
                                 warmup_rounds=warmup)
        assert out.shape == (BATCH, DIM) and torch.isfinite(out).all()
        extra = {}
        if system == "mlkv":
            st = emb.store.stats()
            extra = {"mlkv_misses": st["misses"], "memory_bytes": st["memory_bytes"]}
        benchlib.record(benchmark, rounds.rows_per_round, cpu=cpu, warmup=warmup,
                        scenario="train" if n_threads == 1 else f"train{n_threads}",
                        op=optimizer, dist=dist, system=system, rows=n, threads=n_threads,
                        **extra)
    finally:
        torch.set_num_threads(threads)
        if system == "mlkv":
            emb.close()
