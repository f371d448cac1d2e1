"""KVEmbedding / KVEmbeddingBag train to torch's numbers, with most rows on disk.

The same model is built twice: once with a sparse ``nn.Embedding`` / ``nn.EmbeddingBag`` and
``torch.optim.SGD`` / ``Adagrad`` / ``SparseAdam``, once with the mlkv module (same initial
rows through ``from_dense``, same optimizer options). A dense head, trained by
``torch.optim.SGD`` on both sides, makes the loss nonlinear in the rows and shows the module
composing with a torch optimizer. 200 random steps whose batches repeat ids (within a batch
and across batches, through a hot set) run against a store whose buffer pool holds 16 pages
of 4 KiB, a small share of the table, so rows are read back from disk on most steps. Every
step's loss and, at the end, every row must agree within 1e-5. ``rowwise_adagrad``, which
torch does not ship, runs against a slow per-row Python reference of its usual definition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlkv.frameworks.torch import KVEmbedding, KVEmbeddingBag

# torch.optim.Adagrad builds sparse tensors without invariant checks and warns about it
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

NUM, DIM, STEPS, BATCH, HOT = 20_000, 16, 200, 128, 400
PAGE_BITS, PAGES = 12, 16
TOL = 1e-5
# adagrad's eps is raised from torch's 1e-10: torch's float32 sqrt is off by up to an ulp (on
# about 1 value in 6, measured against a correctly rounded sqrt), and a sample fitted to within
# a few ulps has a gradient that is rounding noise. With eps=1e-10, a row's first step turns
# that noise into a step of up to lr: in the bag case the two sides differed by 2.4e-5 on 3
# rows of 20,000 (one sample's rows). With eps=1e-6 a tiny gradient gives a tiny step.
OPTIONS = {"sgd": dict(lr=0.5), "adagrad": dict(lr=0.05, lr_decay=0.01, eps=1e-6),
           "adam": dict(lr=0.01, betas=(0.8, 0.95))}
TORCH_OPT = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
             "adam": torch.optim.SparseAdam}
BAG_MODE = {"sgd": "mean", "adagrad": "sum", "adam": "mean"}
PADDING = 7
#: (optimizer, kind) -> (max row difference, max loss difference); printed at the end
AGREEMENT: dict[tuple[str, str], tuple[float, float]] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def draw_ids(rng, shape):
    """Ids of a batch: half from a hot set (rows come back step after step), repeats forced."""
    ids = np.where(rng.random(shape) < 0.5, rng.integers(0, HOT, shape),
                   rng.integers(0, NUM, shape))
    flat = ids.reshape(-1)
    k = flat.shape[0] // 8
    flat[:k] = flat[k: 2 * k]
    flat[rng.random(flat.shape[0]) < 0.05] = PADDING
    return torch.from_numpy(ids)


def batches(seed, kind, mode):
    """``(args, target)`` per step: lookups of 4 ids per sample, or bags of 0..6 ids."""
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        y = torch.from_numpy(rng.standard_normal(BATCH).astype(np.float32))
        if kind == "embedding":
            yield (draw_ids(rng, (BATCH, 4)),), y
            continue
        lengths = rng.integers(0, 7, BATCH)
        ids = draw_ids(rng, (int(lengths.sum()),))
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
        psw = (torch.from_numpy(rng.uniform(0.5, 1.5, ids.shape[0]).astype(np.float32))
               if mode == "sum" else None)
        yield (ids, offsets, psw), y


def loss_of(out, head, y):
    return ((head(torch.tanh(out)).reshape(y.shape[0], -1).mean(1) - y) ** 2).mean()


def run_pair(tmp_path, optimizer, kind):
    torch.manual_seed(0)
    weight = torch.randn(NUM, DIM) * 0.3
    head = nn.Linear(DIM, 1)
    mode = BAG_MODE[optimizer]
    if kind == "embedding":
        ref = nn.Embedding(NUM, DIM, sparse=True, padding_idx=PADDING)
        ours = KVEmbedding(DIM, tmp_path / "emb", optimizer=optimizer, padding_idx=PADDING,
                           memory_bytes=PAGES << PAGE_BITS, page_bits=PAGE_BITS,
                           **OPTIONS[optimizer])
    else:
        ref = nn.EmbeddingBag(NUM, DIM, mode=mode, sparse=True, padding_idx=PADDING)
        ours = KVEmbeddingBag(DIM, tmp_path / "bag", mode=mode, optimizer=optimizer,
                              padding_idx=PADDING, memory_bytes=PAGES << PAGE_BITS,
                              page_bits=PAGE_BITS, **OPTIONS[optimizer])
    with torch.no_grad():
        ref.weight.copy_(weight)
    ours.from_dense(weight)
    ref_head, our_head = head, nn.Linear(DIM, 1)
    our_head.load_state_dict(ref_head.state_dict())
    ref_opt = TORCH_OPT[optimizer](ref.parameters(), **OPTIONS[optimizer])
    ref_head_opt = torch.optim.SGD(ref_head.parameters(), lr=0.1)
    our_head_opt = torch.optim.SGD(our_head.parameters(), lr=0.1)
    max_loss_diff = 0.0
    for args, y in batches(1, kind, mode):
        ref_loss = loss_of(ref(*args), ref_head, y)
        ref_opt.zero_grad()
        ref_head_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        ref_head_opt.step()
        our_loss = loss_of(ours(*args), our_head, y)
        our_head_opt.zero_grad()
        our_loss.backward()                        # the table's step happens here
        our_head_opt.step()
        max_loss_diff = max(max_loss_diff, abs(ref_loss.item() - our_loss.item()))
        assert abs(ref_loss.item() - our_loss.item()) <= TOL
    stats = ours.store.stats()
    assert stats["misses"] > 0 and stats["buffer_pool_bytes"] <= PAGES << PAGE_BITS
    rows = ours.to_dense(NUM)
    max_row_diff = (rows - ref.weight.detach()).abs().max().item()
    assert torch.equal(rows[PADDING], weight[PADDING])        # never updated
    assert (rows != weight).any(dim=1).sum() > 1000           # many rows did move
    AGREEMENT[optimizer, kind] = (max_row_diff, max_loss_diff)
    assert max_row_diff <= TOL
    assert ours._step == STEPS
    ours.close()


@pytest.mark.parametrize("kind", ["embedding", "bag"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_same_numbers_as_torch(tmp_path, optimizer, kind):
    run_pair(tmp_path, optimizer, kind)


def test_rowwise_adagrad_against_reference(tmp_path):
    """fbgemm / torchrec's row-wise Adagrad: one accumulator per row, the mean of the squared
    (L2-decayed) gradient; checked row by row in plain Python over 50 steps."""
    lr, eps, wd, lr_decay = 0.05, 1e-10, 0.01, 0.02
    torch.manual_seed(0)
    table = (torch.randn(NUM, DIM) * 0.3).numpy()
    acc = np.zeros(NUM, dtype=np.float32)
    head = nn.Linear(DIM, 1)
    our_head = nn.Linear(DIM, 1)
    our_head.load_state_dict(head.state_dict())
    ours = KVEmbedding(DIM, tmp_path / "rw", optimizer="rowwise_adagrad", lr=lr, eps=eps,
                       weight_decay=wd, lr_decay=lr_decay, memory_bytes=PAGES << PAGE_BITS,
                       page_bits=PAGE_BITS)
    ours.from_dense(table)
    head_opt = torch.optim.SGD(head.parameters(), lr=0.1)
    our_head_opt = torch.optim.SGD(our_head.parameters(), lr=0.1)
    rng = np.random.default_rng(3)
    max_loss_diff = 0.0
    for t in range(1, 51):
        ids = draw_ids(rng, (BATCH, 4))
        y = torch.from_numpy(rng.standard_normal(BATCH).astype(np.float32))
        dense = torch.from_numpy(table.copy()).requires_grad_()
        ref_loss = loss_of(F.embedding(ids, dense), head, y)
        head_opt.zero_grad()
        ref_loss.backward()
        head_opt.step()
        grad = dense.grad.numpy()
        clr = lr / (1 + (t - 1) * lr_decay)
        for i in np.unique(ids.numpy()):
            g = grad[i] + np.float32(wd) * table[i]
            acc[i] += np.float32(np.mean(g.astype(np.float64) ** 2))
            table[i] -= np.float32(clr) * (g / (np.sqrt(acc[i]) + np.float32(eps)))
        our_loss = loss_of(ours(ids), our_head, y)
        our_head_opt.zero_grad()
        our_loss.backward()
        our_head_opt.step()
        max_loss_diff = max(max_loss_diff, abs(ref_loss.item() - our_loss.item()))
        assert abs(ref_loss.item() - our_loss.item()) <= TOL
    assert ours.store.stats()["misses"] > 0
    diff = (ours.to_dense(NUM) - torch.from_numpy(table)).abs().max().item()
    AGREEMENT["rowwise_adagrad", "embedding"] = (diff, max_loss_diff)
    assert diff <= TOL
    ours.close()


def test_report_agreement():
    """Print the largest differences from torch (run with -s to see them)."""
    for (optimizer, kind), (rows, loss) in sorted(AGREEMENT.items()):
        print(f"{optimizer:16s} {kind:9s} max |row diff| {rows:.3g}  max |loss diff| {loss:.3g}")
