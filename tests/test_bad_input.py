"""Bad input gets a clear exception of a documented type, and the store keeps every row it had.

Documented types (mlkv/errors.py): ``TypeError`` for a wrong dtype or type, ``ValueError`` for a
wrong shape or value, ``KeyError`` for keys missing in ``get``; errors about the store itself
are subclasses of ``mlkv.MlkvError``. After every error the tests read the whole store back and
compare it with the rows written before.

The store used here has a buffer pool of 4 pages of 4 KiB and three times more rows than fit,
so that the rows checked after each error come from memory and from disk.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mlkv

DIM = 4
PAGE_BITS = 12
MEMORY = 4 << PAGE_BITS
N_ROWS = 1500                      # 128 records of 32 bytes a page: ~3x the buffer pool
KEYS = (np.arange(N_ROWS, dtype=np.int64) - N_ROWS // 2) * 7919 + 1_000_003   # some < 0
ABSENT = 10**12                    # no key of the store is >= this


def make_values(keys, dim=DIM, dtype=np.float32):
    """Rows that differ per key and column, exactly representable in float16/32/64."""
    return ((keys[:, None] % 1000) * 0.25 + np.arange(dim)[None, :] * 0.125 + 0.5).astype(dtype)


VALUES = make_values(KEYS)
assert not np.isin(KEYS, np.arange(-100, 100)).any()    # small numbers in messages are no keys


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def store(path):
    s = mlkv.open(path, dim=DIM, page_bits=PAGE_BITS, memory_bytes=MEMORY, policy="fifo")
    s.put(KEYS, VALUES)
    assert s.stats()["addresses"]["head"] > 0, "the fixture should have rows on disk"
    yield s
    s.close()


@pytest.fixture
def closed_store(store):
    """The path of the fixture's store, made durable and closed."""
    store.close()
    return store.path


def assert_intact(s, keys=KEYS, values=VALUES):
    """The store holds exactly ``keys`` -> ``values``."""
    assert len(s) == keys.shape[0]
    np.testing.assert_array_equal(np.sort(s.keys()), np.sort(keys))
    np.testing.assert_array_equal(s.get(keys), values)
    got_keys, got_values = zip(*s.items(batch=500))
    got_keys, got_values = np.concatenate(got_keys), np.concatenate(got_values)
    order = np.argsort(got_keys)
    np.testing.assert_array_equal(got_keys[order], np.sort(keys))
    np.testing.assert_array_equal(got_values[order], values[np.argsort(keys)])


def reopen_intact(path):
    with mlkv.open(path) as s:
        assert_intact(s)


# ---- keys ------------------------------------------------------------------------------------

def key_ops(s):
    """Every operation that takes keys, as ``name -> f(keys)``."""
    return {
        "put": lambda k: s.put(k, np.zeros((np.asarray(k).reshape(-1).shape[0], DIM))),
        "get": s.get,
        "get_or_init": s.get_or_init,
        "contains": s.contains,
        "delete": s.delete,
        "lookahead": s.lookahead,
    }


OPS = ["put", "get", "get_or_init", "contains", "delete", "lookahead"]

BAD_KEYS_TYPE = {
    "float array": np.array([1.0, 2.0]),
    "float array of a present key": KEYS[:3].astype(np.float64),
    "float list": [KEYS[0] + 0.5],
    "float32 array": np.array([1.5], dtype=np.float32),
    "object array": np.array([KEYS[0], "a"], dtype=object),
    "object array of ints": np.array([int(KEYS[0]), int(KEYS[1])], dtype=object),
    "str list": ["1", "2"],
    "bytes": np.array([b"ab"]),
    "bool array": np.array([True, False]),
    "complex array": np.array([1 + 0j]),
    "python int past int64 (object)": [2**64],
}
BAD_KEYS_SHAPE = {
    "2-D array": KEYS[:4].reshape(2, 2),
    "2-D list": [[int(KEYS[0])], [int(KEYS[1])]],
    "3-D array": KEYS[:8].reshape(2, 2, 2),
    "empty 2-D array": np.empty((0, 2), dtype=np.int64),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", list(BAD_KEYS_TYPE))
def test_keys_of_wrong_type(store, op, bad):
    with pytest.raises(TypeError, match="key"):
        key_ops(store)[op](BAD_KEYS_TYPE[bad])
    assert_intact(store)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", list(BAD_KEYS_SHAPE))
def test_keys_of_wrong_shape(store, op, bad):
    with pytest.raises(ValueError, match="1-D|shape|dimension"):
        key_ops(store)[op](BAD_KEYS_SHAPE[bad])
    assert_intact(store)


@pytest.mark.parametrize("op", OPS)
def test_scalar_or_none_keys(store, op):
    for bad in (int(KEYS[0]), np.int64(KEYS[0]), None):
        with pytest.raises((TypeError, ValueError)):
            key_ops(store)[op](bad)
    assert_intact(store)


@pytest.mark.parametrize("op", OPS)
def test_uint64_keys_beyond_int64(store, op):
    """uint64 values that do not fit int64 are refused, not wrapped to negative keys."""
    bad = np.array([1, 2**63 + 5], dtype=np.uint64)
    with pytest.raises(ValueError, match="int64"):
        key_ops(store)[op](bad)
    assert_intact(store)
    assert not store.contains([-(2**63) + 5])[0]


# ---- values ----------------------------------------------------------------------------------

BAD_VALUES_SHAPE = {
    "one column too many": lambda n: np.zeros((n, DIM + 1)),
    "one column too few": lambda n: np.zeros((n, DIM - 1)),
    "one row too many": lambda n: np.zeros((n + 1, DIM)),
    "one row too few": lambda n: np.zeros((n - 1, DIM)),
    "1-D": lambda n: np.zeros(n * DIM),
    "transposed": lambda n: np.zeros((DIM, n)),
    "3-D": lambda n: np.zeros((n, DIM, 1)),
    "scalar": lambda n: 1.0,
    "list of short rows": lambda n: [[0.0] * (DIM - 1)] * n,
}
BAD_VALUES_TYPE = {
    "object array": lambda n: np.array([[object()] * DIM] * n, dtype=object),
    "object array of floats": lambda n: np.zeros((n, DIM)).astype(object),
    "str array": lambda n: np.full((n, DIM), "1.0"),
    "str list": lambda n: [["1"] * DIM] * n,
    "complex": lambda n: np.zeros((n, DIM), dtype=np.complex128),
    "None": lambda n: None,
}


@pytest.mark.parametrize("bad", list(BAD_VALUES_SHAPE))
@pytest.mark.parametrize("n", [1, 5])
def test_values_of_wrong_shape(store, bad, n):
    # keys both present (updates) and new
    keys = np.concatenate([KEYS[:n - n // 2], ABSENT + np.arange(n // 2)])
    with pytest.raises(ValueError, match="shape"):
        store.put(keys, BAD_VALUES_SHAPE[bad](n))
    assert_intact(store)


@pytest.mark.parametrize("bad", list(BAD_VALUES_TYPE))
def test_values_of_wrong_type(store, bad):
    keys = np.array([KEYS[0], KEYS[-1], ABSENT])
    with pytest.raises(TypeError, match="values"):
        store.put(keys, BAD_VALUES_TYPE[bad](3))
    assert_intact(store)


@pytest.mark.parametrize("hyper, error, match", [
    (np.zeros(3), ValueError, r"hyper must have shape \(7,\)"),
    (np.zeros((7, 1)), ValueError, r"hyper must have shape \(7,\)"),
    (np.zeros(7, np.float32), None, None),               # converted, as any numbers
    ("lr", ValueError, "could not convert"),
])
def test_update_bad_hyper_after_good_updates(store, hyper, error, match):
    """A bad options vector is refused even after good updates of the same rule and store
    (whose checks are remembered), and writes nothing."""
    from mlkv.engine._rule_kernels import hyper_vector
    keys, grads = KEYS[:4], np.ones((4, DIM), np.float32)
    for step in (1, 2):
        store.update(keys, grads, "sgd", hyper_vector("sgd", lr=0.5, step=step))
    before = store.get(KEYS)
    if error is None:
        store.update(keys, grads, "sgd", hyper)   # lr 0: the rows stay
    else:
        with pytest.raises(error, match=match):
            store.update(keys, grads, "sgd", hyper)
    np.testing.assert_array_equal(store.get(KEYS), before)
    with pytest.raises(TypeError, match="values must be numbers"):
        store.update(keys, np.full((4, DIM), "x"), "sgd", hyper_vector("sgd", lr=0.5))
    np.testing.assert_array_equal(store.get(KEYS), before)


def test_bad_keys_with_good_values_write_nothing(store):
    with pytest.raises(TypeError):
        store.put(np.array([ABSENT, 1.5]), np.ones((2, DIM)))
    assert_intact(store)
    assert not store.contains([ABSENT])[0]


# ---- missing keys ----------------------------------------------------------------------------

def message_ints(exc) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", str(exc.value.args[0]))]


def test_get_missing_keys_names_ten_and_counts(store):
    missing = ABSENT + 1000 + 37 * np.arange(15)
    batch = np.concatenate([KEYS[:10], missing[:8], KEYS[-5:], missing[8:]])
    with pytest.raises(KeyError) as info:
        store.get(batch)
    message = str(info.value.args[0])
    ints = message_ints(info)
    named = [k for k in ints if k in set(missing.tolist())]
    assert 1 <= len(named) <= 10 and len(named) == len(set(named)) == 10, message
    assert 15 in ints, f"the message should say how many keys are missing: {message}"
    assert not set(ints) & set(KEYS.tolist()), f"present keys named as missing: {message}"
    assert_intact(store)


def test_get_few_missing_keys_names_all(store):
    missing = [ABSENT + 5, -ABSENT - 7, ABSENT + 9]
    batch = np.array([KEYS[3], missing[0], KEYS[700], missing[1], missing[2], KEYS[-1]])
    with pytest.raises(KeyError) as info:
        store.get(batch)
    message = str(info.value.args[0])
    for k in missing:
        assert str(k) in message, message
    assert 3 in message_ints(info), message
    assert_intact(store)


def test_get_deleted_key(store):
    assert store.delete(KEYS[:1]) == 1
    with pytest.raises(KeyError, match=str(KEYS[0])):
        store.get(KEYS[:3])
    assert_intact(store, KEYS[1:], VALUES[1:])


def test_get_missing_key_changes_nothing_even_when_repeated(store):
    with pytest.raises(KeyError):
        store.get(np.array([ABSENT, ABSENT, KEYS[0], ABSENT]))
    assert not store.contains([ABSENT])[0]
    assert_intact(store)


# ---- closed store ----------------------------------------------------------------------------

def test_closed_store(store):
    store.close()
    store.close()                               # idempotent
    calls = {
        **{name: (lambda f: lambda: f(KEYS[:2]))(f) for name, f in key_ops(store).items()},
        "len": lambda: len(store),
        "keys": store.keys,
        "items": lambda: list(store.items()),
        "stats": store.stats,
        "checkpoint": store.checkpoint,
        "in": lambda: KEYS[0] in store,
        "empty get": lambda: store.get(np.empty(0, dtype=np.int64)),
    }
    for name, call in calls.items():
        with pytest.raises(mlkv.ClosedStoreError):
            call()
    assert issubclass(mlkv.ClosedStoreError, mlkv.MlkvError)
    assert "closed" in repr(store)
    reopen_intact(store.path)


def test_context_manager_closes(path):
    with mlkv.open(path, dim=DIM, page_bits=PAGE_BITS, memory_bytes=MEMORY) as s:
        s.put(KEYS, VALUES)
    with pytest.raises(mlkv.ClosedStoreError):
        s.get(KEYS[:1])
    reopen_intact(path)


# ---- open: paths and settings ----------------------------------------------------------------

def test_path_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"not a store")
    with pytest.raises(NotADirectoryError):
        mlkv.open(f, dim=DIM)
    with pytest.raises(NotADirectoryError):
        mlkv.open(f)
    assert f.read_bytes() == b"not a store"
    with pytest.raises(NotADirectoryError):
        mlkv.open(f / "sub", dim=DIM)


@pytest.mark.parametrize("dim, error", [(0, ValueError), (-1, ValueError), (-64, ValueError),
                                        (1.5, TypeError), ("4", TypeError), (4.0, TypeError),
                                        (True, TypeError), ([4], TypeError)])
def test_bad_dim(path, dim, error):
    with pytest.raises(error, match="dim"):
        mlkv.open(path, dim=dim)
    # nothing half-made is left behind: the path can still become a store
    with mlkv.open(path, dim=DIM) as s:
        assert s.dim == DIM and len(s) == 0


@pytest.mark.parametrize("memory_bytes, error", [(0, ValueError), (-1, ValueError),
                                                 (-(1 << 20), ValueError), (1.5, TypeError),
                                                 ("1000000", TypeError), (1, ValueError),
                                                 (3 << PAGE_BITS, ValueError)])
def test_bad_memory_bytes(path, memory_bytes, error):
    with pytest.raises(error, match="memory_bytes"):
        mlkv.open(path, dim=DIM, page_bits=PAGE_BITS, memory_bytes=memory_bytes)
    with mlkv.open(path, dim=DIM, page_bits=PAGE_BITS, memory_bytes=MEMORY) as s:
        s.put(KEYS, VALUES)
    # and on reopen of an existing store
    with pytest.raises(error, match="memory_bytes"):
        mlkv.open(path, memory_bytes=memory_bytes)
    reopen_intact(path)


@pytest.mark.parametrize("kwargs, error", [
    (dict(dtype="int32"), TypeError), (dict(dtype="float128"), TypeError),
    (dict(dtype="banana"), TypeError), (dict(state_dim=-1), ValueError),
    (dict(init="xavier"), ValueError), (dict(init_scale=-1.0), ValueError),
    (dict(init_scale=float("nan")), ValueError), (dict(seed=-1), ValueError),
    (dict(policy="lru"), ValueError), (dict(page_bits=11), ValueError),
])
def test_bad_settings(path, kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        mlkv.open(path, dim=DIM, **kwargs)
    with mlkv.open(path, dim=DIM) as s:
        assert len(s) == 0


def test_no_dim_for_a_new_store(path):
    with pytest.raises(ValueError, match="dim"):
        mlkv.open(path)
    with pytest.raises(FileNotFoundError):
        mlkv.open(path, readonly=True)
    with mlkv.open(path, dim=DIM) as s:
        assert len(s) == 0


def test_numpy_integer_settings_work(path):
    """Settings given as numpy scalars (e.g. read from an array) are accepted and persisted."""
    with mlkv.open(path, dim=np.int64(DIM), state_dim=np.int32(2), seed=np.uint8(3),
                   page_bits=np.int64(PAGE_BITS), memory_bytes=np.int64(MEMORY),
                   init_scale=np.float32(0.5)) as s:
        s.put(KEYS, VALUES)
    with mlkv.open(path, dim=DIM, state_dim=2, seed=3) as s:
        assert (s.dim, s.state_dim, s.settings.seed) == (DIM, 2, 3)
        assert_intact(s)


@pytest.mark.parametrize("setting, value", [("dim", DIM + 1), ("dim", 1), ("dtype", "float64"),
                                            ("dtype", "float16"), ("state_dim", 2),
                                            ("page_bits", PAGE_BITS + 1), ("seed", 7),
                                            ("init", "zeros")])
def test_reopen_with_other_settings(closed_store, setting, value):
    with pytest.raises(mlkv.SettingsMismatchError, match=setting) as info:
        mlkv.open(closed_store, **{setting: value})
    assert isinstance(info.value, mlkv.MlkvError)
    # the same settings spelled otherwise are no mismatch, and the store is intact
    with mlkv.open(closed_store, dim=DIM, dtype=np.float32, state_dim=0) as s:
        assert_intact(s)
    with mlkv.open(closed_store, dtype="f4") as s:
        assert_intact(s)


def test_second_writer_in_this_process(store):
    with pytest.raises(mlkv.StoreLockedError):
        mlkv.open(store.path)
    with pytest.raises(mlkv.StoreLockedError):
        mlkv.open(store.path, dim=DIM)
    assert issubclass(mlkv.StoreLockedError, mlkv.MlkvError)
    # the first writer goes on; a reader beside it works
    store.put(KEYS[:5], VALUES[:5])
    assert_intact(store)
    store.checkpoint()
    with mlkv.open(store.path, readonly=True) as ro:
        assert_intact(ro)
        with pytest.raises(mlkv.ReadOnlyError):
            ro.put(KEYS[:1], VALUES[:1])
        with pytest.raises(mlkv.ReadOnlyError):
            ro.delete(KEYS[:1])
        with pytest.raises(mlkv.ReadOnlyError):
            ro.get_or_init([ABSENT])
        with pytest.raises(mlkv.ReadOnlyError):
            ro.checkpoint()
        assert_intact(ro)
    store.close()
    reopen_intact(store.path)


def test_second_writer_in_another_process(store):
    store.checkpoint()
    code = textwrap.dedent(f"""
        import mlkv
        try:
            mlkv.open({store.path!r})
        except mlkv.StoreLockedError:
            print("locked")
        else:
            print("opened")
        with mlkv.open({store.path!r}, readonly=True) as ro:
            print(len(ro))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["locked", str(N_ROWS)]
    assert_intact(store)


def test_non_store_directory(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(mlkv.MlkvError, match="not an mlkv store"):
        mlkv.open(d, dim=DIM)
    with pytest.raises((mlkv.MlkvError, ValueError)):
        mlkv.open(d)
    assert sorted(os.listdir(d)) == ["notes.txt"]
    assert (d / "notes.txt").read_text() == "mine"


def test_empty_directory_becomes_a_store(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with mlkv.open(d, dim=DIM) as s:
        s.put([1], [[1.0] * DIM])
    with mlkv.open(d) as s:
        np.testing.assert_array_equal(s.get([1]), [[1.0] * DIM])


# ---- damaged files ---------------------------------------------------------------------------

def _manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def _edit_json(name, edit):
    def damage(path):
        file = os.path.join(path, name)
        with open(file) as f:
            data = json.load(f)
        data = edit(data)
        with open(file, "w") as f:
            json.dump(data, f)
    return damage


def _rewrite(name, change):
    def damage(path):
        file = os.path.join(path, name)
        with open(file, "rb") as f:
            data = f.read()
        with open(file, "wb") as f:
            f.write(change(data))
    return damage


def _set(data, **fields):
    return {**data, **fields}


def _drop(data, field):
    return {k: v for k, v in data.items() if k != field}


def _flip_byte(data, at):
    data = bytearray(data)
    data[at % len(data)] ^= 0x5A
    return bytes(data)


MANIFEST_DAMAGE = {
    "truncated": _rewrite("manifest.json", lambda b: b[:len(b) // 2]),
    "empty": _rewrite("manifest.json", lambda b: b""),
    "binary garbage": _rewrite("manifest.json", lambda b: bytes(range(256))),
    "a JSON list": _rewrite("manifest.json", lambda b: b"[1, 2, 3]"),
    "missing tail": _edit_json("manifest.json", lambda d: _drop(d, "tail")),
    "missing index_file": _edit_json("manifest.json", lambda d: _drop(d, "index_file")),
    "other format version": _edit_json("manifest.json", lambda d: _set(d, format_version=99)),
    "tail a string": _edit_json("manifest.json", lambda d: _set(d, tail="12345")),
    "tail null": _edit_json("manifest.json", lambda d: _set(d, tail=None)),
    "tail negative": _edit_json("manifest.json", lambda d: _set(d, tail=-4096)),
    "tail past the log": _edit_json("manifest.json",
                                    lambda d: _set(d, tail=d["tail"] + (64 << PAGE_BITS))),
    "tail below the last records": _edit_json("manifest.json",
                                              lambda d: _set(d, tail=d["tail"] // 2)),
    "begin past tail": _edit_json("manifest.json", lambda d: _set(d, begin=d["tail"] + 8)),
    "rows wrong": _edit_json("manifest.json", lambda d: _set(d, rows=d["rows"] - 1)),
    "index_bytes wrong": _edit_json("manifest.json",
                                    lambda d: _set(d, index_bytes=d["index_bytes"] + 16)),
    "rows a string": _edit_json("manifest.json", lambda d: _set(d, rows="many")),
    "index_crc32 wrong": _edit_json("manifest.json",
                                    lambda d: _set(d, index_crc32=d["index_crc32"] ^ 1)),
    "index_file absent": _edit_json("manifest.json",
                                    lambda d: _set(d, index_file="index-999999.bin")),
    "index_file a list": _edit_json("manifest.json", lambda d: _set(d, index_file=[1])),
}


def _index_name(path):
    return _manifest(path)["index_file"]


def _damage_index(change):
    def damage(path):
        _rewrite(_index_name(path), change)(path)
    return damage


INDEX_DAMAGE = {
    "a flipped byte in a key": _damage_index(lambda b: _flip_byte(b, 3)),
    "a flipped byte in an address": _damage_index(lambda b: _flip_byte(b, len(b) - 5)),
    "truncated": _damage_index(lambda b: b[:len(b) - 16]),
    "empty": _damage_index(lambda b: b""),
    "a byte appended": _damage_index(lambda b: b + b"\0"),
    "deleted": lambda path: os.remove(os.path.join(path, _index_name(path))),
}

SETTINGS_DAMAGE = {
    "truncated": _rewrite("settings.json", lambda b: b[:len(b) // 2]),
    "a JSON string": _rewrite("settings.json", lambda b: b'"hello"'),
    "dim zero": _edit_json("settings.json", lambda d: _set(d, settings={**d["settings"], "dim": 0})),
    "dim a string": _edit_json("settings.json",
                               lambda d: _set(d, settings={**d["settings"], "dim": "4"})),
    "no settings": _edit_json("settings.json", lambda d: _drop(d, "settings")),
    "dtype unknown": _edit_json("settings.json",
                                lambda d: _set(d, settings={**d["settings"], "dtype": "int8"})),
}


def _check_damage(path, damage, file_pattern):
    """Damage a closed store; opening it must raise CorruptionError naming the file; undoing
    the damage must give back every row (the failed open changed nothing and left no lock)."""
    saved = {}
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            saved[name] = f.read()
    damage(path)
    for kwargs in ({}, {"readonly": True}, {"dim": DIM}):
        with pytest.raises(mlkv.CorruptionError) as info:
            with mlkv.open(path, **kwargs) as s:
                s.get(KEYS)                     # a lazy check counts too
        assert re.search(file_pattern, str(info.value)), str(info.value)
    for name in os.listdir(path):
        if name not in saved:
            os.remove(os.path.join(path, name))
    for name, data in saved.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    reopen_intact(path)


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_damaged_manifest(closed_store, damage):
    # A manifest that disagrees with the index file (its size, CRC, row count, name) may
    # equally be reported against either file.
    _check_damage(closed_store, MANIFEST_DAMAGE[damage], r"manifest\.json|index-\d+\.bin")


@pytest.mark.parametrize("damage", list(INDEX_DAMAGE))
def test_damaged_index(closed_store, damage):
    _check_damage(closed_store, INDEX_DAMAGE[damage], r"index-\d+\.bin")


@pytest.mark.parametrize("damage", list(SETTINGS_DAMAGE))
def test_damaged_settings(closed_store, damage):
    _check_damage(closed_store, SETTINGS_DAMAGE[damage], r"settings\.json")


# ---- conversions that must work --------------------------------------------------------------

KEY_FORMS = {
    "int32": lambda k: k.astype(np.int32),
    "int16": lambda k: k.astype(np.int16),
    "uint32": lambda k: (k - k.min()).astype(np.uint32),
    "uint64": lambda k: (k - k.min()).astype(np.uint64),
    "uint8": lambda k: (k % 200).astype(np.uint8),
    "list of ints": lambda k: [int(x) for x in k],
    "list of numpy ints": lambda k: list(k),
    "tuple": lambda k: tuple(int(x) for x in k),
    "big-endian int64": lambda k: k.astype(">i8"),
    "strided view": lambda k: np.repeat(k, 2)[::2],
    "read-only array": lambda k: _read_only(k.copy()),
}


def _read_only(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("form", list(KEY_FORMS))
def test_key_conversions(store, form):
    """Each key form means the same int64 keys in every operation."""
    raw = np.array([5, -3, 1000, 2**15 - 1, 0, 5, 77], dtype=np.int64)
    as_given = KEY_FORMS[form](raw)
    keys = np.array([int(x) for x in as_given], dtype=np.int64)     # what the caller meant
    values = make_values(keys + ABSENT)
    store.delete(KEYS)                                 # start empty: keys may overlap KEYS
    assert len(store) == 0
    store.put(as_given, values)
    last = {k: values[i] for i, k in enumerate(keys.tolist())}  # the last repeat wins
    expected = np.array([last[k] for k in keys.tolist()])
    np.testing.assert_array_equal(store.get(as_given), expected)
    np.testing.assert_array_equal(store.get(keys), expected)
    np.testing.assert_array_equal(store.get_or_init(as_given), expected)
    assert store.contains(as_given).all()
    store.lookahead(as_given)
    assert len(store) == len(last)
    assert store.delete(as_given) == len(last)
    assert len(store) == 0 and not store.contains(keys).any()


VALUE_FORMS = {
    "float64": lambda v: v.astype(np.float64),
    "float16": lambda v: v.astype(np.float16),
    "int64": lambda v: np.round(v * 4).astype(np.int64),
    "int32": lambda v: np.round(v * 4).astype(np.int32),
    "uint8": lambda v: np.round(v * 4).astype(np.uint8),
    "list of lists": lambda v: v.tolist(),
    "list of int lists": lambda v: np.round(v * 4).astype(np.int64).tolist(),
    "Fortran order": lambda v: np.asfortranarray(v),
    "strided view": lambda v: np.repeat(v, 2, axis=0)[::2],
    "column view": lambda v: np.repeat(v, 2, axis=1)[:, ::2],
    "big-endian float32": lambda v: v.astype(">f4"),
    "read-only array": lambda v: _read_only(v.copy()),
}


@pytest.mark.parametrize("form", list(VALUE_FORMS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_value_conversions(tmp_path, form, dtype):
    """Values of another dtype or layout are cast to the store's dtype as numpy casts them."""
    with mlkv.open(tmp_path / "s", dim=DIM, dtype=dtype, page_bits=PAGE_BITS,
                   memory_bytes=MEMORY) as s:
        base = make_values(KEYS, dtype=np.float64)
        given = VALUE_FORMS[form](base)
        expected = np.asarray(given).astype(dtype)
        s.put(KEYS, given)
        got = s.get(KEYS)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, expected)
    with mlkv.open(tmp_path / "s") as s:
        np.testing.assert_array_equal(s.get(KEYS), expected)


def test_float64_values_round_like_numpy(store):
    """float64 values that float32 cannot hold exactly are rounded as numpy rounds them."""
    values = np.array([[0.1, 1 / 3, 1e-40, 3e38], [-0.1, 2**-149, 1e39, -1e39]])
    store.put(KEYS[:2], values)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float32)
    np.testing.assert_array_equal(store.get(KEYS[:2]), expected)
    np.testing.assert_array_equal(store.get(KEYS[2:]), VALUES[2:])
    assert len(store) == N_ROWS


def test_store_keeps_its_own_copies(store):
    """put copies the caller's values; get returns a new array each time."""
    values = VALUES[:10].copy()
    store.put(KEYS[:10], values)
    values[:] = -1
    got = store.get(KEYS[:10])
    np.testing.assert_array_equal(got, VALUES[:10])
    got[:] = -2
    again = store.get(KEYS[:10])
    assert not np.shares_memory(got, again)
    assert_intact(store)


# ---- empty batches ---------------------------------------------------------------------------

EMPTY_KEYS = {
    "int64 array": np.empty(0, dtype=np.int64),
    "int32 array": np.empty(0, dtype=np.int32),
    "uint64 array": np.empty(0, dtype=np.uint64),
    "list": [],
    "tuple": (),
    "float64 array (numpy's default for [])": np.array([]),
}


@pytest.mark.parametrize("form", list(EMPTY_KEYS))
def test_empty_keys_every_operation(store, form):
    keys = EMPTY_KEYS[form]
    got = store.get(keys)
    assert got.shape == (0, DIM) and got.dtype == np.float32
    got = store.get_or_init(keys)
    assert got.shape == (0, DIM) and got.dtype == np.float32
    contained = store.contains(keys)
    assert contained.shape == (0,) and contained.dtype == np.bool_
    assert store.delete(keys) == 0
    assert store.lookahead(keys) is None
    store.put(keys, np.empty((0, DIM), dtype=np.float32))
    store.put(keys, np.empty((0, DIM), dtype=np.float64))
    assert_intact(store)


def test_empty_keys_on_an_empty_store(path):
    with mlkv.open(path, dim=DIM) as s:
        empty = np.empty(0, dtype=np.int64)
        assert s.get(empty).shape == (0, DIM)
        assert s.delete(empty) == 0
        assert len(s) == 0 and s.keys().shape == (0,) and list(s.items()) == []
    with mlkv.open(path) as s:
        assert len(s) == 0


def test_put_empty_lists(store):
    """``put([], [])``: an empty list of rows is an empty batch, as an empty key list is."""
    store.put([], [])
    assert_intact(store)


@pytest.mark.parametrize("batch, error", [(0, ValueError), (-1, ValueError),
                                          (1.5, TypeError), ("10", TypeError)])
def test_items_bad_batch(store, batch, error):
    with pytest.raises(error, match="batch"):
        list(store.items(batch=batch))
    assert_intact(store)
