"""Compaction: live rows survive, disk stays bounded, the old segment files go."""

import os

import numpy as np
import pytest

import mlkv


def _open(path, **kw):
    kw.setdefault("dim", 16)
    return mlkv.open(path, memory_bytes=8 * 4096, page_bits=12, segment_bits=15, **kw)


def _segment_files(path):
    return sorted(f for f in os.listdir(path) if f.startswith("segment-"))


@pytest.mark.parametrize("policy", ["fifo", "second_chance", "frequency"])
def test_compact_keeps_every_row_and_frees_old_segments(tmp_path, policy):
    path = str(tmp_path / "s")
    rng = np.random.default_rng(7)
    model = {}
    with _open(path, policy=policy, auto_compact=None) as store:
        for _ in range(60):                                   # updates to a fixed key set
            keys = rng.integers(0, 1500, 400)
            values = rng.random((400, 16), dtype=np.float32)
            store.put(keys, values)
            model.update(zip(keys.tolist(), values))
        store.delete(np.arange(0, 1500, 7))
        for k in range(0, 1500, 7):
            model.pop(k, None)
        before = _segment_files(path)
        begin_before = store.stats()["addresses"]["begin"]
        result = store.compact()
        after = _segment_files(path)
        stats = store.stats()
        assert result["rows_moved"] > 0 and result["bytes_freed"] > 0
        assert result["checkpoint_id"] == stats["checkpoint_id"]
        assert stats["addresses"]["begin"] > begin_before
        assert before[0] not in after          # moved rows went to new segments at the tail
        first_left = stats["addresses"]["begin"] >> 15
        assert all(int(f[8:-4]) >= first_left for f in after)
        assert len(store) == len(model)
        keys = np.array(sorted(model))
        np.testing.assert_array_equal(store.get(keys), np.array([model[k] for k in keys]))
    with mlkv.open(path) as store:                            # and after reopen
        np.testing.assert_array_equal(store.get(keys), np.array([model[k] for k in keys]))
        assert not store.contains(np.arange(0, 1500, 7)).any()


def test_compact_with_nothing_to_free(tmp_path):
    with _open(str(tmp_path / "s")) as store:
        store.put(np.arange(10), np.ones((10, 16)))
        assert store.compact() == {"rows_moved": 0, "bytes_freed": 0, "checkpoint_id": None}
        np.testing.assert_array_equal(store.get(np.arange(10)), np.ones((10, 16)))


def test_disk_use_stays_within_2_5x_live_under_long_updates(tmp_path):
    """A long run of updates to a fixed key set: automatic compaction keeps the segment files
    within 2.5x the live records (measured after every batch)."""
    path = str(tmp_path / "s")
    rng = np.random.default_rng(3)
    n_keys = 3000
    worst = 0.0
    with _open(path, auto_compact=0.5) as store:
        store.put(np.arange(n_keys), np.zeros((n_keys, 16)))
        live = n_keys * store.layout.record_bytes
        for step in range(300):
            keys = rng.integers(0, n_keys, 512)
            store.put(keys, np.full((512, 16), step, np.float32))
            disk = sum(os.path.getsize(os.path.join(path, f)) for f in _segment_files(path))
            worst = max(worst, disk / live)
        assert store.stats()["compactions"] > 0
        total_written = store.stats()["bytes_written"]
    assert total_written > 10 * live                 # the run wrote many times the table
    assert worst <= 2.5, f"disk use reached {worst:.2f}x the live data"


def test_read_only_store_cannot_compact(tmp_path):
    path = str(tmp_path / "s")
    with _open(path) as store:
        store.put(np.arange(10), np.ones((10, 16)))
    with mlkv.open(path, readonly=True) as reader:
        with pytest.raises(mlkv.ReadOnlyError):
            reader.compact()


def test_mlkv_compact_command(tmp_path, capsys):
    from mlkv import cli
    path = str(tmp_path / "s")
    with _open(path, auto_compact=None) as store:
        for step in range(40):
            store.put(np.arange(1000), np.full((1000, 16), step, np.float32))
        before = store.stats()["disk_bytes"]
    assert cli.main(["compact", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith("moved ") and "freed" in out and "segment files" in out
    with mlkv.open(path) as store:
        assert store.stats()["disk_bytes"] < before
        np.testing.assert_array_equal(store.get(np.arange(1000)), np.full((1000, 16), 39))
