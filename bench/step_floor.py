"""The least an SGD training step through a hash-indexed row store can cost here, beside torch's
step and mlkv's (not a pytest benchmark).

    python bench/step_floor.py [--batches 200] [--dist uniform]

Issue 4 asks a KVEmbedding sgd step (batches of 4,096 ids, dim 64, 262,144 rows in memory,
one torch thread) to run at 1.5x torch's speed. This script times, on the same batches, what
any step of such a store must do at the least, each part alone and done as fast as this
project knows how:

- ``autograd``: a ``torch.autograd.Function`` that hands out a ready output and takes its
  gradient, doing nothing else (what hooking into ``out.backward`` costs);
- ``probe``: finding each id's address in mlkv's hash index (``find_slots``, prefetching);
- ``records``: reading each row out of its record and then updating it in place, given the
  addresses (mlkv's kernels' second loops alone: no index, no Python);
- ``dense``: the same read and update on a plain dense array (256-byte rows instead of
  272-byte records, rows found by arithmetic).

``floor = autograd + probe + records`` is a step with nothing but the unavoidable parts, and
is set against ``torch / 1.5``, the target. Beside it, what mlkv's step is made of:

- ``mlkv kernels``: mlkv's read kernel, then its sgd update kernel with the read's addresses,
  called one after the other with no Python between (what ``emb(ids).backward(w)`` runs);
- ``kernels + autograd``: the same two kernels in a ``torch.autograd.Function`` (read in
  forward, update in backward): mlkv's step without the Python of its modules and store;
- ``mlkv step``: ``emb(ids).backward(w)`` on a ``KVEmbedding``.

Prints µs per batch (mean of the second of two passes over the batches).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numba
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import BATCH, DIM, key_batches, per_batch_us  # noqa: E402

from mlkv.engine import _index_kernels as IK  # noqa: E402
from mlkv.engine import _log_kernels as K  # noqa: E402
from mlkv.engine import _update_kernels as UK  # noqa: E402
from mlkv.engine._rule_kernels import RULES, hyper_vector  # noqa: E402
from mlkv.frameworks.torch import KVEmbedding  # noqa: E402

ROWS = 1 << 18
LR = 0.01
AHEAD = K.PREFETCH_DISTANCE


@numba.njit(nogil=True, boundscheck=False)
def _read_then_update(flat, starts, out, grads, neg_lr):
    """Rows at ``flat[starts[i]:starts[i] + dim]`` copied out, then updated (sgd), each pass
    prefetching a few rows ahead with mlkv's kernels' own helper."""
    n, dim = starts.shape[0], out.shape[1]
    for i in range(n):
        if i + AHEAD < n:
            K._prefetch_span(flat, starts[i + AHEAD], dim, False)
        u = np.uint64(starts[i])
        for j in range(dim):
            out[i, j] = flat[u + np.uint64(j)]
    for i in range(n):
        if i + AHEAD < n:
            K._prefetch_span(flat, starts[i + AHEAD], dim, True)
        u = np.uint64(starts[i])
        for j in range(dim):
            flat[u + np.uint64(j)] += neg_lr * grads[i, j]


@numba.njit(nogil=True)
def _value_starts(vals, geo, head, addrs, starts):
    origin = K._ring_origin(geo, head)
    for i in range(addrs.shape[0]):
        starts[i] = K._value_offset(vals, geo, origin, addrs[i])


class _Kernels(torch.autograd.Function):
    """mlkv's read kernel in forward, its update kernel in backward, nothing else."""

    @staticmethod
    def forward(ctx, anchor, kernels, keys):
        read, ctx.update = kernels
        out = np.empty((keys.shape[0], DIM), dtype=np.float32)
        ctx.keys, ctx.addrs = keys, read(keys, out)
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.update(ctx.keys, ctx.addrs, grad.numpy())
        return None, None, None


def _store_kernels(store):
    """``(read(keys, out) -> addresses, update(keys, addresses, grads))``: the store's read
    kernel and its sgd update kernel, called directly (the table must be in memory)."""
    eng = store.engine
    idx, log, policy = eng.index, eng.log, eng.policy
    none = np.empty(0, dtype=np.int64)
    hyper = hyper_vector("sgd", LR)
    update_rows = UK.UPDATE_ROWS[RULES["sgd"]]

    def read(keys, out):
        addrs, cold = np.empty(keys.shape[0], np.int64), np.empty(keys.shape[0], np.int64)
        stop, n_cold, _ = K.read_resident(
            idx.slot_keys, idx.slot_addrs, log.words, log.vals, log.dirty, log.geo, log.marks,
            keys, 0, True, out, addrs, cold, 0, 0, policy.code, policy.counters)
        assert stop == keys.shape[0] and n_cold == 0, "the table must be in memory"
        return addrs

    def update(keys, addrs, grads):
        stop, status = update_rows(
            idx.slot_keys, idx.slot_addrs, log.words, log.vals, log.f32, log.dirty, log.geo,
            log.marks, keys, grads, none, none, keys, addrs, 0, hyper, 0)
        assert status == UK.DONE

    return read, update


class _Handoff(torch.autograd.Function):
    """Output out, gradient in, nothing done: the cost of being on autograd's tape."""

    @staticmethod
    def forward(ctx, anchor, out):
        return out

    @staticmethod
    def backward(ctx, grad):
        grad.detach().numpy()
        return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--dist", default="uniform", choices=("uniform", "zipf"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = key_batches(args.dist, ROWS, args.batches)
    ids = [torch.from_numpy(b) for b in batches]
    weight = torch.rand(ROWS, DIM, generator=torch.Generator().manual_seed(1)) * 0.2 - 0.1
    w = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(3))
    grads, neg_lr = w.numpy(), np.float32(-LR)
    out = np.empty((BATCH, DIM), dtype=np.float32)
    parts = {}

    table = torch.nn.Embedding(ROWS, DIM, sparse=True)
    with torch.no_grad():
        table.weight.copy_(weight)
    opt = torch.optim.SGD(table.parameters(), lr=LR)

    def torch_step(i):
        table(i).backward(w)
        opt.step()
        opt.zero_grad()

    parts["torch step"] = per_batch_us(torch_step, ids)
    out_t = torch.from_numpy(out)
    parts["autograd"] = per_batch_us(
        lambda i: _Handoff.apply(torch.empty(0, requires_grad=True), out_t).backward(w), ids)
    with tempfile.TemporaryDirectory() as tmp:
        emb = KVEmbedding(DIM, path=os.path.join(tmp, "emb"), optimizer="sgd", lr=LR,
                          memory_bytes=ROWS * 1024, page_bits=20)
        emb.from_dense(weight)
        idx, log = emb.store.engine.index, emb.store.engine.log
        addrs = np.empty(BATCH, dtype=np.int64)
        parts["probe"] = per_batch_us(
            lambda b: IK.find_slots(idx.slot_keys, idx.slot_addrs, b, 0, addrs), batches)
        starts = []
        for b in batches:
            IK.find_slots(idx.slot_keys, idx.slot_addrs, b, 0, addrs)
            s = np.empty(BATCH, dtype=np.int64)
            _value_starts(log.vals, log.geo, log.marks[K.M_HEAD], addrs, s)
            starts.append(s)
        flat = log.vals.reshape(-1)
        parts["records"] = per_batch_us(
            lambda s: _read_then_update(flat, s, out, grads, neg_lr), starts)
        kernels = _store_kernels(emb.store)
        read, update = kernels
        parts["mlkv kernels"] = per_batch_us(
            lambda b: update(b, read(b, out), grads), batches)
        anchor = torch.empty(0, requires_grad=True)
        parts["kernels + autograd"] = per_batch_us(
            lambda b: _Kernels.apply(anchor, kernels, b).backward(w), batches)
        parts["mlkv step"] = per_batch_us(lambda i: emb(i).backward(w), ids)
        emb.close()
    dense = weight.numpy().reshape(-1).copy()
    parts["dense"] = per_batch_us(
        lambda b: _read_then_update(dense, b * DIM, out, grads, neg_lr), batches)
    floor = parts["autograd"] + parts["probe"] + parts["records"]
    target = parts["torch step"] / 1.5
    print(f"sgd, {args.dist} ids, batches of {BATCH}, dim {DIM}, {ROWS:,} rows in memory")
    for name, us in parts.items():
        print(f"{name:28s} {us:8.0f} µs")
    print(f"{'floor (autograd+probe+records)':28s} {floor:8.0f} µs")
    print(f"{'target: torch step / 1.5':28s} {target:8.0f} µs")
    print(f"floor / target {floor / target:.2f}; mlkv step / floor {parts['mlkv step'] / floor:.2f}")
    bare = parts["kernels + autograd"]
    print(f"torch step / (kernels + autograd) {parts['torch step'] / bare:.2f}; "
          f"torch step / mlkv step {parts['torch step'] / parts['mlkv step']:.2f}")


if __name__ == "__main__":
    main()
