"""Where the time of a KVEmbedding training step goes (not a pytest benchmark).

    python bench/profile_train_step.py [--optimizer sgd] [--dist uniform] [--batches 200]
                                       [--threads 1] [--ids dense]

The step of ``test_bench_torch.py`` (``out = emb(ids); out.backward(w)``, batches of 4,096
ids, dim 64, 262,144 rows in memory, one torch thread), timed whole and split into its
parts on the same batches: finding the batch's distinct ids (the update does it), the store
read (``get_or_init`` of every position) and the fused update (``store.update`` of every
position's gradient row, repeats summed in the kernel), as the step calls them; and torch's
step (``nn.Embedding(sparse=True)`` and the matching optimizer) beside it. Prints µs per batch,
the mean over the batches, of two passes (the second is warm).

``--ids hashed`` gives mlkv's rows random 63-bit ids instead of 0 .. n-1 (row ``r`` is id
``hashed[r]``, the same rows in the same order), as a table keyed by hashed features would
have; torch's step keeps the dense ids it needs.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import BATCH, DIM, key_batches, per_batch_us  # noqa: E402

from mlkv.frameworks.torch import KVEmbedding  # noqa: E402
from mlkv.engine._batch_kernels import unique_inverse  # noqa: E402

ROWS = 1 << 18
LR = 0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adagrad", "adam"))
    parser.add_argument("--dist", default="uniform", choices=("uniform", "zipf"))
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2),
                        help="the store's threads (2: reads and updates use mlkv's helper)")
    parser.add_argument("--ids", default="dense", choices=("dense", "hashed"),
                        help="mlkv's ids: 0 .. n-1, or random 63-bit ids")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = key_batches(args.dist, ROWS, args.batches)
    weight = torch.rand(ROWS, DIM, generator=torch.Generator().manual_seed(1)) * 0.2 - 0.1
    w = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(3))
    ids = [torch.from_numpy(b) for b in batches]
    hashed = None
    if args.ids == "hashed":
        hashed = np.random.default_rng(7).choice(1 << 62, ROWS, replace=False).astype(np.int64)
        batches = [hashed[b] for b in batches]
    mlkv_ids = [torch.from_numpy(b) for b in batches]
    with tempfile.TemporaryDirectory() as tmp:
        emb = KVEmbedding(DIM, path=os.path.join(tmp, "emb"), optimizer=args.optimizer, lr=LR,
                          threads=args.threads,
                          memory_bytes=ROWS * 1024, page_bits=20)
        store = emb.store
        if hashed is not None:
            store.put(hashed, weight.numpy())
        else:
            emb.from_dense(weight)
        # the whole step first, with its page faults (a step should take almost none: see
        # bench/step_page_faults.py)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step_us = per_batch_us(lambda i: emb(i).backward(w), mlkv_ids)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (2 * len(ids))
        # one gradient block for every batch, as the step's own fixed output gradient
        grad_block = np.random.default_rng(1).random((BATCH, DIM), dtype=np.float32)
        hyper = emb._hyper(1)
        parts = {
            f"step ({faults:.0f} page faults a step)": step_us,
            "  distinct ids": per_batch_us(unique_inverse, batches),
            "  read (get_or_init, every position)": per_batch_us(store.get_or_init, batches),
            "  update (store.update, every position)": per_batch_us(
                lambda b: store.update(b, grad_block, args.optimizer, hyper), batches),
        }
        emb.close()
    table = torch.nn.Embedding(ROWS, DIM, sparse=True)
    with torch.no_grad():
        table.weight.copy_(weight)
    opt = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
           "adam": torch.optim.SparseAdam}[args.optimizer](table.parameters(), lr=LR)

    def torch_step(i):
        table(i).backward(w)
        opt.step()
        opt.zero_grad()

    parts["torch step"] = per_batch_us(torch_step, ids)
    distinct_rows = np.mean([unique_inverse(b)[0].shape[0] for b in batches])
    print(f"{args.optimizer}, {args.dist} {args.ids} ids: {distinct_rows:.0f} distinct of {BATCH} "
          f"a batch")
    for name, us in parts.items():
        print(f"{name:40s} {us:8.0f} µs")


if __name__ == "__main__":
    main()
