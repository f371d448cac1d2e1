"""Every Numba kernel against the slow Python reference in tests/reference.py.

Kernels are called directly on hand-built arrays and small hand-built logs (a
``HybridLog`` + ``HashIndex`` + ``FileDevice`` in a tmp dir); record bytes are checked
against layout.py's diagram by decoding them with the reference reader, never through the
engine's own read path.
"""

from __future__ import annotations

import inspect
import itertools
import os
import sys

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlkv
from mlkv.engine import _device_kernels as DK
from mlkv.engine import _index_kernels as IK
from mlkv.engine import _init_kernels as INK
from mlkv.engine import _log_kernels as LK
from mlkv.engine import _write_kernels as WK
from mlkv.engine import buffers, ops
from mlkv.engine import device as device_mod
from mlkv.engine import index as index_mod
from mlkv.engine import layout as layout_mod
from mlkv.engine.device import FileDevice, aligned_empty
from mlkv.engine.index import MAX_LOAD, HashIndex
from mlkv.engine.layout import RecordLayout
from mlkv.engine.log import HybridLog
from mlkv.engine.policy import CachePolicy

sys.path.insert(0, os.path.dirname(__file__))
import reference as R

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
EXTREME_KEYS = [0, 1, -1, 2, -2, I64_MIN, I64_MIN + 1, I64_MAX, I64_MAX - 1,
                1 << 32, -(1 << 32), 0x5555555555555555, -0x5555555555555555]
int64s = st.one_of(st.sampled_from(EXTREME_KEYS), st.integers(I64_MIN, I64_MAX))
HSET = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Geometries: (dim, dtype, state_dim). Record sizes 40, 432, 424 and 4096 (= one page) bytes
# at page_bits 12, with 16, 208, 280 and 0 bytes of padding at the end of a page. (float16,
# the one dtype with a gap between values and state, travels through the kernels as uint16
# bits: see test_float16_store_roundtrip.)
GEOMETRIES = [(5, "float32", 0), (101, "float32", 3), (50, "float64", 1), (1020, "float32", 0)]


# =================================================================================== hashing
def test_mix64_known_vector():
    # splitmix64 seeded with 0: first output is mix64(0 + golden) = 0xE220A8397B1DCDAF
    assert R.mix64(R.GOLDEN) == 0xE220A8397B1DCDAF
    assert int(IK.mix64(np.uint64(R.GOLDEN))) == 0xE220A8397B1DCDAF


@given(st.integers(0, R.MASK64))
@settings(max_examples=300, deadline=None)
def test_mix64_matches_reference(x):
    assert int(IK.mix64(np.uint64(x))) == R.mix64(x)


@given(int64s, st.integers(0, 32))
@settings(max_examples=300, deadline=None)
def test_home_slot_matches_reference(key, bits):
    capacity = 1 << bits  # up to 2**32, the largest capacity home slots can scale to
    h = IK.home_slot(np.int64(key), np.int64(capacity))
    assert h == R.home_slot(key, capacity)
    assert 0 <= h < capacity


def test_unkey_hash_inverts_the_kernel_hash():
    """The reference builds keys with a chosen home slot by inverting the index's hash:
    check the inverse against the kernel, so those keys really land where the tests think."""
    rng = np.random.default_rng(13)
    for x in [0, 1, R.MASK64, R.FIBONACCI] + rng.integers(0, 1 << 63, 300, dtype=np.uint64) \
            .tolist():
        assert int(IK.key_hash(np.int64(R.unkey_hash(x)))) == x
        assert R.key_hash(R.unkey_hash(x)) == x
    for cap in [1, 16, 1 << 17, 1 << 32]:
        for h in [0, cap // 2, cap - 1]:
            k = R.key_with_home(h, cap, int(rng.integers(0, 1 << 62)))
            assert IK.home_slot(np.int64(k), np.int64(cap)) == h


@given(int64s)
@settings(max_examples=300, deadline=None)
def test_key_hash_matches_reference(key):
    assert int(IK.key_hash(np.int64(key))) == R.key_hash(key)


@pytest.mark.parametrize("name", ["0 .. n-1", "1,000 apart", "8 ranges under field << 32"])
def test_consecutive_ids_land_near_their_home_slots(name):
    """What the index's speed rests on (see ``key_hash``): ids that follow one another
    spread evenly over the slots, so that even at the highest load the index runs at before
    growing, no id is stored more than a few slots past its home, where random keys go
    dozens past theirs."""
    capacity = 1 << 16
    n = int(0.74 * capacity)
    assert n <= index_mod.MAX_LOAD * capacity
    keys = {"0 .. n-1": np.arange(n), "1,000 apart": np.arange(n) * 1000,
            "8 ranges under field << 32": (np.arange(8)[:, None] << 32
                                           | np.arange(n // 8)[None, :]).ravel()}[name]
    keys = keys.astype(np.int64)
    random_keys = np.random.default_rng(3).integers(I64_MIN, I64_MAX, keys.shape[0],
                                                     dtype=np.int64)
    farthest = {}
    for label, ks in (("ids", keys), ("random", random_keys)):
        index = index_mod.HashIndex(capacity)
        index.assign(ks, np.arange(1, ks.shape[0] + 1, dtype=np.int64))
        assert index.capacity == capacity
        slots = np.flatnonzero(index.slot_addrs)
        # home slots computed apart from the kernels, in numpy's wrapping uint64 arithmetic
        hashes = index.slot_keys[slots].astype(np.uint64) * np.uint64(R.FIBONACCI)
        homes = ((hashes >> np.uint64(32)) * np.uint64(capacity)) >> np.uint64(32)
        farthest[label] = int(((slots - homes.astype(np.int64)) % capacity).max())
    assert farthest["ids"] <= 8 < 40 <= farthest["random"], farthest


@given(st.lists(int64s, min_size=1, max_size=40), st.integers(0, 31))
@settings(max_examples=150, deadline=None)
def test_home_slot_monotone_in_the_hash_and_doubling(keys, bits):
    """Home slots are monotone in the hash, and doubling the capacity sends home h to 2h or
    2h + 1: what lets a rehash that walks the old slots in order fill the new ones front to
    back (index.py). Checked on the reference and on the kernel alike."""
    cap = 1 << bits
    by_hash = sorted(set(keys), key=R.key_hash)
    for home in (R.home_slot, lambda k, c: int(IK.home_slot(np.int64(k), np.int64(c)))):
        homes = [home(k, cap) for k in by_hash]
        assert homes == sorted(homes)
        for k, h in zip(by_hash, homes):
            assert home(k, 2 * cap) in (2 * h, 2 * h + 1)
    # the hashes at each end of a home slot's range (built by inverting the hash)
    for h in {0, cap // 3, cap - 1}:
        lo = R.key_with_home(h, cap, 0)                      # smallest hash homed at h
        hi = R.unkey_hash(((h + 1) * (1 << 32) // cap - 1) << 32 | 0xFFFFFFFF)
        assert R.home_slot(hi, cap) == h
        assert IK.home_slot(np.int64(lo), np.int64(cap)) == h
        assert IK.home_slot(np.int64(hi), np.int64(cap)) == h
        assert R.home_slot(lo, 2 * cap) == 2 * h and R.home_slot(hi, 2 * cap) == 2 * h + 1
        assert IK.home_slot(np.int64(lo), np.int64(2 * cap)) == 2 * h
        assert IK.home_slot(np.int64(hi), np.int64(2 * cap)) == 2 * h + 1


def test_mix64_is_a_bijection_on_a_sample():
    xs = np.random.default_rng(1).integers(0, 1 << 63, 20000, dtype=np.uint64)
    ys = {int(IK.mix64(np.uint64(x))) for x in xs}
    assert len(ys) == len({int(x) for x in xs})


# ===================================================================== index: slot level
def keys_with_home(homes, capacity, count, rng) -> list[int]:
    """``count`` distinct int64 keys whose home slot is in ``homes``: the extreme keys that
    happen to be homed there, then keys built by inverting the hash (reference)."""
    found = [k for k in EXTREME_KEYS if R.home_slot(k, capacity) in homes]
    seen = set(found)
    homes = sorted(homes)
    while len(found) < count:
        h = homes[int(rng.integers(0, len(homes)))]
        k = R.key_with_home(h, capacity, int(rng.integers(I64_MIN, I64_MAX, dtype=np.int64)))
        if k not in seen:
            found.append(k)
            seen.add(k)
    return found[:count]


def colliding_pool(capacity, seed=0) -> list[int]:
    """Keys that pile up at the end of the slot array (runs wrap round to slot 0) and in
    one long run in the middle, plus the extreme int64 values."""
    mask = capacity - 1
    rng = np.random.default_rng(seed)
    pool = keys_with_home({mask}, capacity, 6, rng)
    pool += keys_with_home({mask - 1, 0}, capacity, 4, rng)
    pool += keys_with_home({capacity // 2}, capacity, 6, rng)
    pool += [k for k in EXTREME_KEYS if k not in pool]
    return list(dict.fromkeys(pool))


def kernel_table(capacity):
    """An empty table as the kernels see it: every slot (key 0, address 0)."""
    return np.zeros(capacity, np.int64), np.zeros(capacity, np.int64)


def assert_same_table(slot_keys, slot_addrs, ref: R.RefIndex):
    rk, ra = ref.arrays()
    np.testing.assert_array_equal(slot_addrs, ra)
    np.testing.assert_array_equal(slot_keys, rk)
    R.check_index_invariants(slot_keys, slot_addrs)


@pytest.mark.parametrize("capacity", [16, 32])
@given(data=st.data())
@settings(max_examples=80, deadline=None)
def test_find_assign_remove_against_reference(capacity, data):
    """Random insert/overwrite/delete sequences on keys that collide, wrap round the end of
    the slot array and form long runs: the kernel's table equals the reference slot for
    slot, every live key is found, no deleted key is."""
    pool = colliding_pool(capacity)
    keys = st.sampled_from(pool) | int64s
    # any address but 0, which marks an empty slot (no record lives there)
    addrs = st.integers(1, 1 << 40) | st.sampled_from([1, I64_MAX])
    ops_ = data.draw(st.lists(st.tuples(st.sampled_from(["put", "del", "del"]), keys, addrs),
                              max_size=60))
    sk, sa = kernel_table(capacity)
    ref = R.RefIndex(capacity)
    model = {}
    for op, key, addr in ops_:
        s = IK.find_slot(sk, sa, np.int64(key))
        assert s == ref.find(key)
        if op == "put":
            if key not in model and len(model) >= capacity - 2:
                continue  # keep an empty slot: the kernels never run on a full table
            new = IK.assign(sk, sa, np.array([key], np.int64), np.array([addr], np.int64))
            assert new == ref.put(key, addr) == (key not in model)
            model[key] = addr
        else:
            if s >= 0:
                IK.remove_slot(sk, sa, s)
                ref.remove_at(s)
                del model[key]
        assert_same_table(sk, sa, ref)
    assert ref.as_dict() == model
    probe = np.array(pool + list(model), np.int64)
    out = np.empty(probe.shape[0], np.int64)
    missing = IK.lookup(sk, sa, probe, out)
    expect = [model.get(int(k), -1) for k in probe]
    np.testing.assert_array_equal(out, expect)
    assert missing == sum(1 for e in expect if e == -1)


def test_remove_inside_long_wrapping_run():
    """A run of 12 keys homed at the last two slots wraps round to slot 0; deleting each
    position of the run in turn keeps every other key reachable."""
    capacity = 16
    mask = capacity - 1
    rng = np.random.default_rng(7)
    run = keys_with_home({mask}, capacity, 7, rng) + keys_with_home({mask - 1}, capacity, 5, rng)
    others = keys_with_home({1, 2}, capacity, 2, rng)
    order = list(rng.permutation(run + others))
    for victim in run + others:
        sk, sa = kernel_table(capacity)
        ref = R.RefIndex(capacity)
        for i, k in enumerate(order):  # address i + 1: 0 would mark the slot empty
            IK.assign(sk, sa, np.array([k], np.int64), np.array([i + 1], np.int64))
            ref.put(int(k), i + 1)
        assert_same_table(sk, sa, ref)
        assert sa[0] != 0 and sa[mask] != 0  # the run really wraps
        s = IK.find_slot(sk, sa, np.int64(victim))
        IK.remove_slot(sk, sa, s)
        ref.remove(int(victim))
        assert_same_table(sk, sa, ref)
        out = np.empty(len(order), np.int64)
        IK.lookup(sk, sa, np.array(order, np.int64), out)
        for k, a, i in zip(order, out, range(len(order))):
            assert a == (-1 if k == victim else i + 1), (victim, k)


def test_assign_batch_with_duplicates_and_lookup_counts():
    rng = np.random.default_rng(3)
    sk, sa = kernel_table(1024)
    ref = R.RefIndex(1024)
    keys = rng.choice(np.array(colliding_pool(1024) + list(
        rng.integers(I64_MIN, I64_MAX, 500, dtype=np.int64))), 700).astype(np.int64)
    addrs = rng.integers(1, 1 << 50, keys.shape[0], dtype=np.int64)
    new = IK.assign(sk, sa, keys, addrs)
    expect_new = sum(ref.put(int(k), int(a)) for k, a in zip(keys, addrs))
    assert new == expect_new == len(set(keys.tolist()))
    assert_same_table(sk, sa, ref)
    probe = np.concatenate([keys, rng.integers(I64_MIN, I64_MAX, 300, dtype=np.int64)])
    out = np.full(probe.shape[0], 12345, np.int64)
    missing = IK.lookup(sk, sa, probe, out)
    expect = np.array([ref.get(int(k)) for k in probe])
    np.testing.assert_array_equal(out, expect)
    assert missing == int((expect < 0).sum())


@pytest.mark.parametrize("start", [0, 5, 40])
def test_find_slots_against_reference(start):
    """The batched ``find_slot`` (it prefetches ahead), which the log kernels probe with: for
    ``keys[start:]`` the slots ``find_slot`` gives and, in ``addrs``, each key's address or
    -1; positions before ``start`` are left alone."""
    cap = 64
    rng = np.random.default_rng(start)
    sk, sa = kernel_table(cap)
    ref = R.RefIndex(cap)
    pool = colliding_pool(cap, seed=3)
    present = pool[::2] + rng.integers(I64_MIN, I64_MAX, 10, dtype=np.int64).tolist()
    for i, k in enumerate(present):
        IK.assign(sk, sa, np.array([k], np.int64), np.array([(i + 1) * 8], np.int64))
        ref.put(k, (i + 1) * 8)
    keys = np.array(pool + present + rng.integers(I64_MIN, I64_MAX, 10, dtype=np.int64)
                    .tolist(), np.int64)
    keys = np.tile(keys, 2)[rng.permutation(2 * keys.shape[0])]   # repeats too
    assert keys.shape[0] > start + IK.PREFETCH_DISTANCE
    addrs = np.full(keys.shape[0], 12345, np.int64)
    slots = IK.find_slots(sk, sa, keys, start, addrs)
    assert slots.tolist() == [ref.find(k) for k in keys[start:].tolist()]
    assert addrs[start:].tolist() == [ref.get(k) for k in keys[start:].tolist()]
    assert (addrs[:start] == 12345).all()
    assert_same_table(sk, sa, ref)  # a lookup changes nothing


def test_empty_inputs():
    sk, sa = kernel_table(16)
    e = np.empty(0, np.int64)
    assert IK.lookup(sk, sa, e, e.copy()) == 0
    assert IK.assign(sk, sa, e, e) == 0
    assert IK.live_entries(sk, sa, e.copy(), e.copy()) == 0
    nk, na = kernel_table(32)
    IK.rehash(sk, sa, nk, na)
    assert (na == 0).all() and (nk == 0).all()
    IK.rehash(sk[:0], sa[:0], nk, na)  # an empty slice of old slots
    assert (na == 0).all() and (nk == 0).all()


def test_key_zero_and_empty_slots():
    """Key 0 is an ordinary key: an empty slot holds key 0 *and* address 0, and only the
    address tells them apart. A slot emptied by a delete reads (0, 0) again."""
    cap = 16
    sk, sa = kernel_table(cap)
    ref = R.RefIndex(cap)
    h = R.home_slot(0, cap)
    assert IK.find_slot(sk, sa, np.int64(0)) == -(h + 1) == ref.find(0)
    out = np.empty(1, np.int64)
    assert IK.lookup(sk, sa, np.zeros(1, np.int64), out) == 1 and out[0] == -1
    assert IK.assign(sk, sa, np.zeros(1, np.int64), np.array([4096], np.int64)) == 1
    ref.put(0, 4096)
    assert IK.find_slot(sk, sa, np.int64(0)) == h and (sk[h], sa[h]) == (0, 4096)
    others = keys_with_home({h}, cap, 3, np.random.default_rng(0))
    others = [k for k in others if k != 0][:2]
    IK.assign(sk, sa, np.array(others, np.int64), np.array([8, 16], np.int64))
    ref.put(others[0], 8)
    ref.put(others[1], 16)
    assert_same_table(sk, sa, ref)
    IK.remove_slot(sk, sa, h)  # key 0 leaves; the run shifts back over its slot
    ref.remove_at(h)
    assert_same_table(sk, sa, ref)
    assert IK.find_slot(sk, sa, np.int64(0)) < 0
    for k in others:
        IK.remove_slot(sk, sa, IK.find_slot(sk, sa, np.int64(k)))
    assert (sk == 0).all() and (sa == 0).all()


@pytest.mark.parametrize("old_cap,new_cap", [(16, 16), (16, 32), (64, 256), (32, 16)])
def test_rehash_and_live_entries(old_cap, new_cap):
    rng = np.random.default_rng(old_cap * 1000 + new_cap)
    for trial in range(20):
        sk, sa = kernel_table(old_cap)
        ref = R.RefIndex(old_cap)
        pool = colliding_pool(old_cap, seed=trial)
        n = int(rng.integers(0, min(old_cap, new_cap) - 1))
        keys = list(dict.fromkeys(rng.permutation(np.array(
            pool + list(rng.integers(I64_MIN, I64_MAX, 40, dtype=np.int64)))).tolist()))[:n]
        for i, k in enumerate(keys):
            IK.assign(sk, sa, np.array([k], np.int64), np.array([(i + 1) * 8], np.int64))
            ref.put(k, (i + 1) * 8)
        # some deletes so the old table has holes
        for k in keys[::3]:
            IK.remove_slot(sk, sa, IK.find_slot(sk, sa, np.int64(k)))
            ref.remove(k)
        out_k = np.full(old_cap, 99, np.int64)
        out_a = np.full(old_cap, 99, np.int64)
        cnt = IK.live_entries(sk, sa, out_k, out_a)
        live = ref.live()  # slot order
        assert cnt == len(live)
        assert list(zip(out_k[:cnt].tolist(), out_a[:cnt].tolist())) == live
        nk, na = kernel_table(new_cap)
        IK.rehash(sk, sa, nk, na)
        expect = R.RefIndex(new_cap)
        for k, a in live:
            expect.put(k, a)
        assert_same_table(nk, na, expect)


# ================================================================= index: HashIndex wrapper
def test_hash_index_growth_keeps_every_key():
    rng = np.random.default_rng(11)
    idx = HashIndex()
    model = {}
    caps = []
    for step in range(30):
        n = int(rng.integers(0, 3000))
        keys = np.concatenate([rng.integers(I64_MIN, I64_MAX, n, dtype=np.int64),
                               np.array(EXTREME_KEYS, np.int64),
                               rng.choice(np.array(list(model) or [0], np.int64), 50)])
        addrs = rng.integers(1, 1 << 40, keys.shape[0], dtype=np.int64)  # never 0 (empty)
        idx.assign(keys, addrs)
        for k, a in zip(keys.tolist(), addrs.tolist()):
            model[k] = a
        caps.append(idx.capacity)
        assert idx.count == len(model)
        assert idx.capacity & (idx.capacity - 1) == 0
        assert idx.count <= MAX_LOAD * idx.capacity
    assert caps[-1] > caps[0]  # it grew by rehash on the way
    mk = np.array(list(model), np.int64)
    np.testing.assert_array_equal(idx.lookup(mk), np.array(list(model.values())))
    R.check_index_invariants(idx.slot_keys, idx.slot_addrs)
    keys, addrs = idx.entries()
    assert dict(zip(keys.tolist(), addrs.tolist())) == model
    again = HashIndex.from_entries(keys, addrs)
    np.testing.assert_array_equal(again.lookup(mk), idx.lookup(mk))
    assert again.count == idx.count


@pytest.mark.parametrize("capacity", [1, 1000, 1 << 10, 1 << 20])
def test_fresh_index_is_zero_memory_maps(capacity):
    """A fresh index is all empty slots, (key 0, address 0): zero pages of an anonymous map,
    page-aligned, that no key is found in."""
    idx = HashIndex(capacity)
    assert idx.capacity == max(index_mod.MIN_CAPACITY, capacity)
    for a in (idx.slot_keys, idx.slot_addrs):
        assert a.dtype == np.int64 and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % buffers.PAGE_BYTES == 0
        assert not a.any()
    assert (idx.lookup(np.array(EXTREME_KEYS, np.int64)) == -1).all()
    assert idx.count == 0 and idx.entries()[0].shape == (0,)
    assert list(idx.iter_pairs(256)) == []


def test_index_capacity_is_bounded_by_the_home_slot_scaling():
    """Home slots scale 32 hash bits, so no index has more than 2**32 slots."""
    assert index_mod.MAX_CAPACITY == R.MAX_CAPACITY
    with pytest.raises(MemoryError):
        HashIndex(R.MAX_CAPACITY + 1)


@pytest.mark.parametrize("old_cap,chunk", [
    (1024, 1), (1024, 100), (1024, 512), (2048, 1 << 16), (1 << 17, None)])
def test_reserve_rehashes_in_chunks_like_a_reference_insert(monkeypatch, old_cap, chunk):
    """Growing rehashes a chunk of old slots at a time (``REHASH_CHUNK``; None: the real
    one). The new table equals a reference table into which every live key was inserted in
    old-slot order, whatever the chunk; the old arrays are handed back to the OS (zero)."""
    if chunk is not None:
        monkeypatch.setattr(index_mod, "REHASH_CHUNK", chunk)
    chunk = index_mod.REHASH_CHUNK
    rng = np.random.default_rng(old_cap + chunk)
    pool = colliding_pool(old_cap, seed=old_cap)  # runs wrap round the end of the table
    n = int(MAX_LOAD * old_cap)
    keys = list(dict.fromkeys(pool + rng.integers(I64_MIN, I64_MAX, n, dtype=np.int64)
                              .tolist()))[:n]
    keys = np.array(keys, np.int64)
    addrs = rng.integers(1, 1 << 50, n, dtype=np.int64)
    idx = HashIndex(old_cap)
    idx.assign(keys, addrs)
    assert idx.capacity == old_cap and idx.count == n
    for k in keys[len(pool)::3].tolist():  # holes left by deletes (pool keys stay)
        IK.remove_slot(idx.slot_keys, idx.slot_addrs, IK.find_slot(idx.slot_keys,
                                                                   idx.slot_addrs, k))
        idx.count -= 1
    old_keys, old_addrs = idx.slot_keys, idx.slot_addrs
    before_k, before_a = old_keys.copy(), old_addrs.copy()
    assert before_a[0] != 0 and before_a[old_cap - 1] != 0  # a run wraps round the end
    assert (before_a == 0).any()
    idx.reserve(int(MAX_LOAD * old_cap) - idx.count + 1)  # one more than fits: double
    assert idx.capacity == 2 * old_cap
    expect = R.RefIndex(2 * old_cap)
    for k, a in zip(before_k.tolist(), before_a.tolist()):  # old-slot order
        if a != 0:
            expect.put(k, a)
    assert_same_table(idx.slot_keys, idx.slot_addrs, expect)
    live = before_a != 0
    np.testing.assert_array_equal(idx.lookup(before_k[live]), before_a[live])
    if chunk * 8 % buffers.PAGE_BYTES == 0:  # every chunk is whole pages: all handed back
        assert not old_keys.any() and not old_addrs.any()


def test_hash_index_grows_to_millions_of_keys_with_deletes():
    """From empty through several doublings (each rehashed in many chunks) to 2.5M keys,
    with deletes between growths: every live key is found at its address, no deleted key
    and no key never inserted is."""
    n = 2_500_000
    batch = 100_000
    # distinct keys spread over all of int64: i * odd constant is a bijection mod 2**64
    odd = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 as int64
    with np.errstate(over="ignore"):
        keys = np.arange(n, dtype=np.int64) * odd
        absent = np.arange(n, n + 200_000, dtype=np.int64) * odd
    assert keys.min() < -(1 << 62) and keys.max() > 1 << 62
    addrs = (np.arange(n, dtype=np.int64) + 1) * 8  # no record at address 0
    rng = np.random.default_rng(12)
    deleted = np.zeros(n, bool)
    idx = HashIndex()
    caps = [idx.capacity]
    for lo in range(0, n, batch):
        idx.assign(keys[lo:lo + batch], addrs[lo:lo + batch])
        if idx.capacity != caps[-1]:
            caps.append(idx.capacity)
        if lo // batch % 5 == 4:  # delete 20k of the keys in so far, through the kernels
            victims = rng.choice(np.flatnonzero(~deleted[:lo + batch]), 20_000, replace=False)
            sk, sa = idx.slot_keys, idx.slot_addrs
            for k in keys[victims].tolist():
                s = IK.find_slot(sk, sa, k)
                assert s >= 0
                IK.remove_slot(sk, sa, s)
            idx.count -= victims.shape[0]
            deleted[victims] = True
        assert idx.count == lo + batch - int(deleted.sum())
        assert idx.count <= MAX_LOAD * idx.capacity
    assert len(caps) >= 6 and caps[-1] == 1 << 22  # five doublings or more
    assert all(b == 2 * a for a, b in itertools.pairwise(caps[1:]))  # doublings after the first
    live = ~deleted
    assert idx.count == int(live.sum()) == int((idx.slot_addrs != 0).sum())
    np.testing.assert_array_equal(idx.lookup(keys[live]), addrs[live])
    assert (idx.lookup(keys[deleted]) == -1).all()
    assert (idx.lookup(absent) == -1).all()
    ek, ea = idx.entries()
    order = np.argsort(ea)
    np.testing.assert_array_equal(ek[order], keys[live])
    np.testing.assert_array_equal(ea[order], addrs[live])
    # the slot-level invariant on a sample of slots: each live key reachable from home
    cap = idx.capacity
    empty = idx.slot_addrs == 0
    assert (idx.slot_keys[empty] == 0).all()
    for s in np.random.default_rng(12).integers(0, cap, 2000).tolist():
        if empty[s]:
            continue
        t = R.home_slot(int(idx.slot_keys[s]), cap)
        while t != s:
            assert not empty[t]
            t = (t + 1) & (cap - 1)


# ============================================================================== buffers
@pytest.mark.parametrize("shape,dtype,hugepages", [
    ((0,), np.int64, False), ((1,), np.uint8, False), ((1000,), np.int64, False),
    ((3, 5000), np.float32, False), ((1 << 20,), np.int64, False),
    ((1 << 22,), np.uint8, True)])
def test_anonymous_arrays_are_zero(shape, dtype, hugepages):
    a = buffers.anonymous(shape, dtype, hugepages=hugepages)
    assert a.shape == shape and a.dtype == dtype
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % buffers.PAGE_BYTES == 0
    assert not a.any()
    b = buffers.aligned_empty(12345)
    assert b.dtype == np.uint8 and b.shape == (12345,) and not b.any()
    assert b.ctypes.data % buffers.PAGE_BYTES == 0


def whole_pages_inside(lo, hi, page):
    """Byte range [first, last) of the whole pages inside [lo, hi) (offsets from a page
    boundary); empty when first >= last."""
    return -(-lo // page) * page, hi // page * page


@pytest.mark.parametrize("hugepages", [False, True])
def test_release_zeroes_whole_pages_inside_a_slice(hugepages):
    """``buffers.release`` hands back the whole pages inside a slice (they read as zeros)
    and leaves the partial pages at its edges, and everything outside it, intact."""
    P = buffers.PAGE_BYTES
    n = (4 << 20) if hugepages else 8 * P
    a = buffers.anonymous((n,), np.uint8, hugepages=hugepages)
    fill = np.random.default_rng(1).integers(1, 256, n, dtype=np.uint8)  # no zero byte
    cases = [(100, 3 * P + 50), (P, 3 * P), (P + 1, 2 * P - 1), (5 * P - 10, 5 * P + 10),
             (0, n), (2 * P, 2 * P), (3 * P - 1, 6 * P), (7, n - 7), (0, P - 1)]
    for lo, hi in cases:
        a[:] = fill
        buffers.release(a[lo:hi])
        expect = fill.copy()
        first, last = whole_pages_inside(lo, hi, P)
        if last > first:
            expect[first:last] = 0
        assert (a == expect).all(), (lo, hi)
    # through an int64 view, as the index releases its slots
    w = a.view(np.int64)
    a[:] = fill
    buffers.release(w[3:(2 * P) // 8 + 5])
    expect = fill.copy()
    first, last = whole_pages_inside(24, 2 * P + 40, P)
    expect[first:last] = 0
    assert (a == expect).all()
    a[:] = 7  # released pages are usable again
    assert (a == 7).all()


# =========================================================================== layout / geo
@pytest.mark.parametrize("dim,dtype,state_dim", GEOMETRIES)
def test_layout_matches_docstring(dim, dtype, state_dim):
    g = R.Geometry(dim, dtype, state_dim, 12, 14)
    lay = RecordLayout(dim, np.dtype(dtype).itemsize, state_dim, 12, 14)
    assert (lay.value_offset, lay.state_offset, lay.record_bytes, lay.records_per_page) == \
        (g.value_offset, g.state_offset, g.record_bytes, g.records_per_page)
    assert g.record_bytes % 8 == 0


def geo_array(g: R.Geometry, n_frames: int) -> np.ndarray:
    """The kernels' ``geo`` vector, built from the reference geometry and the G_* names
    (value and state positions in elements of the views that hold them)."""
    geo = np.zeros(LK.N_GEOMETRY, np.int64)
    geo[LK.G_PAGE_BITS] = g.page_bits
    geo[LK.G_FRAMES] = n_frames
    geo[LK.G_RECORD_WORDS] = g.record_bytes // 8
    geo[LK.G_DIM] = g.dim
    geo[LK.G_STATE_DIM] = g.state_dim
    geo[LK.G_VALUE_BASE] = g.value_offset // g.dtype.itemsize
    geo[LK.G_STATE_BASE] = g.state_offset // 4
    geo[LK.G_VALUES_PER_WORD] = 8 // g.dtype.itemsize
    return geo


@pytest.mark.parametrize("n_frames", [1, 5, 6, 37])
def test_frame_word_is_the_ring_position_of_in_memory_addresses(n_frames):
    """The batch loops' frame of an address at or above head, found from head's frame by a
    subtraction, is page modulo frames (the reference) for every address of the pages in
    memory (head's page and the n_frames - 1 after it), whatever page head is on."""
    g = R.Geometry(8, "float32", 0, 12, 14)
    geo = geo_array(g, n_frames)

    @numba.njit
    def both(geo, head, addresses, out):
        origin = LK._ring_origin(geo, head)
        for i in range(addresses.shape[0]):
            out[i, 0], out[i, 1] = LK._frame_word(geo, origin, addresses[i])

    rng = np.random.default_rng(n_frames)
    for head_page in [1, 2, n_frames, n_frames + 1, 3 * n_frames - 1, 1_000_003]:
        head = (head_page << 12) + int(rng.integers(0, 512)) * 8
        top = (head_page + n_frames) << 12                # first address past the frames
        addresses = np.unique(np.r_[head, top - 8, rng.integers(head, top, 200) // 8 * 8])
        out = np.empty((addresses.shape[0], 2), np.int64)
        both(geo, head, addresses, out)
        assert out[:, 0].tolist() == [(a >> 12) % n_frames for a in addresses.tolist()]
        assert out[:, 1].tolist() == [(a & 4095) >> 3 for a in addresses.tolist()]


@pytest.mark.parametrize("dim,dtype,state_dim", GEOMETRIES + [(7, "float16", 1)])
def test_fresh_log_starts_at_the_first_address(tmp_path, dim, dtype, state_dim):
    """A fresh HybridLog starts at page 1: begin = head = read_only = tail = page_bytes, no
    page open yet (page 0, the hole, counts as the last one opened), and its geometry is the
    reference's."""
    eng = build_engine(tmp_path, dim, dtype, state_dim, n_frames=6)
    g = ref_geo(eng)
    log = eng.log
    first = g.first_address
    assert layout_mod.FIRST_ADDRESS_PAGE == R.FIRST_ADDRESS_PAGE == 1
    assert first == R.FIRST_ADDRESS_PAGE << 12 == 4096
    assert (log.begin, log.head, log.read_only, log.tail) == (first, first, first, first)
    assert log.marks[LK.M_OPEN_PAGE] == 0
    assert log.marks[LK.M_LIMIT_PAGE] == R.FIRST_ADDRESS_PAGE + 6 - 1  # pages 1..6: 6 frames
    assert log.resident_bytes == 0
    np.testing.assert_array_equal(log.geo, geo_array(g, 6))
    log.flush()  # nothing to write: no page is open
    assert not log.dirty.any() and os.listdir(eng.device.directory) == []


# ================================================================================ allocate
@pytest.mark.parametrize("dim,dtype,state_dim", GEOMETRIES)
@pytest.mark.parametrize("n_frames", [4, 5])
def test_allocate_packs_pages_and_stops_at_limit(dim, dtype, state_dim, n_frames):
    g = R.Geometry(dim, dtype, state_dim, 12, 14)
    frames = np.full((n_frames, g.page_bytes), 0xA5, np.uint8)
    words = frames.view(np.int64)
    dirty = np.zeros(n_frames, np.uint8)
    geo = geo_array(g, n_frames)
    # a fresh log's markers: everything at the first address, page 0 (the hole) "open"
    first_page = R.FIRST_ADDRESS_PAGE
    marks = np.zeros(LK.N_MARKS, np.int64)
    marks[[LK.M_BEGIN, LK.M_HEAD, LK.M_READ_ONLY, LK.M_TAIL]] = g.first_address
    marks[LK.M_OPEN_PAGE] = first_page - 1
    limit = first_page + n_frames - 1
    marks[LK.M_LIMIT_PAGE] = limit
    got = []
    while True:
        before = marks.copy()
        a = LK.allocate(words, dirty, geo, marks)
        if a < 0:
            assert a == -1
            np.testing.assert_array_equal(marks, before)  # a failed allocation changes nothing
            break
        got.append(a)
        assert marks[LK.M_TAIL] == a + g.record_bytes
        assert marks[LK.M_OPEN_PAGE] == a >> g.page_bits
        assert len(got) < 10 ** 5
    expect = [g.nth_address(n) for n in range(g.records_per_page * n_frames)]
    assert got == expect
    assert got[0] == g.first_address and 0 not in got
    for a in got:  # never straddles a page
        assert a >> g.page_bits == (a + g.record_bytes - 1) >> g.page_bits
    assert (frames == 0).all()  # every opened frame zeroed, nothing written into it
    assert (dirty == 1).all()


def test_allocate_resumes_mid_page_without_zeroing_it():
    g = R.Geometry(5, "float32", 0, 12, 14)
    n_frames = 4
    frames = np.full((n_frames, g.page_bytes), 0x77, np.uint8)
    words, dirty, geo = frames.view(np.int64), np.zeros(n_frames, np.uint8), geo_array(g, 4)
    marks = np.zeros(LK.N_MARKS, np.int64)
    # pages 1..5 exist, head at page 3 (frames 3,0,1,2 hold pages 3,4,5,6), tail mid page 5
    tail = (5 << g.page_bits) + 7 * g.record_bytes
    marks[:] = [g.first_address, 3 << 12, 4 << 12, tail, 5, 3 + n_frames - 1]
    a = LK.allocate(words, dirty, geo, marks)
    assert a == tail
    assert (frames[5 % n_frames] == 0x77).all()  # the open page is not wiped
    assert dirty.tolist() == [0, 1, 0, 0]
    # fill page 5, then page 6 opens (frame 2 zeroed), then stop at page 7 > limit 6
    addrs = [a]
    while True:
        a = LK.allocate(words, dirty, geo, marks)
        if a < 0:
            break
        addrs.append(a)
    expect = [tail + k * g.record_bytes for k in range(g.records_per_page - 7)] + \
        [(6 << 12) + k * g.record_bytes for k in range(g.records_per_page)]
    assert addrs == expect
    assert (frames[6 % n_frames] == 0).all()
    assert (frames[3] == 0x77).all() and (frames[0] == 0x77).all()
    assert dirty.tolist() == [0, 1, 1, 0]


def test_allocate_opens_page_after_restore_at_page_boundary():
    """After a reopen at a page boundary, the open page is the previous one."""
    g = R.Geometry(50, "float64", 1, 12, 14)
    frames = np.full((4, g.page_bytes), 0x11, np.uint8)
    words, dirty, geo = frames.view(np.int64), np.zeros(4, np.uint8), geo_array(g, 4)
    marks = np.array([g.first_address, 9 << 12, 9 << 12, 9 << 12, 8, 9 + 3], np.int64)
    a = LK.allocate(words, dirty, geo, marks)
    assert a == 9 << 12
    assert (frames[9 % 4] == 0).all() and dirty.tolist() == [0, 1, 0, 0]
    assert marks[LK.M_OPEN_PAGE] == 9


# ====================================================================== hand-built logs
def build_engine(tmp_path, dim=5, dtype="float32", state_dim=0, n_frames=8, page_bits=12,
                 segment_bits=14, policy="second_chance", name="log"):
    d = os.path.join(str(tmp_path), name)
    os.makedirs(d, exist_ok=True)
    dt = np.dtype(dtype)
    layout = RecordLayout(dim, dt.itemsize, state_dim, page_bits, segment_bits)
    device = FileDevice(d, page_bits, segment_bits, io_threads=3)
    log = HybridLog(layout, dt, n_frames << page_bits, device)
    assert log.n_frames == n_frames
    return ops.Engine(layout, dt, HashIndex(), log, device, CachePolicy(policy))


def ref_geo(eng) -> R.Geometry:
    lay = eng.layout
    return R.Geometry(lay.dim, eng.dtype, lay.state_dim, lay.page_bits, lay.segment_bits)


def record_bytes_at(eng, address) -> bytes:
    """Record bytes: from its frame when at or above head, else from its segment file."""
    g = ref_geo(eng)
    if address >= eng.log.head:
        return R.read_record_frames(eng.log.frames, eng.log.n_frames, address, g)
    return R.read_record_file(eng.device.directory, address, g.record_bytes, g.segment_bits)


def record_at(eng, address) -> dict:
    return R.decode_record(record_bytes_at(eng, address), ref_geo(eng))


def addr_of(eng, key) -> int:
    return int(eng.index.lookup(np.array([key], np.int64))[0])


def call_write(eng, keys, values, start=0):
    idx, log = eng.index, eng.log
    return WK.write_rows(idx.slot_keys, idx.slot_addrs, log.words, log.vals, log.f32,
                         log.dirty, log.geo, log.marks, keys, values, start)


def call_delete(eng, keys, start=0):
    idx, log = eng.index, eng.log
    return WK.delete_rows(idx.slot_keys, idx.slot_addrs, log.words, log.dirty, log.geo,
                          log.marks, keys, start)


def call_read_resident(eng, keys, start, want, out, addrs, cold_pos, n_cold, policy,
                       n_absent=0):
    idx, log = eng.index, eng.log
    return LK.read_resident(idx.slot_keys, idx.slot_addrs, log.words, log.vals, log.dirty,
                            log.geo, log.marks, keys, start, want, out, addrs, cold_pos,
                            n_cold, n_absent, policy, eng.policy.counters)


def call_finish_cold(eng, keys, cold_pos, cold_addrs, rec, rec_index, start, want, out,
                     policy):
    idx, log = eng.index, eng.log
    return LK.finish_cold(idx.slot_keys, idx.slot_addrs, log.words, log.dirty, log.geo,
                          log.marks, keys, cold_pos, cold_addrs, rec.view(np.int64),
                          rec.view(eng.dtype), rec_index, start, want, out, policy,
                          eng.policy.counters)


def random_values(rng, n, dim, dtype):
    return (rng.standard_normal((n, dim)) * 10).astype(dtype)


def distinct_keys(rng, n):
    keys = list(dict.fromkeys(EXTREME_KEYS + rng.integers(
        I64_MIN, I64_MAX, n + 10, dtype=np.int64).tolist()))
    return np.array(keys[:n], np.int64)


def assert_record(rec, key, values=None, flags=R.FLAG_VALID, state_zero=True):
    assert rec["flags"] == flags, rec
    assert rec["key"] == key
    assert rec["reserved"] == 0
    if values is not None:
        np.testing.assert_array_equal(rec["values"], values)
    if state_zero:
        assert (rec["state"] == 0).all()
    assert set(rec["padding"]) <= {0}


# ============================================================================ write_rows
@pytest.mark.parametrize("dim,dtype,state_dim", GEOMETRIES)
def test_write_rows_new_inplace_and_copy(tmp_path, dim, dtype, state_dim):
    eng = build_engine(tmp_path, dim, dtype, state_dim, n_frames=8)
    g = ref_geo(eng)
    rng = np.random.default_rng(dim)
    n_distinct = min(3 * g.records_per_page + 1, 40)
    uniq = distinct_keys(rng, n_distinct)
    keys = np.concatenate([uniq, rng.choice(uniq, n_distinct // 2)])  # repeats: last wins
    vals = random_values(rng, keys.shape[0], dim, dtype)
    eng.index.reserve(keys.shape[0])
    pos, inserted = call_write(eng, keys, vals)
    eng.index.count += inserted
    assert (pos, inserted) == (keys.shape[0], n_distinct)
    last = {int(k): vals[i] for i, k in enumerate(keys)}
    # first appearances were appended in order; repeats were written in place
    for j, k in enumerate(uniq.tolist()):
        a = addr_of(eng, k)
        assert a == g.nth_address(j)
        rec = record_at(eng, a)
        assert_record(rec, k, last[k])
        assert rec["pending"] == 0
    assert eng.log.tail == g.nth_address(n_distinct - 1) + g.record_bytes
    pages = {g.nth_address(j) >> 12 for j in range(n_distinct)}
    assert {p % 8 for p in pages} == set(np.flatnonzero(eng.log.dirty).tolist())

    # poke a non-zero optimizer state and pending count into every record
    for k in uniq.tolist():
        a = addr_of(eng, k)
        f, off = (a >> 12) % 8, a & 4095
        eng.log.frames[f, off:off + 2] = [3, 0]  # pending reads = 3
        st_ = eng.log.frames[f, off + g.state_offset:off + g.state_offset + 4 * state_dim]
        st_.view(np.float32)[:] = 1.5
    # in place (everything is mutable): same addresses, values new, state reset to zeros
    eng.log.dirty[:] = 0
    vals2 = random_values(rng, n_distinct, dim, dtype)
    tail = eng.log.tail
    assert call_write(eng, uniq, vals2) == (n_distinct, 0)
    assert eng.log.tail == tail
    for j, k in enumerate(uniq.tolist()):
        a = addr_of(eng, k)
        assert a == g.nth_address(j)
        rec = record_at(eng, a)
        assert_record(rec, k, vals2[j])
        assert rec["pending"] == 3  # the header is the record's own; only values and state change
    assert {p % 8 for p in pages} == set(np.flatnonzero(eng.log.dirty).tolist())

    # below read_only: the update is a new record at the tail; the old one stays as it was
    eng.log.marks[LK.M_READ_ONLY] = tail
    some = uniq[: n_distinct // 2]
    old = {k: record_bytes_at(eng, addr_of(eng, k)) for k in some.tolist()}
    vals3 = random_values(rng, some.shape[0], dim, dtype)
    assert call_write(eng, some, vals3) == (some.shape[0], 0)
    for j, k in enumerate(some.tolist()):
        a = addr_of(eng, k)
        assert a == g.nth_address(n_distinct + j)
        assert_record(record_at(eng, a), k, vals3[j])
        assert record_bytes_at(eng, g.nth_address(j)) == old[k]


@pytest.mark.parametrize("dim,dtype,state_dim", GEOMETRIES[:3])
def test_write_rows_stops_without_half_written_key_and_resumes(tmp_path, dim, dtype,
                                                                state_dim):
    eng = build_engine(tmp_path, dim, dtype, state_dim, n_frames=4)
    g = ref_geo(eng)
    rng = np.random.default_rng(5)
    rpp = g.records_per_page
    uniq = distinct_keys(rng, 6 * rpp)  # 6 pages: more than the pool of 4
    keys = np.concatenate([uniq[:rpp], uniq[:3], uniq[rpp:]])  # in-place repeats early
    vals = random_values(rng, keys.shape[0], dim, dtype)
    eng.index.reserve(keys.shape[0])
    pos, inserted = call_write(eng, keys, vals)
    eng.index.count += inserted
    # 4 frames hold 4 pages = 4 * rpp new records; the first key of a 5th page stops it
    assert pos == 4 * rpp + 3 and inserted == 4 * rpp
    assert eng.log.marks[LK.M_OPEN_PAGE] == R.FIRST_ADDRESS_PAGE + 3
    assert eng.log.tail == g.nth_address(4 * rpp - 1) + g.record_bytes
    present = eng.index.lookup(keys) >= 0
    assert present[:pos].all() and not present[pos:].any()
    # resume after eviction, as ops does
    model = {}
    while pos < keys.shape[0]:
        eng.log.make_room()
        pos, inserted = call_write(eng, keys, vals, pos)
        eng.index.count += inserted
    for i, k in enumerate(keys.tolist()):
        model[k] = vals[i]
    assert eng.index.count == len(model)
    for k, v in model.items():
        assert_record(record_at(eng, addr_of(eng, k)), k, v)


def test_write_rows_empty_batch(tmp_path):
    eng = build_engine(tmp_path)
    assert call_write(eng, np.empty(0, np.int64), np.empty((0, 5), np.float32)) == (0, 0)
    assert eng.log.tail == ref_geo(eng).first_address and eng.log.marks[LK.M_OPEN_PAGE] == 0
    assert not eng.index.slot_addrs.any()


# =========================================================================== delete_rows
def test_delete_rows_tombstones_and_stops(tmp_path):
    eng = build_engine(tmp_path, 50, "float64", 1, n_frames=4)
    g = ref_geo(eng)
    rpp = g.records_per_page
    rng = np.random.default_rng(9)
    keys = distinct_keys(rng, 2 * rpp)
    vals = random_values(rng, keys.shape[0], 50, "float64")
    eng.index.reserve(keys.shape[0])
    eng.index.count += call_write(eng, keys, vals)[1]
    assert eng.log.tail == g.nth_address(2 * rpp - 1) + g.record_bytes
    gone = keys[::3]
    absent = np.array([123456789, -987654321], np.int64)
    victims = np.concatenate([gone, absent, gone[:2]])  # absent keys, repeated deletes
    pos, removed = call_delete(eng, victims)
    eng.index.count -= removed
    assert (pos, removed) == (victims.shape[0], gone.shape[0])
    for j, k in enumerate(gone.tolist()):  # one tombstone per removed key, in order
        rec = record_at(eng, g.nth_address(2 * rpp + j))
        assert_record(rec, k, np.zeros(50), flags=R.FLAG_VALID | R.FLAG_TOMBSTONE)
    assert eng.log.tail == g.nth_address(2 * rpp + gone.shape[0] - 1) + g.record_bytes
    kept = np.array([k for k in keys.tolist() if k not in set(gone.tolist())], np.int64)
    assert (eng.index.lookup(gone) == -1).all()
    np.testing.assert_array_equal(
        eng.index.lookup(kept), [g.nth_address(j) for j in range(2 * rpp) if j % 3])
    R.check_index_invariants(eng.index.slot_keys, eng.index.slot_addrs)
    # stop: no frame beyond the open page; the deletes after its free records wait
    eng.log.marks[LK.M_LIMIT_PAGE] = eng.log.marks[LK.M_OPEN_PAGE]
    free = 3 * rpp - (2 * rpp + gone.shape[0])
    assert 0 < free < kept.shape[0]
    tail = eng.log.tail
    pos, removed = call_delete(eng, kept)
    assert pos == removed == free
    assert eng.log.tail == tail + free * g.record_bytes
    assert (eng.index.lookup(kept[pos:]) >= 0).all()
    assert (eng.index.lookup(kept[:pos]) == -1).all()
    eng.log._set_limit()
    pos2, removed2 = call_delete(eng, kept, pos)
    assert (pos2, removed2) == (kept.shape[0], kept.shape[0] - pos)
    assert (eng.index.slot_addrs == 0).all() and (eng.index.slot_keys == 0).all()
    assert call_delete(eng, np.empty(0, np.int64)) == (0, 0)


# ==================================================== read_resident / finish_cold set-up
class Regions:
    """A log of 5 full pages, 1-5 (page 0 is the hole): pages 1-2 on disk only (their frames
    scribbled over), page 3 and the first half of page 4 in memory but immutable, the rest
    mutable."""

    def __init__(self, tmp_path, policy="second_chance", name="log", dim=5, dtype="float32",
                 state_dim=2, seed=21):
        self.eng = eng = build_engine(tmp_path, dim, dtype, state_dim, n_frames=8,
                                      policy=policy, name=name)
        self.g = g = ref_geo(eng)
        rng = np.random.default_rng(seed)
        n = 5 * g.records_per_page
        self.keys = distinct_keys(rng, n)
        self.vals = random_values(rng, n, dim, dtype)
        eng.index.reserve(n)
        eng.index.count += call_write(eng, self.keys, self.vals)[1]
        # a non-zero optimizer state and a pending count of its own in every record, to see
        # them carried by copies (header bits 16..47 are reserved: they stay zero)
        log = eng.log
        assert n < 1 << R.PENDING_BITS
        for j in range(n):
            a = g.nth_address(j)
            f, off = (a >> 12) % 8, a & 4095
            log.words[f, off // 8] = (R.FLAG_VALID << R.FLAGS_SHIFT) | (j + 1)
            log.frames[f, off + g.state_offset:off + g.state_offset + 4 * state_dim] \
                .view(np.float32)[:] = j + 0.25
        assert g.nth_address(n - 1) >> 12 == R.FIRST_ADDRESS_PAGE + 4  # pages 1..5
        log.flush()
        log.marks[LK.M_HEAD] = (R.FIRST_ADDRESS_PAGE + 2) << 12
        log.marks[LK.M_READ_ONLY] = ((R.FIRST_ADDRESS_PAGE + 3) << 12) + \
            (g.records_per_page // 2) * g.record_bytes
        log._set_limit()
        for p in (R.FIRST_ADDRESS_PAGE, R.FIRST_ADDRESS_PAGE + 1):  # must come from disk, not
            log.frames[p % 8] = 0xEE                            # from these frames
        self.addr = {int(k): g.nth_address(j) for j, k in enumerate(self.keys)}
        self.value = {int(k): self.vals[j] for j, k in enumerate(self.keys)}
        self.state = {int(k): float(j) + 0.25 for j, k in enumerate(self.keys)}

    def batch(self, rng, n):
        missing = np.array([77, -77, I64_MIN + 5], np.int64)
        missing = missing[~np.isin(missing, self.keys)]
        ks = np.concatenate([rng.choice(self.keys, n), missing, self.keys[:3]])
        return rng.permutation(ks)


def expected_read(reg: Regions, keys, admit):
    """Reference for read_resident: per position the final address, the cold positions in
    order, and the copies (old address, new address) made to the tail."""
    eng, g = reg.eng, reg.g
    head, ro = eng.log.head, eng.log.read_only
    tail = eng.log.tail
    cur = dict(reg.addr)
    addrs, cold, copies = [], [], []
    for i, k in enumerate(keys.tolist()):
        if k not in cur:
            addrs.append(-1)
            continue
        a = cur[k]
        if a < head:
            admit(k)
            addrs.append(a)
            cold.append(i)
            continue
        if a < ro and admit(k):
            new = R.next_address(tail, g)
            tail = new + g.record_bytes
            copies.append((a, new))
            cur[k] = new
        addrs.append(cur[k])
    return addrs, cold, copies, cur, tail


def run_read_resident(reg, keys, policy_code):
    eng = reg.eng
    n = keys.shape[0]
    out = np.full((n, eng.layout.dim), np.nan, eng.dtype)
    addrs = np.full(n, -7, np.int64)
    cold_pos = np.full(n, -7, np.int64)
    stops = []
    pos, n_cold, n_absent = 0, 0, 0
    while True:
        pos, n_cold, n_absent = call_read_resident(eng, keys, pos, True, out, addrs, cold_pos,
                                                   n_cold, policy_code, n_absent)
        if pos == n:
            break
        stops.append(pos)
        eng.log.marks[LK.M_LIMIT_PAGE] += 1  # a free frame appears (head unchanged)
    # every absent key counted once, however often the pass stopped and resumed
    assert n_absent == int(np.count_nonzero(addrs < 0))
    return out, addrs, cold_pos[:n_cold], stops


@pytest.mark.parametrize("policy", ["second_chance", "fifo", "frequency"])
def test_read_resident_against_reference(tmp_path, policy):
    reg = Regions(tmp_path, policy)
    eng = reg.eng
    code = eng.policy.code
    rng = np.random.default_rng(4)
    keys = reg.batch(rng, 300)
    counters = [0] * eng.policy.counters.shape[0]

    def admit(k):
        if policy == "fifo":
            return False
        if policy == "second_chance":
            return True
        c = R.frequency_slot(k, len(counters))
        counters[c] = min(255, counters[c] + 1)
        return counters[c] >= 2

    exp_addrs, exp_cold, copies, cur, tail = expected_read(reg, keys, admit)
    before = {a: record_bytes_at(eng, a) for a, _ in copies}
    out, addrs, cold, stops = run_read_resident(reg, keys, code)
    assert stops == []
    assert addrs.tolist() == exp_addrs
    assert cold.tolist() == exp_cold
    assert eng.log.tail == tail
    if policy == "fifo":
        assert copies == []
    else:
        assert copies
    if policy == "frequency":
        assert eng.policy.counters.tolist() == counters
    for old, new in copies:  # whole record copied (header, key, values, state), old intact
        assert record_bytes_at(eng, new) == before[old]
        assert record_bytes_at(eng, old) == before[old]
    for i, k in enumerate(keys.tolist()):
        if exp_addrs[i] >= 0 and i not in exp_cold:
            np.testing.assert_array_equal(out[i], reg.value[k])
    for k, a in cur.items():
        assert addr_of(eng, k) == a
        assert_record(record_at(eng, a), k, reg.value[k], state_zero=False)
        assert (record_at(eng, a)["state"] == reg.state[k]).all()


def test_read_resident_without_values_and_empty(tmp_path):
    reg = Regions(tmp_path)
    eng = reg.eng
    keys = reg.batch(np.random.default_rng(1), 50)
    out = np.empty((0, 5), np.float32)
    addrs = np.empty(keys.shape[0], np.int64)
    cold = np.empty(keys.shape[0], np.int64)
    pos, n_cold, n_absent = call_read_resident(eng, keys, 0, False, out, addrs, cold, 0,
                                               LK.POLICY_FIFO, 3)
    exp_addrs, exp_cold, _, _, _ = expected_read(reg, keys, lambda k: False)
    assert pos == keys.shape[0] and addrs.tolist() == exp_addrs
    assert cold[:n_cold].tolist() == exp_cold
    assert exp_addrs.count(-1) > 0 and n_absent == 3 + exp_addrs.count(-1)
    e = np.empty(0, np.int64)
    assert call_read_resident(eng, e, 0, True, np.empty((0, 5), np.float32), e, e, 0,
                              LK.POLICY_SECOND_CHANCE) == (0, 0, 0)


def test_read_resident_stops_and_resumes_like_one_pass(tmp_path):
    """With the tail page full and no free frame, the first copy to the tail stops the pass;
    resumed once a frame is free, the result equals the reference for one whole pass."""
    reg = Regions(tmp_path)
    eng = reg.eng
    eng.log.marks[LK.M_LIMIT_PAGE] = eng.log.marks[LK.M_OPEN_PAGE]  # page 4 is full
    keys = reg.batch(np.random.default_rng(8), 400)
    exp_addrs, exp_cold, copies, cur, tail = expected_read(reg, keys, lambda k: True)
    out, addrs, cold, stops = run_read_resident(reg, keys, LK.POLICY_SECOND_CHANCE)
    first_copy = next(i for i, k in enumerate(keys.tolist())
                      if k in reg.addr and eng.log.head <= reg.addr[k] < eng.log.read_only)
    assert stops and stops[0] == first_copy
    assert len(stops) == len({new >> 12 for _, new in copies})  # one stop per page opened
    assert addrs.tolist() == exp_addrs and cold.tolist() == exp_cold
    assert eng.log.tail == tail
    for k, a in cur.items():
        assert addr_of(eng, k) == a
    for i, k in enumerate(keys.tolist()):
        if exp_addrs[i] >= 0 and i not in exp_cold:
            np.testing.assert_array_equal(out[i], reg.value[k])


def test_frequency_counter_counts_one_read_once_across_a_stop(tmp_path):
    """A read is counted once by the frequency policy, even when the kernel stops on it for
    want of a frame and is resumed: the module promises that a stop leaves no key changed."""
    reg = Regions(tmp_path, "frequency")
    eng = reg.eng
    k = int(reg.keys[2 * reg.g.records_per_page + 1])  # in [head, read_only)
    c = R.frequency_slot(k, eng.policy.counters.shape[0])
    eng.policy.counters[c] = 1  # read once before: this read makes it 2 and admits it
    eng.log.marks[LK.M_LIMIT_PAGE] = eng.log.marks[LK.M_OPEN_PAGE]
    _, addrs, _, stops = run_read_resident(reg, np.array([k], np.int64), LK.POLICY_FREQUENCY)
    assert stops == [0]
    # copied to the tail, on the page opened after the stop (the one after pages 1..5)
    assert addrs[0] == (R.FIRST_ADDRESS_PAGE + 5) << 12
    assert int(eng.policy.counters[c]) == 2


def gather_cold(eng, addrs, cold):
    """What ops.read hands finish_cold, with the records read by the reference reader."""
    g = ref_geo(eng)
    cold_addrs = addrs[cold]
    uniq, inv = np.unique(cold_addrs, return_inverse=True)
    rec = np.frombuffer(b"".join(R.read_record_file(eng.device.directory, int(a),
                                                    g.record_bytes, g.segment_bits)
                                 for a in uniq), np.uint8).reshape(len(uniq), g.record_bytes)
    return cold_addrs, rec.copy(), inv.astype(np.int64)


@pytest.mark.parametrize("policy", ["second_chance", "fifo"])
@pytest.mark.parametrize("limit_stop", [False, True])
def test_finish_cold_against_reference(tmp_path, policy, limit_stop):
    reg = Regions(tmp_path, policy)
    eng, g = reg.eng, reg.g
    code = eng.policy.code
    keys = reg.batch(np.random.default_rng(6), 300)
    out, addrs, cold, _ = run_read_resident(reg, keys, code)
    assert cold.shape[0] > 20
    cold_addrs, rec, inv = gather_cold(eng, addrs, cold)
    # one cold key is written after its read: finish_cold must not copy it over the write
    overwritten = int(keys[cold[0]])
    newer = random_values(np.random.default_rng(0), 1, 5, "float32")
    call_write(eng, np.array([overwritten], np.int64), newer)
    after_write = addr_of(eng, overwritten)
    tail = eng.log.tail
    if limit_stop:
        eng.log.marks[LK.M_LIMIT_PAGE] = eng.log.marks[LK.M_OPEN_PAGE]
    limit = int(eng.log.marks[LK.M_LIMIT_PAGE])
    # reference
    cur = {int(k): addr_of(eng, int(k)) for k in keys[cold]}
    copies = []
    expect_stop = None
    for c, i in enumerate(cold.tolist()):
        k = int(keys[i])
        if policy == "second_chance" and cur[k] == cold_addrs[c]:
            new = R.next_address(tail, g)
            tail = new + g.record_bytes
            copies.append((int(cold_addrs[c]), new, k))
            cur[k] = new
            if new >> 12 > limit and expect_stop is None:
                expect_stop = c
    pos, stops = 0, []
    while True:
        pos = call_finish_cold(eng, keys, cold, cold_addrs, rec, inv, pos, True, out, code)
        if pos == cold.shape[0]:
            break
        stops.append(pos)
        eng.log.marks[LK.M_LIMIT_PAGE] += 1
    assert (stops[0] if stops else None) == expect_stop
    if limit_stop and policy == "second_chance":
        assert stops
    for i in cold.tolist():
        k = int(keys[i])
        np.testing.assert_array_equal(out[i], reg.value[k])  # the value that was read
    assert eng.log.tail == tail
    assert addr_of(eng, overwritten) == after_write
    for old, new, k in copies:
        assert record_bytes_at(eng, new) == R.read_record_file(
            eng.device.directory, old, g.record_bytes, g.segment_bits)
        assert addr_of(eng, k) == new
    assert len({k for _, _, k in copies}) == len(copies)  # a repeated key is copied once
    for k, a in cur.items():
        assert addr_of(eng, k) == a


# =========================================================================== init_values
@given(keys=st.lists(int64s, max_size=20), seed=st.integers(0, R.MASK64),
       kind=st.sampled_from([0, 1, 2]), dim=st.integers(1, 9),
       scale=st.sampled_from([0.0, 0.01, 1.0, 3.5]),
       dtype=st.sampled_from(["float64", "float32"]))
@HSET
def test_init_values_against_reference(keys, seed, kind, dim, scale, dtype):
    k = np.array(keys, np.int64)
    out = np.full((k.shape[0], dim), np.nan, dtype)
    INK.init_values(k, np.uint64(seed), kind, scale, out)  # (a Python int: see test_init_seeds)
    expect = R.init_values(keys, seed, kind, scale, dim, dtype)
    if dtype == "float64":
        np.testing.assert_allclose(out, expect, rtol=4e-16, atol=4e-16 * scale)
    else:  # float64 results a few ulps apart may round to neighbouring float32 values
        np.testing.assert_array_max_ulp(out, expect, maxulp=1)


def test_init_values_deterministic_and_batch_independent():
    rng = np.random.default_rng(2)
    keys = np.concatenate([np.array(EXTREME_KEYS, np.int64),
                           rng.integers(I64_MIN, I64_MAX, 500, dtype=np.int64)])
    for kind in (0, 1):
        a = np.empty((keys.shape[0], 16), np.float32)
        INK.init_values(keys, 42, kind, 0.5, a)
        perm = rng.permutation(keys.shape[0])
        b = np.empty_like(a)
        INK.init_values(keys[perm], 42, kind, 0.5, b)
        np.testing.assert_array_equal(b, a[perm])
        c = np.empty((1, 16), np.float32)
        INK.init_values(keys[7:8], 42, kind, 0.5, c)
        np.testing.assert_array_equal(c[0], a[7])
        d = np.empty_like(a)
        INK.init_values(keys, 43, kind, 0.5, d)
        assert (d != a).mean() > 0.99  # another seed, other rows
        rows = {tuple(r) for r in a.tolist()}
        assert len(rows) == keys.shape[0]  # other keys, other rows


def test_init_values_distribution():
    keys = np.arange(-20000, 20000, dtype=np.int64)
    u = np.empty((keys.shape[0], 8), np.float64)
    INK.init_values(keys, 0, 0, 0.25, u)
    assert u.min() >= -0.25 and u.max() < 0.25
    assert abs(u.mean()) < 0.002 and abs(u.std() - 0.25 / np.sqrt(3)) < 0.002
    n = np.empty_like(u)
    INK.init_values(keys, 0, 1, 2.0, n)
    assert abs(n.mean()) < 0.02 and abs(n.std() - 2.0) < 0.02
    z = np.full_like(u, 5.0)
    INK.init_values(keys, 0, 2, 2.0, z)
    assert (z == 0).all()


# ========================================================================== read_records
_RR_PARAMS = inspect.signature(DK.read_records.py_func).parameters


def read_records(fds, segment_bits, addrs, record_bytes, block, max_run, scratch, out,
                 drop_cache=False):
    """Call the kernel; ``drop_cache`` only where the kernel takes it (it is being added)."""
    extra = (drop_cache,) if "drop_cache" in _RR_PARAMS else ()
    return DK.read_records(fds, segment_bits, addrs, record_bytes, block, max_run, scratch,
                           out, *extra)


def make_segments(directory, segment_bits, n_segments, rng, sizes=None):
    seg_bytes = 1 << segment_bits
    fds = np.full(n_segments + 2, -1, np.int32)
    for s in range(n_segments):
        size = seg_bytes if sizes is None else sizes[s]
        with open(R.segment_path(directory, s), "wb") as f:
            f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        fds[s] = os.open(R.segment_path(directory, s), os.O_RDONLY)
    return fds


def random_addrs(rng, n, record_bytes, segment_bits, n_segments):
    """Sorted unique record addresses, about half of them next to another one (so reads
    of touching blocks can merge); no record crosses the end of its segment."""
    slots = (1 << segment_bits) // record_bytes
    n = min(n, slots * n_segments)
    picks = set()
    while len(picks) < n:
        if picks and rng.random() < 0.5:
            s, k = max(picks) if rng.random() < 0.5 else min(picks)
            k = min(slots - 1, k + int(rng.integers(1, 4)))
        else:
            s, k = int(rng.integers(0, n_segments)), int(rng.integers(0, slots))
        picks.add((s, k))
    return np.array(sorted((s << segment_bits) + k * record_bytes for s, k in picks),
                    np.int64)


def guarded_scratch(max_run, block=4096, guard=1 << 16):
    buf = aligned_empty(max_run + 2 * block + guard)
    buf[:] = 0xCD
    return buf, buf[:max_run + 2 * block]


@pytest.mark.parametrize("record_bytes", [8, 40, 424, 4096, 6000])
@pytest.mark.parametrize("max_run", [8192, 1 << 20])
@pytest.mark.parametrize("block", [512, 4096])
def test_read_records_against_file_reads(tmp_path, record_bytes, max_run, block):
    rng = np.random.default_rng(record_bytes + max_run + block)
    segment_bits, n_seg = 16, 3
    fds = make_segments(str(tmp_path), segment_bits, n_seg, rng)
    try:
        for trial in range(4):
            addrs = random_addrs(rng, int(rng.integers(1, 60)), record_bytes, segment_bits,
                                 n_seg)
            out = np.full((addrs.shape[0], record_bytes), 0x99, np.uint8)
            buf, scratch = guarded_scratch(max_run, block)
            args = (fds, segment_bits, addrs, record_bytes, block, max_run, scratch, out)
            drop = bool(trial % 2)
            read_records(*args, drop_cache=drop)  # warm: the first call loads the kernel
            r0 = R.read_syscalls()
            overhead = R.read_syscalls() - r0  # what reading /proc/self/io itself costs
            r1 = R.read_syscalls()
            out[:] = 0x99
            got = read_records(*args, drop_cache=drop)
            preads = R.read_syscalls() - r1 - overhead
            for i, a in enumerate(addrs.tolist()):
                assert bytes(out[i]) == R.read_record_file(str(tmp_path), a, record_bytes,
                                                           segment_bits)
            blocks = R.read_blocks_touched(addrs.tolist(), record_bytes, block, segment_bits)
            runs = R.count_runs(addrs.tolist(), record_bytes, block, segment_bits)
            if max_run >= 1 << 20:
                assert got == blocks * block  # each touched block read once, nothing else
                assert preads == runs  # one pread per stretch of touching blocks
            else:
                assert blocks * block <= got <= (blocks + addrs.shape[0]) * block
                assert runs <= preads <= addrs.shape[0]
            assert (buf[scratch.shape[0]:] == 0xCD).all()
    finally:
        for fd in fds[fds >= 0]:
            os.close(int(fd))


@pytest.mark.parametrize("record_bytes,max_run", [
    (16384, 8192),
    # what FileDevice allocates and passes, and a record of dim 18432 float32 (page_bits 17)
    (16 + 4 * 18432, device_mod.MAX_RUN_BYTES),
])
def test_read_records_never_writes_past_its_scratch(tmp_path, record_bytes, max_run):
    """The docstring sizes ``scratch`` as max_run_bytes plus two blocks; a record larger than
    max_run_bytes must not make the kernel pread past that."""
    rng = np.random.default_rng(0)
    fds = make_segments(str(tmp_path), 17, 1, rng)
    try:
        addrs = np.array([8], np.int64)
        out = np.zeros((1, record_bytes), np.uint8)
        buf, scratch = guarded_scratch(max_run)
        try:
            got = read_records(fds, 17, addrs, record_bytes, 4096, max_run, scratch, out)
        except ValueError:  # today: pread has overrun scratch, then the copy-out fails
            got = None
        assert (buf[scratch.shape[0]:] == 0xCD).all(), "pread wrote past the scratch buffer"
        assert got is not None
        assert got < 0 or bytes(out[0]) == R.read_record_file(str(tmp_path), 8,
                                                             record_bytes, 17)
    finally:
        os.close(int(fds[0]))


def test_read_records_short_read_is_negative(tmp_path):
    rng = np.random.default_rng(1)
    sb = 16
    fds = make_segments(str(tmp_path), sb, 2, rng, sizes=[1 << 16, 20000])  # 2nd truncated
    try:
        rb = 40
        ok = [100 * 8, 5000 * 8, (1 << sb) + 80]
        bad = (1 << sb) + 30000
        addrs = np.array(sorted(ok + [bad, (1 << sb) + 50000]), np.int64)
        out = np.zeros((addrs.shape[0], rb), np.uint8)
        _, scratch = guarded_scratch(1 << 18)
        got = read_records(fds, sb, addrs, rb, 4096, 1 << 18, scratch, out)
        assert got == -(1 + addrs.tolist().index(bad))
        # a segment with no open file
        addrs = np.array([8, (3 << sb) + 8], np.int64)
        got = read_records(fds, sb, addrs, rb, 4096, 1 << 18, scratch, out[:2])
        assert got == -2
        e = np.empty(0, np.int64)
        assert read_records(fds, sb, e, rb, 4096, 1 << 18, scratch, out[:0]) == 0
    finally:
        for fd in fds[fds >= 0]:
            os.close(int(fd))


def test_file_device_read_records_threads(tmp_path):
    """The wrapper splits a batch over threads; rows come back in address order."""
    rng = np.random.default_rng(3)
    sb = 16
    dev = FileDevice(str(tmp_path), 12, sb, io_threads=4)
    pages = [aligned_empty(4096) for _ in range(40)]
    for p in pages:
        p[:] = rng.integers(0, 256, 4096, dtype=np.uint8)
    dev.write_pages(0, pages)  # spans 3 segments of 16 pages
    try:
        addrs = random_addrs(rng, 500, 40, sb, 2)
        recs = dev.read_records(addrs, 40)
        for i, a in enumerate(addrs.tolist()):
            assert bytes(recs[i]) == R.read_record_file(str(tmp_path), a, 40, sb)
    finally:
        dev.close()


# ============================================= ops: batches larger than the whole buffer pool
def check_engine(eng, model):
    """Every key of the model has its newest record where the index points, as the layout
    draws it; the markers are ordered and the pool is bounded."""
    log = eng.log
    assert ref_geo(eng).first_address == log.begin <= log.head <= log.read_only <= log.tail
    assert log._open_page() - (log.head >> eng.layout.page_bits) < log.n_frames
    assert eng.index.count == len(model)
    keys, addrs = eng.index.entries()
    assert set(keys.tolist()) == set(model)
    assert (addrs >= log.begin).all()  # nothing at address 0, nor anywhere in the hole
    for k, a in zip(keys.tolist(), addrs.tolist()):
        assert_record(record_at(eng, a), k, model[k])
    R.check_index_invariants(eng.index.slot_keys, eng.index.slot_addrs)


@pytest.mark.parametrize("policy", ["second_chance", "fifo", "frequency"])
@pytest.mark.parametrize("dim,dtype,state_dim", GEOMETRIES[:3])
def test_ops_batches_bigger_than_the_pool(tmp_path, policy, dim, dtype, state_dim):
    eng = build_engine(tmp_path, dim, dtype, state_dim, n_frames=4, policy=policy)
    g = ref_geo(eng)
    rng = np.random.default_rng(["second_chance", "fifo", "frequency"].index(policy) * 1000 + dim)
    pool_records = 4 * g.records_per_page
    universe = distinct_keys(rng, 3 * pool_records)
    model = {}
    evictions = []
    make_room = eng.log.make_room
    eng.log.make_room = lambda: (evictions.append(1), make_room())[1]
    for step in range(6):
        # more distinct keys than the pool and its mutable part hold, then some repeats
        distinct = rng.permutation(universe)[:int(rng.uniform(2.0, 3.0) * pool_records)]
        keys = np.concatenate([distinct, rng.choice(distinct, 100)])  # the last one wins
        keys = keys[rng.permutation(keys.shape[0])]
        n = keys.shape[0]
        vals = random_values(rng, n, dim, dtype)
        del evictions[:]
        ops.upsert(eng, keys, vals)
        assert evictions  # the kernel stopped for want of a frame and was resumed
        for k, v in zip(keys.tolist(), vals):
            model[k] = v
        if step % 2:
            dels = rng.choice(universe, pool_records + 5)
            removed = ops.delete(eng, dels)
            gone = set(dels.tolist()) & set(model)
            assert removed == len(gone)
            for k in gone:
                del model[k]
        probe = rng.choice(universe, 2 * pool_records + 7)
        del evictions[:]
        out, addrs = ops.read(eng, probe)
        if policy != "frequency":  # fifo never copies a read; second_chance copies many
            assert bool(evictions) == (policy == "second_chance")
        for i, k in enumerate(probe.tolist()):
            if k in model:
                assert addrs[i] >= 0
                np.testing.assert_array_equal(out[i], model[k])
            else:
                assert addrs[i] == -1
        check_engine(eng, model)
    ops.lookahead(eng, universe)
    check_engine(eng, model)
    allk = np.array(sorted(model), np.int64)
    out, _ = ops.read(eng, allk)
    np.testing.assert_array_equal(out, np.array([model[k] for k in allk.tolist()]))


def test_create_missing_uses_the_initializer(tmp_path):
    eng = build_engine(tmp_path, 6, "float32", 0, n_frames=4)
    rng = np.random.default_rng(5)
    present = distinct_keys(rng, 300)
    ops.upsert(eng, present, np.ones((300, 6), np.float32))
    keys = np.concatenate([present[:100], rng.integers(I64_MIN, I64_MAX, 400, dtype=np.int64)])
    keys = np.concatenate([keys, keys[:50]])
    created = ops.create_missing(eng, keys, 1, 0.1, 9)
    new = sorted(set(keys.tolist()) - set(present.tolist()))
    assert created == len(new)
    out, _ = ops.read(eng, np.array(new, np.int64))
    np.testing.assert_array_max_ulp(out, R.init_values(new, 9, 1, 0.1, 6, np.float32), 1)
    out, _ = ops.read(eng, present[:100])
    assert (out == 1).all()


def test_store_records_bytes_through_public_api(tmp_path):
    """Drive mlkv.open with a pool of 4 pages and read the bytes of every record back with
    plain file reads (after close, everything is on disk)."""
    path = os.path.join(str(tmp_path), "s")
    rng = np.random.default_rng(17)
    keys = distinct_keys(rng, 2000)
    vals = random_values(rng, 2000, 7, "float64")
    with mlkv.open(path, auto_compact=None, dim=7, dtype="float64", state_dim=1, page_bits=12,
                   memory_bytes=4 * 4096, segment_bits=14) as store:
        store.put(keys, vals)
        store.put(keys[:500], vals[500:1000])  # overwrites, many of them RCU
        store.delete(keys[1500:])
        eng = store.engine
        assert eng.log.head > ref_geo(eng).first_address  # pages were evicted
        expect = {int(k): vals[i] for i, k in enumerate(keys[:1500])}
        expect.update({int(k): vals[500 + i] for i, k in enumerate(keys[:500])})
        got = store.get(keys[:1500])
        np.testing.assert_array_equal(got, np.array([expect[int(k)] for k in keys[:1500]]))
        ik, ia = eng.index.entries()
        g = ref_geo(eng)
    for k, a in zip(ik.tolist(), ia.tolist()):
        rec = R.decode_record(R.read_record_file(path, a, g.record_bytes, 14), g)
        assert_record(rec, k, expect[k])
    # page 0 of segment 0 is the hole: never written, it reads as zeros
    with open(R.segment_path(path, 0), "rb") as f:
        assert not any(f.read(4096))
    # a tombstone for each deleted key is in the log, after the key's last record
    tombs = 0
    for seg in sorted(os.listdir(path)):
        if not seg.startswith("segment-"):
            continue
        with open(os.path.join(path, seg), "rb") as f:
            data = f.read()
        for p in range(0, len(data), 4096):
            for r in range(g.records_per_page):
                rec = R.decode_record(data[p + r * g.record_bytes:
                                           p + (r + 1) * g.record_bytes], g)
                if rec["flags"] & R.FLAG_TOMBSTONE:
                    tombs += 1
                    assert rec["key"] in set(keys[1500:].tolist())
    assert tombs == 500


def test_float16_store_roundtrip(tmp_path):
    """float16 is one of the three dtypes a store offers (issue 2). Rows go through the
    kernels as numpy float16 arrays; put / get / get_or_init must work and lay the record
    out as the diagram draws it (here with a 2-byte gap between values and state)."""
    path = os.path.join(str(tmp_path), "h")
    rng = np.random.default_rng(4)
    keys = distinct_keys(rng, 600)
    vals = random_values(rng, 600, 7, "float16")
    with mlkv.open(path, dim=7, dtype="float16", state_dim=1, page_bits=12,
                   memory_bytes=4 * 4096, segment_bits=14, init="normal", init_scale=0.5,
                   seed=3) as store:
        store.put(keys, vals)
        np.testing.assert_array_equal(store.get(keys), vals)
        fresh = np.array([11, -11, I64_MAX, I64_MAX - 1], np.int64)
        fresh = fresh[~np.isin(fresh, keys)]          # get_or_init of a present key is a get
        assert fresh.shape[0] >= 2
        np.testing.assert_array_max_ulp(
            store.get_or_init(fresh), R.init_values(fresh.tolist(), 3, 1, 0.5, 7, "float16"),
            maxulp=1)
        ik, ia = store.engine.index.entries()
        g = ref_geo(store.engine)
    assert g.state_offset - (16 + 7 * 2) == 2
    expect = {int(k): vals[i] for i, k in enumerate(keys)}
    for k, a in zip(ik.tolist(), ia.tolist()):
        rec = R.decode_record(R.read_record_file(path, a, g.record_bytes, 14), g)
        assert_record(rec, k, expect.get(k))


def test_flushed_records_carry_their_checksum(tmp_path):
    """layout.py / _checksum_kernels.py: every record on disk holds, in header bits 16..47,
    the reference checksum of its words and address; written in place, copied to the tail,
    and tombstones alike. A page flushed again (the tail page) keeps its records' checksums."""
    eng = build_engine(tmp_path, n_frames=8)
    g = ref_geo(eng)
    k = np.array([42], np.int64)
    addresses = []
    for step in range(3):  # in place
        ops.upsert(eng, k, np.full((1, 5), step, np.float32))
    addresses.append(addr_of(eng, 42))
    eng.log.flush()
    eng.log.marks[LK.M_READ_ONLY] = eng.log.tail  # the next write copies to the tail
    ops.upsert(eng, k, np.full((1, 5), 9, np.float32))
    addresses.append(addr_of(eng, 42))
    ops.delete(eng, np.array([42], np.int64))
    addresses.append(eng.log.tail - g.record_bytes)      # the tombstone
    rng = np.random.default_rng(3)
    keys = distinct_keys(rng, 3 * g.records_per_page)
    ops.upsert(eng, keys, random_values(rng, keys.shape[0], 5, "float32"))
    addresses += [addr_of(eng, int(key)) for key in keys[::7]]
    eng.log.flush()
    for a in addresses:
        raw = R.read_record_file(str(tmp_path / "log"), a, g.record_bytes, g.segment_bits)
        rec = R.decode_record(raw, g)
        assert rec["flags"] & R.FLAG_VALID
        assert rec["checksum"] == R.record_checksum(raw, a), a


def test_init_seeds(tmp_path):
    """Every seed the settings accept gives the reference rows. init_values types the seed as
    uint64; a Python int seed >= 2**63 passed to it after an int64 one (any store with a
    small seed, earlier in the process) raises OverflowError in Numba's dispatcher."""
    for i, seed in enumerate([1, 1 << 63, (1 << 64) - 1, 1 << 64]):
        try:
            store = mlkv.open(os.path.join(str(tmp_path), str(i)), dim=3, seed=seed,
                              page_bits=12, memory_bytes=4 * 4096, init_scale=0.5)
        except (ValueError, TypeError):
            assert seed >= 1 << 64  # refusing a seed beyond uint64 at open is fine
            continue
        with store:
            out = store.get_or_init([1, -1])
        expect = R.init_values([1, -1], seed % (1 << 64), 0, 0.5, 3, np.float32)
        np.testing.assert_array_max_ulp(out, expect, maxulp=1)
