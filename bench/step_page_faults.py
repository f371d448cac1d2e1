"""Page faults and time of a KVEmbedding training step, torch's beside it (not a pytest
benchmark).

    python bench/step_page_faults.py [--batches 300] [--batch 4096]

A training script often draws its batches up front and keeps them alive; here 300 batches of
4,096 ids (``torch.randint``, 32 KiB each) stay alive while ``out = emb(ids);
out.backward(w)`` runs over them (sgd, dim 64, 262,144 rows in memory, one torch thread).
Such a heap can make malloc hand every large temporary of a step out as a fresh mapping,
so each step pays its page faults again. Prints µs and minor page faults per step (the
second of two passes). ``--batch 1`` times the fixed cost of a step (Python, autograd).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch

from mlkv.frameworks.torch import KVEmbedding

ROWS, DIM, BATCH = 1 << 18, 64, 4096


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def per_step(step, batches) -> tuple[float, float]:
    """(µs, page faults) per step of the second of two passes."""
    for _ in range(2):
        f0, t0 = faults(), time.perf_counter()
        for ids in batches:
            step(ids)
        elapsed, faulted = time.perf_counter() - t0, faults() - f0
    return elapsed / len(batches) * 1e6, faulted / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch", type=int, default=BATCH, help="ids a batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batches = [torch.randint(0, ROWS, (args.batch,)) for _ in range(args.batches)]
    w = torch.randn(args.batch, DIM)
    weight = torch.rand(ROWS, DIM)
    with tempfile.TemporaryDirectory() as tmp:
        emb = KVEmbedding(DIM, path=os.path.join(tmp, "emb"), optimizer="sgd", lr=0.01,
                          memory_bytes=ROWS * 1024, page_bits=20)
        emb.from_dense(weight)
        us, faulted = per_step(lambda ids: emb(ids).backward(w), batches)
        print(f"mlkv  {us:6.0f} µs a step, {faulted:5.0f} page faults a step")
        emb.close()
    table = torch.nn.Embedding(ROWS, DIM, sparse=True)
    with torch.no_grad():
        table.weight.copy_(weight)
    opt = torch.optim.SGD(table.parameters(), lr=0.01)

    def torch_step(ids):
        table(ids).backward(w)
        opt.step()
        opt.zero_grad()

    us, faulted = per_step(torch_step, batches)
    print(f"torch {us:6.0f} µs a step, {faulted:5.0f} page faults a step")


if __name__ == "__main__":
    main()
