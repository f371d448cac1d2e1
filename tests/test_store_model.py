"""The store against a plain dict model, driven by a Hypothesis state machine.

Every example opens a store with a buffer pool of only 4-8 pages of 4 KiB, so that eviction,
reads from disk and copies to the tail happen on most steps, then runs puts, gets, get_or_init,
deletes, lookaheads, checkpoints and reopens (with the same or other ``memory_bytes`` and
``policy``) against ``model: dict[int, numpy row]``. After every step the store must hold
exactly the model: same length, same keys, same rows from ``items()``, and ordered log markers.

Batches of keys and values come from a numpy generator seeded by Hypothesis (drawing hundreds
of keys element by element would be slow); the seed, the batch size and the run's settings
still shrink.

One machine per dtype, so that a bug in one does not hide the others: float32 (the default
dtype) runs ``MLKV_HYPOTHESIS_EXAMPLES`` examples (default 300), float64 and float16 a third of
that each, and a fourth machine adds a read-only store opened beside the writer, which must
show the last checkpoint. Steps per example: ``MLKV_HYPOTHESIS_STEPS`` (default 30). For a
longer local run::

    MLKV_HYPOTHESIS_EXAMPLES=5000 python -m pytest tests/test_store_model.py

The shrunk failures the machines found are kept below as plain tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import mlkv
from mlkv.engine import _rule_kernels as RULES

EXAMPLES = int(os.environ.get("MLKV_HYPOTHESIS_EXAMPLES", "300"))
STEPS = int(os.environ.get("MLKV_HYPOTHESIS_STEPS", "30"))

PAGE_BITS = 12
PAGE_BYTES = 1 << PAGE_BITS
# dims per dtype: a 4 KiB page holds from 1 to ~170 records (see test_dims_span_page_fill)
DIMS = {
    "float32": (1, 3, 16, 100, 500, 1000),
    "float16": (1, 7, 200, 2000),
    "float64": (1, 5, 50, 500),
}
I64 = np.iinfo(np.int64)
SPECIAL_KEYS = np.array([I64.min, I64.max, I64.min + 1, I64.max - 1, -1, 0, 1, 2**62 + 7,
                         -(2**40) - 3, 2**32, -(2**31), 2**31 - 1], dtype=np.int64)
ABSENT_KEYS = np.array([2**61 + 11, -(2**61) - 13, 2**45 + 1], dtype=np.int64)  # never in a pool
POLICIES = ("fifo", "second_chance", "frequency")


def records_per_page(dtype: str, dim: int, state_dim: int) -> int:
    """Independent of mlkv: header + key + values, state 4-aligned, record 8-aligned."""
    state_off = -(-(16 + dim * np.dtype(dtype).itemsize) // 4) * 4
    record = -(-(state_off + 4 * state_dim) // 8) * 8
    return PAGE_BYTES // record


def test_dims_span_page_fill():
    """The model's dims cover pages holding one record up to ~100+ records, for each dtype."""
    for dtype, dims in DIMS.items():
        fill = [records_per_page(dtype, d, 0) for d in dims]
        assert min(fill) == 1 and max(fill) >= 100, (dtype, fill)
        assert all(records_per_page(dtype, d, 3) >= 1 for d in dims)


class StoreVsDict(RuleBasedStateMachine):
    """``mlkv.Store`` against ``dict[int, np.ndarray]`` (rows already cast to the store dtype)."""

    def __init__(self):
        super().__init__()
        self.tmp = None
        self.store = None
        self.twin = None
        self.model: dict[int, np.ndarray] = {}
        self.state: dict[int, np.ndarray] = {}       # optimizer state, where not zeros
        self.update_step = 0
        self.last_read_keys = None
        self.init_rows: dict[int, np.ndarray] = {}   # rows get_or_init created, by key
        self.durable: dict[int, np.ndarray] = {}     # the model at the last checkpoint
        self.steps = 0
        self.busy_steps = 0
        self.last_activity = None

    # ---- set-up ----------------------------------------------------------------------------
    DTYPES = tuple(sorted(DIMS))

    @initialize(
        data=st.data(),
        state_dim=st.sampled_from([0, 3, 40]),   # 40: adagrad and adam for dims up to 20
        frames=st.integers(4, 8),
        policy=st.sampled_from(POLICIES),
        init=st.sampled_from(["uniform", "normal", "zeros"]),
        init_scale=st.sampled_from([0.01, 1.0]),
        seed=st.integers(0, 2**31 - 1),
        pool_factor=st.sampled_from([1.0, 2.0, 4.0]),
        io_threads=st.sampled_from([None, 1, 3]),
        direct_io=st.sampled_from([None, False]),
        segment_bits=st.sampled_from([None, 13, 14]),
        auto_compact=st.sampled_from([None, 0.3, 0.5]),
    )
    def open_store(self, data, state_dim, frames, policy, init, init_scale, seed, pool_factor,
                   io_threads, direct_io, segment_bits, auto_compact):
        dtype = data.draw(st.sampled_from(self.DTYPES), label="dtype")
        dim = data.draw(st.sampled_from(DIMS[dtype]), label="dim")
        if records_per_page(dtype, dim, state_dim) < 1:     # the widest rows: less state
            state_dim = 3
        self.tmp = tempfile.mkdtemp(prefix="mlkv-model-")
        self.path = os.path.join(self.tmp, "store")
        self.dtype, self.dim, self.state_dim = np.dtype(dtype), dim, state_dim
        self.init, self.init_scale, self.seed = init, init_scale, seed
        self.memory_bytes, self.policy = frames * PAGE_BYTES, policy
        # per open, not remembered; small segments let compaction free files
        self.io = dict(io_threads=io_threads, direct_io=direct_io, auto_compact=auto_compact)
        self.store = mlkv.open(self.path, dim=dim, dtype=dtype, state_dim=state_dim,
                               page_bits=PAGE_BITS, segment_bits=segment_bits,
                               memory_bytes=self.memory_bytes,
                               policy=policy, init=init, init_scale=init_scale, seed=seed,
                               **self.io)
        rpp = records_per_page(dtype, dim, state_dim)
        assert self.store.layout.records_per_page == rpp
        self.capacity = rpp * frames
        # A pool of keys 1x-4x what the buffer pool holds, plus extreme int64 keys.
        n = max(8, int(self.capacity * pool_factor))
        self.pool = np.unique(np.concatenate(
            [SPECIAL_KEYS, np.arange(-(n // 3), n - n // 3, dtype=np.int64) * 3 + 1]))
        assert not np.isin(ABSENT_KEYS, self.pool).any()
        self.max_batch = max(4, int(self.capacity * 1.5))
        # Start from a share of the pool written, so that most runs are past the buffer pool
        # from their first step.
        fill = data.draw(st.sampled_from([0.0, 0.5, 1.0]), label="prefill")
        rng = self.rng(seed)
        keys = rng.permutation(self.pool)[:int(self.pool.shape[0] * fill)]
        values = rng.standard_normal((keys.shape[0], dim)).astype(dtype)
        self.store.put(keys, values)
        self.model.update(zip(keys.tolist(), values))
        note(f"dtype={dtype} dim={dim} state_dim={state_dim} frames={frames} "
             f"records/page={rpp} pool={self.pool.shape[0]} policy={policy} path={self.path}")

    def teardown(self):
        if self.steps:
            share = self.busy_steps / self.steps
            event(f"steps reading disk or evicting: {int(share * 4) * 25}%+")
        try:
            for s in (self.twin, self.store):
                if s is not None:
                    s.close()
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- helpers ---------------------------------------------------------------------------
    def rng(self, seed):
        return np.random.default_rng(seed)

    def batch_size(self, low):
        """Small batches, and batches of up to 1.5x what the buffer pool holds."""
        large = st.integers(max(low, self.capacity // 2), self.max_batch)
        return st.one_of(st.integers(low, 8), st.integers(low, max(low, self.capacity // 2)),
                         large, large)

    def pool_keys(self, data, label="keys"):
        """A batch of pool keys (present or not), sometimes with many repeats."""
        n = data.draw(self.batch_size(0), label=f"{label} n")
        rng = self.rng(data.draw(st.integers(0, 2**32 - 1), label=f"{label} seed"))
        if data.draw(st.booleans(), label=f"{label} repeats"):
            sub = rng.choice(self.pool, size=max(1, n // 3 + 1))
            return rng.choice(sub, size=n)
        return rng.choice(self.pool, size=n)

    def present_keys(self, data, label="keys"):
        if not self.model:
            return np.empty(0, dtype=np.int64)
        n = data.draw(self.batch_size(1), label=f"{label} n")
        rng = self.rng(data.draw(st.integers(0, 2**32 - 1), label=f"{label} seed"))
        return rng.choice(np.fromiter(self.model, dtype=np.int64), size=n)

    def absent_keys(self, rng, n):
        free = self.pool[~np.isin(self.pool, np.fromiter(self.model, dtype=np.int64,
                                                            count=len(self.model)))]
        return rng.choice(np.concatenate([free, ABSENT_KEYS]), size=n)

    def expected_rows(self, keys, model=None):
        model = self.model if model is None else model
        out = np.empty((keys.shape[0], self.dim), dtype=self.dtype)
        for i, k in enumerate(keys.tolist()):
            out[i] = model[k]
        return out

    # ---- rules -----------------------------------------------------------------------------
    @rule(data=st.data())
    def put(self, data):
        kind = data.draw(st.sampled_from(["native", "float64", "float32", "int", "list",
                                          "special"]), label="values kind")
        keys = self.pool_keys(data)
        rng = self.rng(data.draw(st.integers(0, 2**32 - 1), label="values seed"))
        n = keys.shape[0]
        if kind == "int":
            values = rng.integers(-1000, 1000, size=(n, self.dim))
        elif kind == "special":      # nan, infinities, -0.0, the extremes of the dtype
            info = np.finfo(self.dtype)
            specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, info.max, info.min,
                                 info.tiny, info.smallest_subnormal], dtype=self.dtype)
            values = rng.choice(specials, size=(n, self.dim))
        else:
            values = rng.standard_normal((n, self.dim)) * 10.0
            if kind in ("native", "float32"):
                values = values.astype(self.dtype if kind == "native" else np.float32)
        cast = np.asarray(values).astype(self.dtype)
        if kind == "list" and n:     # (put([], []) is tested in test_bad_input.py)
            keys_arg, values_arg = keys.tolist(), values.tolist()
        else:
            keys_arg, values_arg = keys, values
        self.store.put(keys_arg, values_arg)
        for i, k in enumerate(keys.tolist()):     # last write wins; state reset to zeros
            self.model[k] = cast[i].copy()
            self.state.pop(k, None)

    @rule(data=st.data())
    def get_present(self, data):
        keys = self.present_keys(data)          # empty when the model is
        got = self.store.get(keys)
        assert got.dtype == self.dtype and got.shape == (keys.shape[0], self.dim)
        np.testing.assert_array_equal(got, self.expected_rows(keys))

    @rule(data=st.data())
    def get_with_missing(self, data):
        keys = self.present_keys(data)
        rng = self.rng(data.draw(st.integers(0, 2**32 - 1), label="missing seed"))
        n_missing = data.draw(st.integers(1, 15), label="n missing")
        missing = self.absent_keys(rng, n_missing)
        batch = np.concatenate([keys, missing])
        rng.shuffle(batch)
        with pytest.raises(KeyError) as info:
            self.store.get(batch)
        message = str(info.value.args[0])
        numbers = [int(x) for x in re.findall(r"-?\d+", message)]
        missing_set = set(missing.tolist())
        named = [k for k in numbers if k in missing_set]
        assert 1 <= len(named) <= 10 + 2, message     # (+2: the counts may be keys too)
        assert len(set(named)) >= min(len(missing_set), 10) or len(named) >= 10, message
        assert n_missing in numbers or len(missing_set) in numbers, message

    @rule(data=st.data())
    def get_or_init(self, data):
        keys = self.pool_keys(data)
        if data.draw(st.booleans(), label="add present"):
            keys = np.concatenate([keys, self.present_keys(data, "present")])
        was_present = np.array([k in self.model for k in keys.tolist()], dtype=bool)
        before = {k: self.model[k] for k in keys[was_present].tolist()}
        got = self.store.get_or_init(keys)
        self.last_read_keys = keys
        assert got.dtype == self.dtype and got.shape == (keys.shape[0], self.dim)
        created = {}
        for i, k in enumerate(keys.tolist()):
            if k in before:
                np.testing.assert_array_equal(got[i], before[k], err_msg=f"key {k}")
            elif k in created:                      # a repeat of a new key: the same row
                np.testing.assert_array_equal(got[i], created[k], err_msg=f"key {k}")
            else:
                created[k] = got[i].copy()
        if not created:
            return
        new_keys = np.fromiter(created, dtype=np.int64, count=len(created))
        new_rows = np.stack([created[k] for k in new_keys.tolist()])
        # The initializer's documented distribution.
        if self.init == "zeros":
            assert not new_rows.any()
        elif self.init == "uniform":
            # (rounding to the store dtype is monotone: the bound is the scale so rounded)
            bound = float(self.dtype.type(self.init_scale))
            assert np.all(np.abs(new_rows.astype(np.float64)) <= bound)
        assert np.all(np.isfinite(new_rows))
        # Deterministic per (key, seed): a key created again (after a delete) gets the same
        # row, and so does a second store with the same settings but another page size,
        # memory budget and policy.
        for k, row in created.items():
            if k in self.init_rows:
                np.testing.assert_array_equal(row, self.init_rows[k], err_msg=f"key {k}")
            self.init_rows[k] = row
        np.testing.assert_array_equal(self.init_twin().get_or_init(new_keys), new_rows)
        if self.init != "zeros" and self.dim >= 3:
            # rows of different keys differ (the key goes into the stream)
            assert np.unique(new_rows, axis=0).shape[0] == new_rows.shape[0]
        self.model.update(created)

    @rule(data=st.data(), as_list=st.booleans())
    def contains(self, data, as_list):
        keys = self.pool_keys(data)
        if as_list:
            got = self.store.contains(keys.tolist())
        else:
            got = self.store.contains(keys)
        assert got.dtype == np.bool_ and got.shape == keys.shape
        expected = np.array([k in self.model for k in keys.tolist()], dtype=bool)
        np.testing.assert_array_equal(got, expected)
        for k in keys[:3].tolist():
            assert (k in self.store) == (k in self.model)

    @rule(data=st.data(), add_present=st.booleans())
    def delete(self, data, add_present):
        keys = self.pool_keys(data)
        if add_present:
            keys = np.concatenate([keys, self.present_keys(data, "present")])
        expected = len(set(keys.tolist()) & self.model.keys())
        assert self.store.delete(keys) == expected
        for k in keys.tolist():
            self.model.pop(k, None)
            self.state.pop(k, None)

    @rule(data=st.data(), rule_name=st.sampled_from(sorted(RULES.RULES)))
    def update(self, data, rule_name):
        """The fused optimizer step against the rule applied to the model's rows and state
        (repeated keys summed first, but sgd's rows applied one by one in position order;
        absent keys created by the initializer first). Sometimes the keys of the last
        get_or_init, as a training step has them: the store may reuse that read's addresses,
        whatever ran in between."""
        keys = self.pool_keys(data)
        if self.last_read_keys is not None and data.draw(st.booleans(), label="last read"):
            keys = self.last_read_keys
        rng = self.rng(data.draw(st.integers(0, 2**32 - 1), label="grads seed"))
        grads = rng.standard_normal((keys.shape[0], self.dim))
        self.update_step += 1
        hyper = RULES.hyper_vector(rule_name, lr=0.1, step=self.update_step)
        need = RULES.state_dim(rule_name, self.dim)
        if self.dtype == np.float16:
            with pytest.raises(TypeError, match="float16"):
                self.store.update(keys, grads, rule_name, hyper)
            return
        if need > self.state_dim:
            with pytest.raises(ValueError, match="state_dim"):
                self.store.update(keys, grads, rule_name, hyper)
            return
        self.store.update(keys, grads.tolist() if keys.shape[0] % 3 == 1 else grads,
                          rule_name, hyper)
        grads = grads.astype(self.dtype)
        if keys.shape[0] and RULES.RULES[rule_name] in RULES.LINEAR_RULES:
            for i in range(keys.shape[0]):
                self.apply_to_model(keys[i:i + 1], grads[i:i + 1], rule_name, hyper)
            return
        unique, inverse = np.unique(keys, return_inverse=True)
        if unique.shape[0] == 0:
            return
        summed = np.zeros((unique.shape[0], self.dim), dtype=self.dtype)
        np.add.at(summed, inverse, grads)
        self.apply_to_model(unique, summed, rule_name, hyper)

    def apply_to_model(self, unique, summed, rule_name, hyper):
        """The model's rows of ``unique`` (created first if absent) after the rule's step."""
        need = RULES.state_dim(rule_name, self.dim)
        absent = unique[[k not in self.model for k in unique.tolist()]]
        if absent.shape[0]:
            self.model.update(zip(absent.tolist(), self.init_twin().get_or_init(absent)))
        rows = self.expected_rows(unique)
        zeros = np.zeros(self.state_dim, dtype=np.float32)
        state = np.stack([self.state.get(k, zeros) for k in unique.tolist()])
        rule_state = np.ascontiguousarray(state[:, :need])
        RULES.apply(rule_name, rows, rule_state, summed, hyper)
        state[:, :need] = rule_state
        for i, k in enumerate(unique.tolist()):
            self.model[k] = rows[i].copy()
            self.state[k] = state[i].copy()

    def init_twin(self):
        """A second store with the same initializer: the rows get_or_init creates."""
        if self.twin is None:
            self.twin = mlkv.open(os.path.join(self.tmp, "twin"), dim=self.dim,
                                  dtype=self.dtype.name, state_dim=self.state_dim,
                                  init=self.init, init_scale=self.init_scale, seed=self.seed,
                                  memory_bytes=4 << 20, policy="fifo")
        return self.twin

    @rule(data=st.data())
    def lookahead(self, data):
        keys = self.pool_keys(data)
        assert self.store.lookahead(keys) is None

    @rule(data=st.data())
    def checkpoint_or_reopen(self, data):
        """A checkpoint; or close + open with no settings (the remembered ones apply) or with
        another memory budget or policy."""
        close = data.draw(st.booleans(), label="close")
        frames = data.draw(st.none() | st.integers(4, 8), label="frames")
        policy = data.draw(st.none() | st.sampled_from(POLICIES), label="policy")
        if not close:
            before = self.store.checkpoint_id
            assert self.store.checkpoint() > before
            self.durable = dict(self.model)
            report = self.store.verify(progress=False)      # every page and index entry
            assert report["ok"] and (report["pages_checked"] > 0 or not self.model), report
            return
        self.store.close()
        self.store = None
        self.durable = dict(self.model)
        memory_bytes = None if frames is None else frames * PAGE_BYTES
        self.io = dict(io_threads=data.draw(st.sampled_from([None, 1, 3]), label="io_threads"),
                       direct_io=data.draw(st.sampled_from([None, False]), label="direct_io"),
                       auto_compact=data.draw(st.sampled_from([None, 0.3, 0.5]),
                                              label="auto_compact"))
        self.store = mlkv.open(self.path, memory_bytes=memory_bytes, policy=policy, **self.io)
        if memory_bytes is not None:
            self.memory_bytes = memory_bytes
        if policy is not None:
            self.policy = policy
        assert self.store.dim == self.dim and self.store.dtype == self.dtype
        assert self.store.state_dim == self.state_dim
        assert self.store.policy == self.policy
        assert self.store.stats()["memory_bytes"] == self.memory_bytes
        self.last_activity = None

    @rule()
    def compact(self):
        """Compaction moves live rows out of the oldest segments and checkpoints."""
        begin = self.store.stats()["addresses"]["begin"]
        result = self.store.compact()
        if result["checkpoint_id"] is None:
            assert result["rows_moved"] == 0 and result["bytes_freed"] == 0
        else:
            assert result["checkpoint_id"] == self.store.checkpoint_id
            assert self.store.stats()["addresses"]["begin"] > begin
            assert result["bytes_freed"] > 0
            self.durable = dict(self.model)

    # ---- invariants ------------------------------------------------------------------------
    @invariant()
    def checkpoints_are_tracked(self):
        """Automatic compaction checkpoints at the end of the write that triggered it."""
        if self.store is None:
            return
        if self.store.checkpoint_id != getattr(self, "_checkpoint_seen", None):
            if getattr(self, "_checkpoint_seen", None) is not None:
                self.durable = dict(self.model)
            self._checkpoint_seen = self.store.checkpoint_id

    @invariant()
    def same_rows(self):
        if self.store is None:
            return
        self.steps += 1
        assert len(self.store) == len(self.model)
        keys = self.store.keys()
        assert keys.dtype == np.int64
        assert sorted(keys.tolist()) == sorted(self.model)
        stats = self.store.stats()
        m = stats["addresses"]
        assert 0 <= m["begin"] <= m["head"] <= m["read_only"] <= m["tail"], m
        assert stats["rows"] == len(self.model)
        assert stats["buffer_pool_bytes"] <= self.memory_bytes, stats
        # a step is "busy" when it read rows from disk, evicted pages or appended to the log
        activity = (stats["disk_reads"], m["head"], m["tail"])
        if self.last_activity is not None and activity != self.last_activity:
            self.busy_steps += 1
        batch = (65536, 97, 1000, 7)[self.steps % 4]
        self.check_items(self.store, self.model, 65 if batch == 7 and len(self.model) > 2000
                         else batch)
        self.last_activity = (self.store.stats()["disk_reads"], m["head"], m["tail"])

    def check_items(self, store, model, batch):
        seen_keys, seen_rows = [], []
        for k, v in store.items(batch=batch):
            assert 0 < k.shape[0] <= batch
            assert k.dtype == np.int64 and v.dtype == self.dtype and v.shape == (k.shape[0],
                                                                                 self.dim)
            seen_keys.append(k)
            seen_rows.append(v)
        if not model:
            assert not seen_keys
            return
        keys = np.concatenate(seen_keys)
        rows = np.concatenate(seen_rows)
        assert np.unique(keys).shape[0] == keys.shape[0], "items() gave a key twice"
        assert sorted(keys.tolist()) == sorted(model)
        np.testing.assert_array_equal(rows, self.expected_rows(keys, model))


class StoreVsDictWithReadonlyView(StoreVsDict):
    """Adds a read-only store opened beside the writer: it must show the last checkpoint.

    DESIGN.md: ``mlkv.open(path, readonly=True)`` opens "beside a writer, at its last
    checkpoint", and a crash returns the store to its last checkpoint; both read what the
    writer has made durable, so writes after a checkpoint must not show through.
    """

    @rule(data=st.data())
    def readonly_view(self, data):
        with mlkv.open(self.path, readonly=True, **self.io) as ro:
            assert ro.readonly and ro.policy == "fifo"
            assert len(ro) == len(self.durable)
            assert sorted(ro.keys().tolist()) == sorted(self.durable)
            self.check_items(ro, self.durable, 65536)
            if self.durable:
                keys = np.fromiter(self.durable, dtype=np.int64, count=len(self.durable))
                rng = self.rng(data.draw(st.integers(0, 2**32 - 1), label="ro seed"))
                keys = rng.choice(keys, size=min(keys.shape[0], self.max_batch))
                np.testing.assert_array_equal(ro.get(keys), self.expected_rows(keys,
                                                                               self.durable))
            with pytest.raises(mlkv.ReadOnlyError):
                ro.put([1], np.zeros((1, self.dim)))
            with pytest.raises(mlkv.ReadOnlyError):
                ro.delete([1])


# ---- many keys: the index grows through several rehashes -------------------------------------

def test_many_keys_against_a_model(tmp_path):
    """A few hundred thousand random int64 keys (the index grows to 2**18+ slots and rehashes
    in chunks), with deletes, against a numpy model; then close and reopen."""
    rng = np.random.default_rng(7)
    n = 150_000
    universe = np.unique(rng.integers(I64.min, I64.max, n, dtype=np.int64, endpoint=True))
    n = universe.shape[0]
    present = np.zeros(n, dtype=bool)
    rows = np.zeros((n, 2), dtype=np.float32)
    path = tmp_path / "s"
    with mlkv.open(path, dim=2, page_bits=PAGE_BITS, memory_bytes=8 * PAGE_BYTES) as s:
        for _ in range(25):
            idx = rng.integers(0, n, 12_000)
            values = rng.standard_normal((idx.shape[0], 2)).astype(np.float32)
            s.put(universe[idx], values)
            # the last repeat of each key wins
            last = idx.shape[0] - 1 - np.unique(idx[::-1], return_index=True)[1]
            rows[idx[last]] = values[last]
            present[idx] = True
            gone = rng.integers(0, n, 2_000)
            assert s.delete(universe[gone]) == np.unique(gone[present[gone]]).shape[0]
            present[gone] = False
            assert len(s) == present.sum()
            ask = rng.choice(np.flatnonzero(present), 4_000)
            np.testing.assert_array_equal(s.get(universe[ask]), rows[ask])
            assert not s.contains(universe[gone]).any()
        assert s.engine.index.capacity >= 1 << 18
    with mlkv.open(path) as s:
        assert len(s) == present.sum()
        np.testing.assert_array_equal(np.sort(s.keys()), universe[present])
        np.testing.assert_array_equal(s.get(universe[present]), rows[present])


# ---- the shrunk examples of StoreVsDictWithReadonlyView, as plain tests -----------------------

def _small_store(path, **kwargs):
    return mlkv.open(path, dim=16, page_bits=PAGE_BITS, memory_bytes=4 * PAGE_BYTES, **kwargs)


def test_readonly_view_after_reopen_and_update(tmp_path):
    """Rows of the page holding the tail at close are part of the checkpoint: updating them
    after a reopen must not change what a reader at that checkpoint sees."""
    path = tmp_path / "s"
    keys = np.arange(60, dtype=np.int64)           # 51 records a page: page 1 holds 9 of them
    with _small_store(path, policy="fifo") as w:
        w.put(keys, np.zeros((60, 16)))
    with mlkv.open(path) as w:
        w.put(keys[51:], np.ones((9, 16)))          # rows in the reloaded tail page
        w.put(np.arange(1000, 1300), np.full((300, 16), 2.0))    # evicts that page
        with mlkv.open(path, readonly=True) as ro:
            np.testing.assert_array_equal(ro.get(keys), np.zeros((60, 16)))
        np.testing.assert_array_equal(w.get(keys[51:]), np.ones((9, 16)))


def test_readonly_view_after_checkpoint_and_update(tmp_path):
    """Rows still mutable at a checkpoint are part of it: updating them in place afterwards
    must not change what a reader at that checkpoint sees."""
    path = tmp_path / "s"
    keys = np.arange(60, dtype=np.int64)
    with _small_store(path, policy="fifo") as w:
        w.put(keys, np.zeros((60, 16)))
        w.checkpoint()
        w.put(keys, np.ones((60, 16)))              # in place: the rows are mutable
        w.put(np.arange(1000, 1300), np.full((300, 16), 2.0))    # evicts their pages
        with mlkv.open(path, readonly=True) as ro:
            np.testing.assert_array_equal(ro.get(keys), np.zeros((60, 16)))


CRASH_CHILD = """
import os, sys
import numpy as np
import mlkv
s = mlkv.open(sys.argv[1], dim=16, page_bits=12, memory_bytes=4 * 4096, policy="fifo")
s.put(np.arange(60), np.zeros((60, 16)))
s.checkpoint()
s.put(np.arange(60), np.ones((60, 16)))                   # updated in place
s.put(np.arange(1000, 1300), np.full((300, 16), 2.0))     # their pages are written out
os._exit(0)                                               # crash: no close, no checkpoint
"""


def test_crash_returns_to_last_checkpoint(tmp_path):
    """DESIGN.md: reopening after a crash returns the store to its last checkpoint."""
    path = str(tmp_path / "s")
    done = subprocess.run([sys.executable, "-c", CRASH_CHILD, path], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with mlkv.open(path) as s:
        assert len(s) == 60
        assert not s.contains(np.arange(1000, 1300)).any()
        np.testing.assert_array_equal(s.get(np.arange(60)), np.zeros((60, 16)))


def _machine_test(dtype, examples, base=StoreVsDict):
    """One state machine per dtype, so that a bug in one dtype does not hide the others."""
    machine = type(f"{base.__name__}_{dtype}", (base,), {"DTYPES": (dtype,)})
    machine.TestCase.settings = settings(
        max_examples=examples, stateful_step_count=STEPS, deadline=None,
        # the explain phase re-runs a failure hundreds of times: slow here, and rarely useful
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    return machine.TestCase


# float32 is the default dtype and gets the full count; the others a third of it each.
TestStoreVsDictFloat32 = _machine_test("float32", EXAMPLES)
TestStoreVsDictFloat64 = _machine_test("float64", max(1, EXAMPLES // 3))
TestStoreVsDictFloat16 = _machine_test("float16", max(1, EXAMPLES // 3))
# A separate machine, so that a failure of the read-only view does not hide the others.
TestReadonlyViewFloat32 = _machine_test("float32", max(1, EXAMPLES // 3),
                                        StoreVsDictWithReadonlyView)
