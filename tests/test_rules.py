"""The sparse optimizer update rules (mlkv/engine/_rule_kernels.py) against independent references.

sgd, adagrad and adam run side by side with torch: a ``torch.nn.Embedding(sparse=True)`` and
the matching torch optimizer take random steps whose batches repeat ids, while the kernels
update numpy copies of the table and a state table from the same gradients, coalesced here
with numpy. Every row (touched or not) must agree after every step. rowwise_adagrad, which
torch does not ship, is checked against a slow per-row Python reference of its formula.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from mlkv.engine import _rule_kernels as RK
from mlkv.engine import updates
from mlkv.engine._rule_kernels import apply, hyper_vector, state_dim

# torch.optim.Adagrad builds sparse tensors without invariant checks and warns about it
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

NUM, DIM, BATCH, STEPS = 40, 12, 48, 30
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}
#: largest difference from torch per (rule, dtype, check), printed by test_report_max_diffs
MAX_DIFFS: dict[tuple[str, str, str], float] = {}


def coalesce(ids, grad_rows):
    """Unique ids and the sum of their gradient rows (as torch's ``Tensor.coalesce``)."""
    unique, inverse = np.unique(ids, return_inverse=True)
    summed = np.zeros((unique.shape[0], grad_rows.shape[1]), dtype=grad_rows.dtype)
    np.add.at(summed, inverse, grad_rows)
    return unique, summed


def random_batch(rng, dtype, num=NUM, dim=DIM):
    """Ids with repeats (at least 8 duplicates) and random loss weights."""
    ids = rng.integers(0, num, size=BATCH)
    ids[:8] = ids[8:16]
    return ids, rng.standard_normal((BATCH, dim)).astype(dtype)


def torch_state(opt, weight, rule):
    """torch's state of ``weight`` in our layout, as float32 (zeros before the first step)."""
    st = opt.state[weight]
    if rule == "sgd" or not st:
        return np.zeros((weight.shape[0], state_dim(rule, weight.shape[1])), np.float32)
    if rule == "adagrad":
        return st["sum"].numpy().astype(np.float32)
    return np.concatenate([st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()],
                          axis=1).astype(np.float32)


def apply_coalesced(rule, table, state, ids, weights, hyper):
    """Our side of one step: coalesce the batch's gradient, update the rows it touches."""
    unique, grads = coalesce(ids, weights)       # d loss / d emb(ids) is `weights`
    rows, row_state = table[unique], state[unique]
    apply(rule, rows, row_state, grads, hyper)
    table[unique], state[unique] = rows, row_state


def run_with_torch(rule, dtype, make_optimizer, hyper_kwargs, seed):
    """Two checks per step, both over every row of the table and the state:

    - one step: from torch's table and state before the step, our step lands on torch's
      (within ``atol``: a few float32 ulps; float64 tables keep float32 state, so 1e-7);
    - free run: our table, updated by our steps only since the start, stays within
      ``atol + atol * |w|`` of torch's (rounding differences add up over the steps).
    """
    atol = 1e-6 if dtype == np.float32 else 1e-12 if rule == "sgd" else 1e-7
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((NUM, DIM)).astype(dtype)
    emb = torch.nn.Embedding(NUM, DIM, sparse=True, dtype=TORCH_DTYPES[dtype])
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(table))
    opt = make_optimizer([emb.weight])
    state = np.zeros((NUM, state_dim(rule, DIM)), dtype=np.float32)
    worst = {"one step": 0.0, "free run": 0.0}
    for step in range(1, STEPS + 1):
        ids, weights = random_batch(rng, dtype)
        one_table = emb.weight.detach().numpy().copy()
        one_state = torch_state(opt, emb.weight, rule)
        opt.zero_grad()
        (emb(torch.from_numpy(ids)) * torch.from_numpy(weights)).sum().backward()
        opt.step()
        hyper = hyper_vector(rule, step=step, **hyper_kwargs)
        apply_coalesced(rule, one_table, one_state, ids, weights, hyper)
        apply_coalesced(rule, table, state, ids, weights, hyper)

        expected, expected_state = emb.weight.detach().numpy(), torch_state(opt, emb.weight, rule)
        for check, (ours, our_state, rtol) in {"one step": (one_table, one_state, 0),
                                               "free run": (table, state, atol)}.items():
            worst[check] = max(worst[check], float(np.abs(ours - expected).max()))
            np.testing.assert_allclose(ours, expected, rtol=rtol, atol=atol,
                                       err_msg=f"{rule} {check}, step {step}")
            np.testing.assert_allclose(our_state, expected_state, rtol=1e-6, atol=1e-6,
                                       err_msg=f"{rule} state {check}, step {step}")
    assert table.dtype == dtype and (state != 0).any() == (rule != "sgd")
    for check, diff in worst.items():
        key = (rule, np.dtype(dtype).name, check)
        MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), diff)


DTYPES = [np.float32, np.float64]
CASES = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.05), {"lr": 0.05}),
    "sgd-lr0": (lambda p: torch.optim.SGD(p, lr=0.0), {"lr": 0.0}),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=0.1), {"lr": 0.1}),
    "adagrad-decay": (lambda p: torch.optim.Adagrad(p, lr=0.3, lr_decay=0.05, eps=1e-6),
                      {"lr": 0.3, "lr_decay": 0.05, "eps": 1e-6}),
    "adam": (lambda p: torch.optim.SparseAdam(p, lr=0.01), {"lr": 0.01}),
    "adam-betas": (lambda p: torch.optim.SparseAdam(p, lr=0.03, betas=(0.5, 0.9), eps=1e-4),
                   {"lr": 0.03, "betas": (0.5, 0.9), "eps": 1e-4}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_rule_matches_torch(case, dtype, seed):
    make_optimizer, hyper_kwargs = CASES[case]
    run_with_torch(case.split("-")[0], dtype, make_optimizer, hyper_kwargs, seed)


def test_report_max_diffs():
    """Runs after the comparisons above: prints the largest differences (pytest -s)."""
    for (rule, dtype, check), diff in sorted(MAX_DIFFS.items()):
        print(f"max |ours - torch| {rule:8s} {dtype} {check}: {diff:.3g}")


@pytest.mark.parametrize("rule, optimizer", [("adagrad", torch.optim.Adagrad),
                                             ("adam", torch.optim.SparseAdam)])
def test_default_eps_is_torchs(rule, optimizer):
    torch_eps = optimizer([torch.nn.Parameter(torch.zeros(1))]).defaults["eps"]
    assert hyper_vector(rule, lr=0.1)[RK.H_EPS] == torch_eps


# ========================================================================= rowwise adagrad
def rowwise_reference(table, acc, unique, grads, lr, eps, weight_decay, lr_decay, step):
    """The formula of the module docstring, one scalar at a time in float64 (the accumulator
    is stored rounded to float32, as the kernels store it)."""
    clr = lr / (1 + (step - 1) * lr_decay)
    for r, g_row in zip(unique, grads, strict=True):
        g = [float(x) + weight_decay * float(w) for x, w in zip(g_row, table[r], strict=True)]
        new_acc = float(acc[r, 0]) + sum(x * x for x in g) / len(g)
        acc[r, 0] = np.float32(new_acc)
        std = math.sqrt(new_acc) + eps
        for j, x in enumerate(g):
            table[r, j] = float(table[r, j]) - clr * x / std


@pytest.mark.parametrize("dtype, atol", [(np.float32, 2e-6), (np.float64, 1e-12)],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("weight_decay, lr_decay, eps, dim",
                         [(0.0, 0.0, None, DIM), (0.01, 0.02, 1e-3, DIM), (0.1, 0.0, None, 1)])
def test_rowwise_adagrad_matches_reference(dtype, atol, weight_decay, lr_decay, eps, dim):
    rng = np.random.default_rng(7)
    table = rng.standard_normal((NUM, dim)).astype(dtype)
    ref = table.astype(np.float64)
    acc, ref_acc = np.zeros((NUM, 1), np.float32), np.zeros((NUM, 1), np.float32)
    for step in range(1, STEPS + 1):
        ids, weights = random_batch(rng, dtype, dim=dim)
        unique, grads = coalesce(ids, weights)
        hyper = hyper_vector("rowwise_adagrad", lr=0.2, eps=eps, weight_decay=weight_decay,
                             lr_decay=lr_decay, step=step)
        rows, row_acc = table[unique], acc[unique]
        apply("rowwise_adagrad", rows, row_acc, grads, hyper)
        table[unique], acc[unique] = rows, row_acc
        rowwise_reference(ref, ref_acc, unique, grads, 0.2, hyper[RK.H_EPS], weight_decay,
                          lr_decay, step)
        np.testing.assert_allclose(table, ref, rtol=0, atol=atol, err_msg=f"step {step}")
        np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)
    assert (acc > 0).any()


def test_rowwise_adagrad_moves_rows_along_their_gradient():
    values = np.ones((2, 4), np.float32)
    grads = np.array([[1, -1, 2, 0], [0, 0, 0, 0]], np.float32)
    acc = np.zeros((2, 1), np.float32)
    apply("rowwise_adagrad", values, acc, grads, hyper_vector("rowwise_adagrad", lr=0.5))
    assert acc[0, 0] == pytest.approx((1 + 1 + 4) / 4) and acc[1, 0] == 0
    np.testing.assert_allclose(values[0], 1 - 0.5 * grads[0] / math.sqrt(1.5), rtol=1e-6)
    assert (values[1] == 1).all()


def test_state_dim():
    assert [state_dim(r, 5) for r in ("sgd", "adagrad", "rowwise_adagrad", "adam")] == [
        0, 5, 1, 10]
    assert set(RK.RULES) == {"sgd", "adagrad", "rowwise_adagrad", "adam"}


def test_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; "
            "import mlkv.engine._rule_kernels as R; print(R.state_dim('adam', 3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "6"


# ================================================================================= errors
def arrays(rule="adagrad", n=3, dim=4, dtype=np.float32):
    return (np.zeros((n, dim), dtype), np.zeros((n, state_dim(rule, dim)), np.float32),
            np.ones((n, dim), dtype), hyper_vector(rule, lr=0.1))


def test_unknown_rule_names_valid_rules():
    for call in (lambda: state_dim("adamw", 4), lambda: hyper_vector("adamw", 0.1),
                 lambda: apply("adamw", *arrays())):
        with pytest.raises(ValueError, match=r"'adamw'.*sgd, adagrad, rowwise_adagrad, adam"):
            call()


@pytest.mark.parametrize("position, name, bad_dtype", [
    (0, "values", np.int32), (0, "values", np.float16), (1, "state", np.float64),
    (2, "grads", np.int64), (3, "hyper", np.float32)])
def test_wrong_dtype(position, name, bad_dtype):
    args = list(arrays())
    args[position] = args[position].astype(bad_dtype)
    with pytest.raises(TypeError, match=rf"{name} must be .*got dtype {np.dtype(bad_dtype)}"):
        apply("adagrad", *args)


def test_wrong_shapes_and_layouts():
    values, state, grads, hyper = arrays("adam")
    with pytest.raises(ValueError, match=r"state of rule 'adam' must have shape \(3, 8\)"):
        apply("adam", values, state[:, :4].copy(), grads, hyper)
    with pytest.raises(ValueError, match=r"state of rule 'sgd' must have shape \(3, 0\)"):
        apply("sgd", values, state, grads, hyper)
    with pytest.raises(ValueError, match="grads must have the shape of values"):
        apply("adam", values, state, grads[:2].copy(), hyper)
    with pytest.raises(ValueError, match="values must be 2-D"):
        apply("adam", values[0].copy(), state, grads, hyper)
    with pytest.raises(ValueError, match=r"hyper must have shape \(7,\)"):
        apply("adam", values, state, grads, hyper[:3].copy())
    with pytest.raises(ValueError, match="values must be C-contiguous"):
        apply("adam", np.zeros((4, 3), np.float32).T, state, grads, hyper)
    with pytest.raises(TypeError, match="grads must be a numpy array"):
        apply("adam", values, state, grads.tolist(), hyper)
    values.flags.writeable = False
    with pytest.raises(ValueError, match="values must be writeable"):
        apply("adam", values, state, grads, hyper)
    assert (state == 0).all()          # nothing ran


@pytest.mark.parametrize("rule, optimizer", [("sgd", torch.optim.SGD),
                                             ("adagrad", torch.optim.Adagrad)])
def test_weight_decay_refused_as_torch_refuses_it(rule, optimizer):
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = optimizer(emb.parameters(), lr=0.1, weight_decay=0.01)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError):       # torch's own refusal, so the claim stays true
        opt.step()
    with pytest.raises(ValueError, match=r"refuses weight_decay with sparse gradients"):
        hyper_vector(rule, lr=0.1, weight_decay=0.01)


@pytest.mark.parametrize("rule, kwargs, message", [
    ("adam", {"weight_decay": 0.1}, "SparseAdam has no weight_decay"),
    ("adam", {"lr_decay": 0.1}, "lr_decay is an option of adagrad"),
    ("sgd", {"lr_decay": 0.1}, "lr_decay is an option of adagrad"),
    ("sgd", {"eps": 1e-8}, "eps is not an option of sgd"),
    ("adam", {"lr": 0.0}, "invalid learning rate"),
    ("adagrad", {"lr": -0.1}, "invalid learning rate"),
    ("adam", {"eps": 0.0}, "invalid eps"),
    ("rowwise_adagrad", {"eps": -1.0}, "invalid eps"),
    ("adam", {"betas": (0.9, 1.0)}, r"betas must be in \[0, 1\)"),
    ("rowwise_adagrad", {"weight_decay": -1.0}, "must be >= 0"),
    ("adagrad", {"lr": float("nan")}, "lr must be finite"),
    ("adagrad", {"step": 0}, "step must be an integer >= 1"),
    ("adagrad", {"step": 1.5}, "step must be an integer >= 1"),
])
def test_invalid_hyper_parameters(rule, kwargs, message):
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        hyper_vector(rule, **kwargs)


def test_hyper_vector_layout():
    h = hyper_vector("adam", lr=0.02, eps=1e-7, betas=(0.8, 0.95), step=12)
    assert h.dtype == np.float64 and h.shape == (RK.N_HYPER,)
    assert (h[RK.H_LR], h[RK.H_EPS], h[RK.H_BETA1], h[RK.H_BETA2], h[RK.H_STEP]) == (
        0.02, 1e-7, 0.8, 0.95, 12)
    h = hyper_vector("rowwise_adagrad", lr=0.1, weight_decay=0.3, lr_decay=0.2)
    assert (h[RK.H_WEIGHT_DECAY], h[RK.H_LR_DECAY], h[RK.H_STEP]) == (0.3, 0.2, 1)


# ============================================================== the store's update, grouped
@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam"])
def test_store_update_sums_repeated_keys_like_coalescing_first(tmp_path, rule):
    """Store.update with repeated keys (the kernel sums each key's positions as it updates
    the key) equals coalescing first and updating distinct rows, in a batch larger than the
    buffer pool (the kernel stops, rows are evicted and brought back, and it resumes)."""
    import mlkv
    rng = np.random.default_rng(11)
    n_keys, dim = 3000, 16
    values = rng.standard_normal((n_keys, dim)).astype(np.float32)
    stores = [mlkv.open(tmp_path / name, dim=dim, state_dim=state_dim(rule, dim),
                        page_bits=12, memory_bytes=16 << 12) for name in ("grouped", "one")]
    for store in stores:
        store.put(np.arange(n_keys), values)
    state = np.zeros((n_keys, state_dim(rule, dim)), np.float32)
    table = values.copy()
    for step in range(1, 4):
        ids = rng.integers(0, n_keys, 20_000)                  # about 6.7 positions a key
        weights = rng.standard_normal((ids.shape[0], dim)).astype(np.float32)
        hyper = hyper_vector(rule, lr=0.1, step=step)
        stores[0].update(ids, weights, rule, hyper)
        unique, grads = coalesce(ids, weights)
        stores[1].update(unique, grads, rule, hyper, unique=True)
        rows, row_state = table[unique], state[unique]
        apply(rule, rows, row_state, grads, hyper)
        table[unique], state[unique] = rows, row_state
    for store in stores:
        np.testing.assert_allclose(store.get(np.arange(n_keys)), table, rtol=0, atol=1e-5)
        store.close()


def test_store_update_applies_sgd_rows_one_by_one_in_position_order(tmp_path):
    """sgd is linear: Store.update adds every gradient row of a repeated key in turn, as
    torch's SGD adds an uncoalesced sparse gradient; bit for bit the rule applied to one
    position at a time, in a batch larger than the buffer pool."""
    import mlkv
    rng = np.random.default_rng(12)
    n_keys, dim = 3000, 16
    values = rng.standard_normal((n_keys, dim)).astype(np.float32)
    store = mlkv.open(tmp_path / "s", dim=dim, page_bits=12, memory_bytes=16 << 12)
    store.put(np.arange(n_keys), values)
    table, no_state = values.copy(), np.zeros((1, 0), np.float32)
    for step in range(1, 3):
        ids = rng.integers(0, n_keys, 20_000)
        weights = rng.standard_normal((ids.shape[0], dim)).astype(np.float32)
        hyper = hyper_vector("sgd", lr=0.1, step=step)
        store.update(ids, weights, "sgd", hyper)
        for i, key in enumerate(ids.tolist()):
            row = table[key:key + 1].copy()
            apply("sgd", row, no_state, weights[i:i + 1], hyper)
            table[key] = row[0]
    np.testing.assert_array_equal(store.get(np.arange(n_keys)), table)
    store.close()


@pytest.mark.parametrize("between", ["nothing", "delete", "put", "compact", "other update",
                                     "ids changed"])
def test_update_after_a_read_of_the_same_keys(tmp_path, between):
    """A training step reads its keys, then updates them: the update may take the read's
    addresses instead of probing the index, but never once a row may have moved or gone, nor
    for a position whose key is not the one read there ("ids changed": the caller changes a
    third of its ids array in place between the read and the update). Checked against a dict
    model, with each kind of operation run in between."""
    import mlkv
    rng = np.random.default_rng(5)
    dim, n_keys = 8, 2000
    store = mlkv.open(tmp_path / "s", dim=dim, state_dim=state_dim("adagrad", dim), page_bits=12,
                      memory_bytes=16 << 12, segment_bits=14, init="zeros",
                      auto_compact=None)
    model = {k: v for k, v in enumerate(rng.standard_normal((n_keys, dim)).astype(np.float32))}
    state = {k: np.zeros(dim, np.float32) for k in model}
    store.put(np.arange(n_keys), np.stack([model[k] for k in range(n_keys)]))
    for step in range(1, 6):
        ids = rng.integers(0, n_keys + 50, 600)            # some ids new: created by the read
        np.testing.assert_array_equal(
            store.get_or_init(ids), np.stack([model.get(k, np.zeros(dim, np.float32))
                                              for k in ids.tolist()]))
        for k in ids.tolist():
            model.setdefault(k, np.zeros(dim, np.float32))
            state.setdefault(k, np.zeros(dim, np.float32))
        if between == "delete":
            gone = ids[:100]
            store.delete(gone)
            for k in gone.tolist():       # an update recreates a deleted row from init
                model[k], state[k] = np.zeros(dim, np.float32), np.zeros(dim, np.float32)
        elif between == "put":
            fresh = rng.standard_normal((100, dim)).astype(np.float32)
            store.put(ids[:100], fresh)
            for k, row in zip(ids[:100].tolist(), fresh):
                model[k], state[k] = row, np.zeros(dim, np.float32)
        elif between == "compact":
            assert store.compact()["rows_moved"] > 0
        elif between == "other update":          # moves rows to the tail, as a pipeline does
            other = rng.integers(0, n_keys, 300)
            g = rng.standard_normal((300, dim)).astype(np.float32)
            sgd = hyper_vector("sgd", lr=0.1)
            store.update(other, g, "sgd", sgd)
            for k, row in zip(other.tolist(), g):         # one position at a time, as sgd
                r = model[k][None].copy()
                apply("sgd", r, np.zeros((1, 0), np.float32), row[None], sgd)
                model[k] = r[0]
        elif between == "ids changed":
            ids[::3] = rng.integers(0, n_keys, ids[::3].shape[0])
        grads = rng.standard_normal((ids.shape[0], dim)).astype(np.float32)
        hyper = hyper_vector("adagrad", lr=0.1, step=step)
        # the hints are offered exactly when nothing that moves rows ran in between
        hinted = updates._read_hints(store.engine, ids)[1].shape[0] > 0
        assert hinted == (between in ("nothing", "other update", "ids changed"))
        store.update(ids, grads, "adagrad", hyper)
        unique, summed = coalesce(ids, grads)
        rows = np.stack([model[k] for k in unique.tolist()])
        rule_state = np.stack([state[k] for k in unique.tolist()])
        apply("adagrad", rows, rule_state, summed, hyper)
        for i, k in enumerate(unique.tolist()):
            model[k], state[k] = rows[i], rule_state[i]
    keys = np.array(sorted(model), dtype=np.int64)
    np.testing.assert_allclose(store.get(keys), np.stack([model[k] for k in keys.tolist()]),
                               rtol=1e-6, atol=1e-6)
    store.close()
