"""KVEmbedding and KVEmbeddingBag: shapes, ids, padding, bags against torch, fused and deferred
updates, state_dict by reference, dense round trips, the pipeline hooks and bad input."""

from __future__ import annotations

import gc
import io
import os
import shutil
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlkv
from mlkv.frameworks.torch import KVEmbedding, KVEmbeddingBag

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
DIM = 6
SMALL = dict(memory_bytes=16 << 12, page_bits=12)        # 16 pages of 4 KiB


@pytest.fixture
def make(tmp_path):
    """Modules on stores under tmp_path, closed at the end of the test."""
    made = []

    def make(cls=KVEmbedding, name="emb", dim=DIM, **kw):
        kw = {**SMALL, **kw} if "store" not in kw else kw
        module = cls(dim, tmp_path / name, **kw)
        made.append(module)
        return module
    yield make
    for module in made:
        module.close()


def roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---- lookups -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 3, 4), (0,), (3, 0)])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_shapes_and_id_dtypes(make, shape, id_dtype):
    emb = make()
    ids = torch.randint(-50, 50, shape, dtype=id_dtype)
    out = emb(ids)
    assert out.shape == (*shape, DIM) and out.dtype == torch.float32
    assert out.requires_grad and out.device == ids.device
    flat = ids.reshape(-1).long().numpy()
    np.testing.assert_array_equal(out.detach().reshape(-1, DIM).numpy(),
                                  emb.store.get(flat).reshape(-1, DIM))


def test_float64_and_no_grad(make):
    emb = make(dtype=torch.float64)
    assert emb.dtype == torch.float64 and emb.store.dtype == np.float64
    out = emb(torch.tensor([1, 2]))
    assert out.dtype == torch.float64
    with torch.no_grad():
        assert not emb(torch.tensor([1, 2])).requires_grad
    assert make(name="e2", dtype="float64").dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_rows_come_back_on_the_ids_device(make):
    emb = make(optimizer="adagrad")
    ids = torch.tensor([[1, 2], [2, 3]], device="cuda")
    out = emb(ids)
    assert out.device == ids.device
    before = emb.store.get([1, 2, 3])
    out.sum().backward()
    assert not np.array_equal(before, emb.store.get([1, 2, 3]))


def test_unseen_ids_are_deterministic_per_seed(make):
    ids = torch.tensor([10**12, -3, 7, 7])
    a, b, c = make(name="a", seed=5), make(name="b", seed=5), make(name="c", seed=6)
    ra = a(ids).detach()
    assert torch.equal(ra, b(ids.flip(0)).detach().flip(0))       # order does not matter
    assert not torch.equal(ra, c(ids).detach())
    assert torch.equal(ra[2], ra[3]) and (ra.abs() <= 0.01).all()
    assert len(a.store) == 3
    assert make(name="z", init="zeros")(ids).abs().sum() == 0
    assert make(name="n", init="normal", init_scale=2.0)(ids).abs().max() > 0.05


def test_padding_idx_reads_zeros_and_is_never_updated(make):
    emb = make(optimizer="adam", lr=0.1, padding_idx=0)
    ids = torch.tensor([[0, 1, 0], [2, 0, 1]])
    out = emb(ids)
    assert out[0, 0].abs().sum() == 0 and out[1, 1].abs().sum() == 0
    (out ** 2 + out).sum().backward()
    assert np.array_equal(emb.store.get([0]), np.zeros((1, DIM), np.float32))
    assert emb.store.stats()["updates"] == 3           # the positions of ids 1, 2 and 1 only
    # a non-zero padding row (from a dense table) is read as it is and still not trained
    emb.from_dense(torch.ones(3, DIM))
    out = emb(torch.tensor([0, 0, 1]))
    assert torch.equal(out[0], torch.ones(DIM))
    out.sum().backward()
    assert np.array_equal(emb.store.get([0]), np.ones((1, DIM), np.float32))
    assert not np.array_equal(emb.store.get([1]), np.ones((1, DIM), np.float32))


def test_negative_padding_idx_is_an_id(make):
    emb = make(padding_idx=-1)
    assert emb(torch.tensor([-1])).abs().sum() == 0
    assert emb(torch.tensor([1])).abs().sum() > 0


# ---- bags against nn.EmbeddingBag ----------------------------------------------------------
BAG_CASES = [
    dict(mode="sum"), dict(mode="mean"), dict(mode="sum", psw=True),
    dict(mode="mean", padding_idx=3), dict(mode="sum", psw=True, padding_idx=3),
    dict(mode="sum", include_last_offset=True), dict(mode="mean", two_d=True),
    dict(mode="sum", two_d=True, psw=True, padding_idx=3),
]


@pytest.mark.parametrize("case", BAG_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_bags_match_nn_embedding_bag(make, case):
    """Same rows: same outputs, same gradient (sgd with lr 1 applies exactly -grad), same
    gradient of per_sample_weights."""
    num, mode = 12, case["mode"]
    pad = case.get("padding_idx")
    weight = torch.randn(num, DIM, generator=torch.Generator().manual_seed(1))
    ref = nn.EmbeddingBag(num, DIM, mode=mode, padding_idx=pad,
                          include_last_offset=case.get("include_last_offset", False))
    with torch.no_grad():
        ref.weight.copy_(weight)
    bag = make(KVEmbeddingBag, mode=mode, padding_idx=pad, optimizer="sgd", lr=1.0,
               include_last_offset=case.get("include_last_offset", False))
    bag.from_dense(weight)
    if case.get("two_d"):
        input, offsets = torch.tensor([[1, 3, 3], [4, 4, 4], [3, 3, 3], [0, 11, 1]]), None
    else:
        input = torch.tensor([1, 3, 3, 5, 3, 7, 7, 7, 11, 0, 2])
        offsets = torch.tensor([0, 3, 3, 5, 6, 11] if case.get("include_last_offset")
                               else [0, 3, 3, 5, 6, 11])
    psw = torch.rand(input.shape, generator=torch.Generator().manual_seed(2)) if \
        case.get("psw") else None
    ref_psw = None if psw is None else psw.clone().requires_grad_()
    our_psw = None if psw is None else psw.clone().requires_grad_()
    w = torch.randn(DIM)
    ref_out = ref(input, offsets, per_sample_weights=ref_psw)
    our_out = bag(input.int(), None if offsets is None else offsets.int(),
                  per_sample_weights=our_psw)
    torch.testing.assert_close(our_out, ref_out, rtol=0, atol=1e-6)
    (torch.sin(ref_out) * w).sum().backward()
    (torch.sin(our_out) * w).sum().backward()
    expected = weight - ref.weight.grad
    torch.testing.assert_close(bag.to_dense(num), expected, rtol=0, atol=1e-6)
    if psw is not None:
        torch.testing.assert_close(our_psw.grad, ref_psw.grad, rtol=0, atol=1e-6)


def test_bag_int32_offsets_and_empty_bags(make):
    bag = make(KVEmbeddingBag, mode="mean")
    out = bag(torch.tensor([4, 5], dtype=torch.int32), torch.tensor([0, 0, 2, 2]))
    assert out.shape == (4, DIM)
    assert out[0].abs().sum() == 0 and out[2].abs().sum() == 0 and out[3].abs().sum() == 0


# ---- fused and deferred updates ------------------------------------------------------------
def test_assigned_learning_rate_takes_effect_at_the_next_step(make):
    """``emb.lr = ...`` between steps (a schedule) changes the next update, as a torch
    optimizer's ``param_groups[0]["lr"]`` does: lr 0 leaves the rows, lr back moves them."""
    emb = make(optimizer="sgd", lr=0.1)
    ids = torch.tensor([1, 2, 2])
    (emb(ids) ** 2).sum().backward()
    before = emb.store.get([1, 2])
    emb.lr = 0.0
    (emb(ids) ** 2).sum().backward()
    np.testing.assert_array_equal(emb.store.get([1, 2]), before)
    emb.lr = 0.1
    rows = torch.from_numpy(before)
    (emb(ids) ** 2).sum().backward()
    want = rows - 0.1 * torch.stack([2 * rows[0], 4 * rows[1]])   # d/dx of x**2, id 2 twice
    np.testing.assert_allclose(emb.store.get([1, 2]), want.numpy(), rtol=1e-6, atol=1e-7)


def test_deferred_steps_sum_backwards_like_one_batch(make):
    """fused=False: two backwards and one step() equal one fused backward of both batches."""
    fused, deferred = make(name="f", optimizer="adam", lr=0.1), make(
        name="d", optimizer="adam", lr=0.1, fused=False)
    a, b = torch.tensor([1, 2, 2, 3]), torch.tensor([3, 4, 1])
    (fused(torch.cat([a, b])) ** 2).sum().backward()
    (deferred(a) ** 2).sum().backward()
    (deferred(b) ** 2).sum().backward()
    keys = [1, 2, 3, 4]
    before = deferred.store.get(keys)
    assert deferred._step == 0 and fused._step == 1
    deferred.step()
    assert deferred._step == 1
    np.testing.assert_allclose(deferred.store.get(keys), fused.store.get(keys), rtol=0,
                               atol=1e-7)
    assert not np.array_equal(before, deferred.store.get(keys))
    after = deferred.store.get(keys)
    deferred.step()                                  # nothing pending: nothing happens
    assert deferred._step == 1 and np.array_equal(after, deferred.store.get(keys))


def test_zero_grad_drops_the_pending_gradient(make):
    emb = make(optimizer="adagrad", fused=False)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.store.get([1, 2])
    emb.zero_grad()
    emb.step()
    assert emb._step == 0 and np.array_equal(before, emb.store.get([1, 2]))


def test_fused_counts_one_step_per_backward(make):
    emb = make(optimizer="adagrad", lr=0.1, lr_decay=0.5)
    for _ in range(3):
        emb(torch.tensor([1, 1, 2])).sum().backward()
    # one step per backward; ``updates`` counts the gradient rows, a row per position
    assert emb._step == 3 and emb.store.stats()["updates"] == 9


def test_rest_of_the_model_trains_with_a_torch_optimizer(make):
    emb = make(optimizer="sgd", lr=0.1)
    head = nn.Linear(DIM, 1)
    assert list(emb.parameters()) == []
    model = nn.Sequential(emb, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w0, r0 = head.weight.detach().clone(), emb.store.get_or_init([3])
    model(torch.tensor([3, 3])).sum().backward()
    opt.step()
    assert not torch.equal(w0, head.weight) and not np.array_equal(r0, emb.store.get([3]))


# ---- pipeline hooks ------------------------------------------------------------------------
def test_read_gate_and_update_sink(make):
    emb = make(optimizer="adam")
    calls = []
    emb._read_gate = lambda module, ids: calls.append(("gate", module, ids.copy()))
    emb._update_sink = lambda module, ids, grads, step: calls.append(
        ("sink", module, ids.copy(), grads.copy(), step))
    before = emb.store.get_or_init([2, 5, 9])
    calls.clear()
    emb(torch.tensor([[9, 2], [2, 5]])).sum().backward()
    assert [c[0] for c in calls] == ["gate", "sink"] and calls[0][1] is emb
    np.testing.assert_array_equal(calls[0][2], [9, 2, 5])     # distinct, first seen first
    _, _, ids, grads, step = calls[1]
    np.testing.assert_array_equal(ids, [9, 2, 5])
    np.testing.assert_array_equal(grads, [[1] * DIM, [2] * DIM, [1] * DIM])
    assert step == 1 and grads.dtype == np.float32
    assert np.array_equal(before, emb.store.get([2, 5, 9]))      # the sink got it instead
    thread = threading.Thread(target=emb._apply_update, args=(ids, grads, step))
    thread.start()
    thread.join()
    assert not np.array_equal(before, emb.store.get([2, 5, 9]))


def test_gate_runs_before_the_store_read(make):
    emb = make()
    seen = []
    emb._read_gate = lambda module, ids: seen.append(bool(module.store.contains(ids).any()))
    emb(torch.tensor([40, 41]))
    assert seen == [False]


# ---- state_dict by reference ---------------------------------------------------------------
PROBE = torch.arange(0, 300)


def train(emb, steps, seed):
    """``steps`` training steps; every row of PROBE exists afterwards, so that reading PROBE
    writes nothing."""
    emb.store.get_or_init(PROBE.numpy())
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 300, (64,), generator=g)
        (emb(ids) ** 2 - emb(ids).detach()).sum().backward()


def test_state_dict_holds_a_reference_only(make):
    emb = make(optimizer="adam", lr=0.01, betas=(0.8, 0.9))
    train(emb, 3, 0)
    assert emb.store.changed
    sd = roundtrip(nn.Sequential(emb).state_dict())      # torch.load(weights_only=True)
    (key,) = sd
    assert key == "0._extra_state"
    state = sd[key]
    assert set(state) == {"format", "path", "content_id", "dim", "dtype", "optimizer",
                          "options", "step"}
    assert state["path"] == os.path.abspath(emb.store.path) and state["step"] == 3
    assert state["content_id"] == emb.store.content_id == emb.store.checkpoint_id == 1
    assert not emb.store.changed
    assert state["dim"] == DIM and state["dtype"] == "float32" and state["optimizer"] == "adam"
    assert state["options"] == {"lr": 0.01, "betas": (0.8, 0.9), "weight_decay": 0.0,
                                "lr_decay": 0.0}               # eps: the rule's default
    assert all(isinstance(v, (str, int, dict)) for v in state.values())
    emb.eps = 1e-6
    again = emb.state_dict()["_extra_state"]
    assert again["options"]["eps"] == 1e-6
    assert again["content_id"] == 1 and emb.store.checkpoint_id == 1   # no write: no checkpoint


def test_load_discards_later_training(make):
    """Saved, trained further without a checkpoint, loaded: the outputs are the saved ones."""
    emb = make(optimizer="adam", lr=0.05)
    train(emb, 4, 0)
    sd = roundtrip(emb.state_dict())
    saved = emb(PROBE).detach()
    train(emb, 4, 1)
    assert not torch.equal(saved, emb(PROBE).detach())
    emb.lr = 0.5
    emb.load_state_dict(sd)
    assert not emb.store.changed and emb.lr == 0.05 and emb._step == 4
    assert torch.equal(saved, emb(PROBE).detach())
    # and training on from there repeats itself
    train(emb, 2, 2)
    after = emb(PROBE).detach()
    emb.load_state_dict(sd)
    train(emb, 2, 2)
    assert torch.equal(after, emb(PROBE).detach())


def test_load_discards_later_training_of_a_temporary_store():
    emb = KVEmbedding(DIM, optimizer="adagrad", lr=0.1)
    path = emb.store.path
    train(emb, 3, 0)
    sd = emb.state_dict()
    saved = emb(PROBE).detach()
    train(emb, 3, 1)
    emb.load_state_dict(sd)
    assert emb.store.path == path and torch.equal(saved, emb(PROBE).detach())
    emb.close()
    assert not os.path.exists(path)


def test_fresh_module_on_the_same_path(tmp_path):
    """Saved, trained further, closed (a checkpoint of changed rows); the directory restored
    from a copy made after the save: a fresh module on the same path loads the state."""
    path, backup = tmp_path / "emb", tmp_path / "backup"
    emb = KVEmbedding(DIM, path, optimizer="adagrad", lr=0.1, **SMALL)
    train(emb, 5, 0)
    sd = roundtrip(emb.state_dict())
    saved = emb(PROBE).detach()
    shutil.copytree(path, backup)
    train(emb, 5, 1)
    emb.close()
    shutil.rmtree(path)
    shutil.copytree(backup, path)
    with KVEmbedding(DIM, path, optimizer="adagrad", lr=0.5) as fresh:
        fresh.load_state_dict(sd)
        assert fresh.lr == 0.1 and fresh._step == 5      # options come from the state
        assert torch.equal(saved, fresh(PROBE).detach())


def test_checkpoints_without_row_changes_keep_the_state(tmp_path):
    """Reads, checkpoints and compactions that change no row keep ``content_id``: the state
    still loads, in the module and in a fresh one after the store is reopened."""
    path = tmp_path / "emb"
    emb = KVEmbedding(DIM, path, optimizer="adam", segment_bits=15, auto_compact=None, **SMALL)
    emb.store.get_or_init(np.arange(300, 3000))      # more rows than memory: updates copy
    for seed in range(3):                            # rows to the tail, leaving dead records
        train(emb, 5, seed)
    sd = roundtrip(emb.state_dict())
    saved = emb(PROBE).detach()
    ref = sd["_extra_state"]["content_id"]
    emb.store.checkpoint()
    assert emb.store.compact(progress=False)["rows_moved"] > 0
    emb(PROBE)
    assert emb.store.checkpoint_id > ref == emb.store.content_id and not emb.store.changed
    emb.load_state_dict(sd)
    assert torch.equal(saved, emb(PROBE).detach())
    emb.close()                                      # a checkpoint, still no row change
    with mlkv.open(path) as store:
        assert store.stats()["content_id"] == ref
    with KVEmbedding(DIM, path, optimizer="adam") as fresh:
        fresh.load_state_dict(sd)
        assert torch.equal(saved, fresh(PROBE).detach())


def test_load_after_changed_rows_were_checkpointed_raises(tmp_path):
    path = tmp_path / "emb"
    emb = KVEmbedding(DIM, path, optimizer="sgd", **SMALL)
    train(emb, 2, 0)
    sd = emb.state_dict()
    train(emb, 2, 1)
    emb.store.checkpoint()                     # the only checkpoint now holds other rows
    with pytest.raises(mlkv.MlkvError, match="moved past the saved state: the state names "
                       "content_id 1, the store's last checkpoint has content_id 2"):
        emb.load_state_dict(sd)
    train(emb, 1, 2)
    with pytest.raises(mlkv.MlkvError, match="content_id 2 and has writes since"):
        emb.load_state_dict(sd)
    emb.close()
    with KVEmbedding(DIM, path, optimizer="sgd") as fresh:
        with pytest.raises(mlkv.MlkvError, match="content_id 1, .* content_id 3"):
            fresh.load_state_dict(sd)


def test_load_switches_to_the_saved_store(tmp_path):
    path = tmp_path / "emb"
    emb = KVEmbedding(DIM, path, optimizer="sgd", **SMALL)
    train(emb, 3, 0)
    sd = roundtrip(emb.state_dict())
    saved = emb(PROBE).detach()
    emb.close()
    with KVEmbedding(DIM, optimizer="sgd") as other:             # a temporary store
        tmp = other.store.path
        other.load_state_dict(sd)
        assert os.path.samefile(other.store.path, path) and not os.path.exists(tmp)
        assert torch.equal(saved, other(PROBE).detach())
    with KVEmbedding(DIM, tmp_path / "own", optimizer="sgd") as other:
        own = other.store
        rows = own.get_or_init([7])
        other.load_state_dict(sd)
        assert os.path.samefile(other.store.path, path) and own is not other.store
        assert torch.equal(saved, other(PROBE).detach())
    with mlkv.open(tmp_path / "own") as store:         # closed with a checkpoint, unlocked
        assert np.array_equal(store.get([7]), rows)


def test_load_from_elsewhere_needs_the_saved_rows(tmp_path):
    """The saved path decides: a copy at the module's own path is not used in its place."""
    path, copy = tmp_path / "emb", tmp_path / "copy"
    emb = KVEmbedding(DIM, path, optimizer="adam", **SMALL)
    train(emb, 3, 0)
    sd = roundtrip(emb.state_dict())
    shutil.copytree(path, copy)
    train(emb, 3, 1)
    emb.close()                                  # the original moves on
    with KVEmbedding(DIM, copy, optimizer="adam") as fresh:
        with pytest.raises(mlkv.MlkvError, match="moved past the saved state"):
            fresh.load_state_dict(sd)
        assert os.path.samefile(fresh.store.path, copy)          # kept its own store
        fresh(PROBE)
    shutil.rmtree(path)
    with KVEmbedding(DIM, copy, optimizer="adam") as fresh:
        with pytest.raises(mlkv.MlkvError, match="does not exist"):
            fresh.load_state_dict(sd)
        assert not os.path.exists(path)


def test_load_checks_the_state(make):
    emb = make(optimizer="adagrad")
    sd = emb.state_dict()
    with pytest.raises(mlkv.SettingsMismatchError, match="optimizer='adagrad'"):
        make(name="o", optimizer="adam").load_state_dict(sd)
    with pytest.raises(mlkv.SettingsMismatchError, match="dim=6"):
        make(name="d", dim=4, optimizer="adagrad").load_state_dict(sd)
    with pytest.raises(mlkv.SettingsMismatchError, match="dtype='float32'"):
        make(name="t", optimizer="adagrad", dtype=torch.float64).load_state_dict(sd)
    with pytest.raises(ValueError, match="not a state of an mlkv KVEmbedding"):
        emb.load_state_dict({"_extra_state": {"format": "other"}})
    bad = {**sd["_extra_state"], "options": {"lr": "fast"}}
    with pytest.raises(ValueError, match="field 'options'"):
        emb.load_state_dict({"_extra_state": bad})
    with pytest.raises(RuntimeError, match="Missing key"):
        emb.load_state_dict({})


def test_wrapped_store_is_not_reverted_or_closed(tmp_path):
    store = mlkv.open(tmp_path / "s", dim=DIM, state_dim=DIM)
    emb = KVEmbedding(DIM, optimizer="adagrad", store=store)
    assert emb.store is store
    train(emb, 2, 0)
    sd = emb.state_dict()
    train(emb, 2, 1)
    with pytest.raises(mlkv.MlkvError, match="did not open it"):
        emb.load_state_dict(sd)
    emb.close()
    assert len(store) > 0 and store.changed      # still open: its owner closes it
    store.close(checkpoint=False)
    with mlkv.open(tmp_path / "s") as store:     # back at the saved checkpoint
        emb = KVEmbedding(DIM, optimizer="adagrad", store=store)
        emb.load_state_dict(sd)
        assert emb.store is store


# ---- lifetime ------------------------------------------------------------------------------
def test_temporary_store_is_removed_at_close_and_gc():
    emb = KVEmbedding(DIM)
    path = emb.store.path
    emb(torch.tensor([1]))
    emb.close()
    assert not os.path.exists(path)
    emb.close()                                   # idempotent
    with pytest.raises(mlkv.ClosedStoreError):
        emb(torch.tensor([1]))
    emb = KVEmbedding(DIM)
    path = emb.store.path
    del emb
    gc.collect()
    assert not os.path.exists(path)


def test_owned_store_is_closed_durably_and_unlocked(tmp_path):
    with KVEmbedding(DIM, tmp_path / "e", optimizer="adagrad") as emb:
        emb(torch.tensor([1, 2])).sum().backward()
        rows = emb.store.get([1, 2])
    with mlkv.open(tmp_path / "e") as store:
        assert np.array_equal(store.get([1, 2]), rows)


# ---- dense tables --------------------------------------------------------------------------
def test_dense_round_trip_with_nn_embedding(make):
    dense = nn.Embedding(20, DIM)
    emb = make()
    emb.from_dense(dense)
    torch.testing.assert_close(emb.to_dense(), dense.weight.detach(), rtol=0, atol=0)
    ids = torch.tensor([[3, 19], [0, 3]])
    assert torch.equal(emb(ids), dense(ids))
    back = nn.Embedding.from_pretrained(emb.to_dense(), freeze=False)
    assert torch.equal(back(ids), dense(ids))
    emb.from_dense(np.zeros((5, DIM), np.float64))            # arrays too; state reset
    assert emb.to_dense(5).abs().sum() == 0


def test_to_dense_absent_rows_are_zeros(make):
    emb = make()
    emb(torch.tensor([2, 5, -4]))
    dense = emb.to_dense()
    assert dense.shape == (6, DIM)
    assert dense[[0, 1, 3, 4]].abs().sum() == 0 and dense[[2, 5]].abs().sum() > 0
    assert emb.to_dense(3).shape == (3, DIM) and emb.to_dense(0).shape == (0, DIM)
    assert make(name="empty").to_dense().shape == (0, DIM)


def test_from_dense_resets_state(make):
    emb = make(optimizer="adagrad", lr=1.0)
    emb.from_dense(torch.zeros(4, DIM))
    emb(torch.tensor([1])).sum().backward()          # s = 1: a step of -1
    emb.from_dense(torch.zeros(4, DIM))
    emb(torch.tensor([1])).sum().backward()          # reset s: again exactly -1
    np.testing.assert_allclose(emb.store.get([1]), -np.ones((1, DIM)), rtol=1e-6)


# ---- bad input -----------------------------------------------------------------------------
def test_bad_ids(make):
    emb = make()
    with pytest.raises(TypeError, match="LongTensor or IntTensor"):
        emb(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="LongTensor or IntTensor"):
        emb(torch.tensor([1, 2], dtype=torch.int16))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        emb([1, 2])
    assert len(emb.store) == 0


def test_bad_bag_input(make):
    bag = make(KVEmbeddingBag, mode="mean")
    with pytest.raises(NotImplementedError, match="only supported with mode='sum'"):
        bag(torch.tensor([[1, 2]]), per_sample_weights=torch.ones(1, 2))
    with pytest.raises(ValueError, match="offsets must be None"):
        bag(torch.tensor([[1, 2]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="offsets must be a 1-D tensor"):
        bag(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        bag(torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="offsets"):
        bag(torch.tensor([1, 2]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="input's shape"):
        make(KVEmbeddingBag, name="s", mode="sum")(torch.tensor([[1, 2]]),
                                                   per_sample_weights=torch.ones(2))
    assert len(bag.store) == 0
    with pytest.raises(ValueError, match="mode must be 'sum' or 'mean'.*max"):
        KVEmbeddingBag(DIM, mode="max")


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer="rmsprop"), "unknown update rule 'rmsprop'"),
    (dict(optimizer="sgd", weight_decay=0.1), "refuses weight_decay"),
    (dict(optimizer="adagrad", weight_decay=0.1), "refuses weight_decay"),
    (dict(optimizer="adam", weight_decay=0.1), "no weight_decay"),
    (dict(optimizer="adam", lr=0.0), "invalid learning rate"),
    (dict(optimizer="adam", betas=(1.0, 0.9)), "betas"),
    (dict(optimizer="sgd", lr_decay=0.1), "lr_decay"),
    (dict(optimizer="adagrad", lr=-1.0), "invalid learning rate"),
    (dict(dim=0), "dim must be an int >= 1"),
    (dict(padding_idx=1.5), "padding_idx"),
])
def test_bad_options(tmp_path, kwargs, match):
    kwargs = {"dim": DIM, **kwargs}
    with pytest.raises(ValueError, match=match):
        KVEmbedding(path=tmp_path / "e", **kwargs)
    assert not os.path.exists(tmp_path / "e")


def test_bad_store_settings(tmp_path):
    with pytest.raises(TypeError, match="float32 or float64"):
        KVEmbedding(DIM, tmp_path / "h", dtype=torch.float16)
    KVEmbedding(DIM, tmp_path / "e", optimizer="sgd").close()
    with pytest.raises(mlkv.SettingsMismatchError, match="optimizer 'adam' keeps 12"):
        KVEmbedding(DIM, tmp_path / "e", optimizer="adam")
    with pytest.raises(mlkv.SettingsMismatchError, match="dim"):
        KVEmbedding(DIM + 1, tmp_path / "e")
    with mlkv.open(tmp_path / "e") as store:
        with pytest.raises(ValueError, match="either store= or path="):
            KVEmbedding(DIM, tmp_path / "e", store=store)
        with pytest.raises(mlkv.SettingsMismatchError, match="state_dim >= 6"):
            KVEmbedding(DIM, optimizer="adagrad", store=store)
    with mlkv.open(tmp_path / "f16", dim=DIM, dtype="float16") as store:
        with pytest.raises(TypeError, match="float16"):
            KVEmbedding(DIM, store=store)


def test_uses_f_embedding_numbers(make):
    """The lookup is F.embedding on the rows: identical outputs and gradients."""
    emb = make(optimizer="sgd", lr=1.0)
    weight = torch.randn(10, DIM)
    emb.from_dense(weight)
    ids = torch.tensor([[1, 1, 4], [9, 1, 0]])
    ref_w = weight.clone().requires_grad_()
    (F.embedding(ids, ref_w) ** 3).sum().backward()
    (emb(ids) ** 3).sum().backward()
    # sgd adds a repeated id's rows in turn, not their sum first: equal to float rounding
    torch.testing.assert_close(emb.to_dense(10), weight - ref_w.grad, rtol=1e-6, atol=1e-6)


def test_the_shared_autograd_anchor_never_gets_a_gradient(make):
    """Every lookup hands one shared empty leaf to its autograd node; no backward (fused,
    deferred, bag) may give it a gradient, or it would grow and leak between modules."""
    from mlkv.frameworks.torch._autograd import _ANCHOR
    emb, bag = make(name="a"), make(KVEmbeddingBag, name="b", mode="sum", fused=False)
    for _ in range(3):
        (emb(torch.tensor([[1, 2], [2, 3]])).sum() + bag(torch.tensor([[1, 5]])).sum()).backward()
        bag.step()
    assert _ANCHOR.grad is None and _ANCHOR.shape == (0,)
    assert list(emb.parameters()) == [] and list(bag.parameters()) == []


def test_lookups_use_torchs_apply_inside_torch_func_transforms():
    """Lookups call torch's C++ ``apply`` directly, skipping ``Function.apply``'s Python
    wrapper; inside a torch.func transform they must go through the wrapper, which handles
    (or refuses, with its own message) Functions there."""
    from mlkv.frameworks.torch import _autograd as A
    chosen = []

    def f(x):
        chosen.append((A._apply(A.Lookup, A._LOOKUP_APPLY),
                       A._apply(A.StoreRows, A._STORE_ROWS_APPLY)))
        return x.sum()

    torch.func.grad(f)(torch.ones(2))
    assert chosen == [(A.Lookup.apply, A.StoreRows.apply)]
    assert A._apply(A.Lookup, A._LOOKUP_APPLY) is A._LOOKUP_APPLY
    assert A._apply(A.StoreRows, A._STORE_ROWS_APPLY) is A._STORE_ROWS_APPLY


def test_bag_with_padding_matches_torch_whether_or_not_the_batch_holds_the_padding_id(make):
    """The bag always hands torch a padding row (torch's kernel sums in another order without
    one); a read-only store that lacks the padding row still serves bags without it."""
    bag = make(KVEmbeddingBag, name="b", mode="sum", padding_idx=0)
    weight = torch.randn(6, DIM)
    bag.from_dense(weight)
    ref = nn.EmbeddingBag(6, DIM, mode="sum", padding_idx=0)
    with torch.no_grad():
        ref.weight.copy_(weight)
    psw = torch.rand(2, 3) + 0.5
    for ids in (torch.tensor([[1, 2, 3], [4, 5, 1]]), torch.tensor([[1, 0, 3], [4, 5, 0]])):
        with torch.no_grad():
            assert torch.equal(bag(ids, per_sample_weights=psw), ref(ids, per_sample_weights=psw))
    # a store written by a KVEmbedding that never saw the padding id, opened read-only
    emb = make(name="e", padding_idx=0)
    emb(torch.tensor([1, 2])).sum().backward()
    path = emb.store.path
    emb.close()
    store = mlkv.open(path, readonly=True)
    assert 0 not in store
    ro_bag = KVEmbeddingBag(DIM, store=store, mode="sum", padding_idx=0)
    with torch.no_grad():
        got = ro_bag(torch.tensor([[1, 2]]))
    np.testing.assert_allclose(got.numpy()[0], store.get([1, 2]).sum(0), rtol=1e-6)
    store.close()
