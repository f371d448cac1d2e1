"""Two Python threads on one store: every result is one some serial order could give."""

import threading

import numpy as np

import mlkv

DIM = 8
ROUNDS = 60


def test_two_threads_put_get_lookahead(tmp_path):
    """Each thread owns half the keys and writes round r as the value r; it also reads and
    looks ahead on the other half. Own reads must see the thread's last write exactly; reads
    of the other half must see a whole row from one round, never a torn or stale-past-known
    row; the end state is every key at the last round."""
    n = 4000
    store = mlkv.open(str(tmp_path / "s"), dim=DIM, page_bits=12, memory_bytes=8 * 4096)
    store.put(np.arange(n), np.full((n, DIM), -1, np.float32))
    halves = [np.arange(0, n, 2), np.arange(1, n, 2)]
    errors = []
    start = threading.Barrier(2)

    def work(me):
        rng = np.random.default_rng(me)
        mine, theirs = halves[me], halves[1 - me]
        try:
            start.wait()
            for r in range(ROUNDS):
                keys = rng.choice(mine, 500, replace=False)
                store.put(mine, np.full((mine.shape[0], DIM), r, np.float32))
                own = store.get(keys)
                assert (own == r).all(), f"thread {me} round {r}: own rows not at {r}"
                other = store.get(rng.choice(theirs, 500))
                assert (other == other[:, :1]).all(), "a row mixes two writes"
                assert ((other >= -1) & (other < ROUNDS)).all()
                store.lookahead(rng.choice(theirs, 300))
        except BaseException as exc:          # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(me,)) for me in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    np.testing.assert_array_equal(store.get(np.arange(n)), np.full((n, DIM), ROUNDS - 1))
    assert len(store) == n
    store.close()


def test_lookahead_reads_the_disk_without_holding_the_store(tmp_path, monkeypatch):
    """While a lookahead waits on the disk, another thread's get, put and update of other
    rows (and of a row being looked ahead) complete; the lookahead then brings in only rows
    whose key still points where it read them."""
    from mlkv.engine import _rule_kernels as R
    from mlkv.engine.device import FileDevice

    reading, release = threading.Event(), threading.Event()

    class SlowDisk(FileDevice):
        def _read_part(self, *args, **kwargs):
            if threading.current_thread().name == "lookahead" or \
                    threading.current_thread().name.startswith("mlkv-io"):
                reading.set()
                release.wait(10)
            return super()._read_part(*args, **kwargs)

    monkeypatch.setattr(mlkv.Store, "_device_class", SlowDisk)
    n = 3000
    store = mlkv.open(str(tmp_path / "s"), dim=DIM, page_bits=12, memory_bytes=8 * 4096,
                      state_dim=1)
    rows = np.arange(n * DIM, dtype=np.float32).reshape(n, DIM)
    store.put(np.arange(n), rows)                 # the first rows are on disk only
    cold = np.arange(0, 200)
    assert store.stats()["addresses"]["head"] > 200 * store.stats()["record_bytes"]
    errors = []
    ahead = threading.Thread(target=lambda: _catch(errors, store.lookahead, cold),
                             name="lookahead")
    ahead.start()
    assert reading.wait(30)
    # the lookahead is inside its disk read: the store answers meanwhile
    np.testing.assert_array_equal(store.get(np.arange(n - 100, n)), rows[n - 100:])
    store.put([5], np.full((1, DIM), -7.0))       # a row the lookahead is reading
    store.update([n - 1], np.ones((1, DIM)), "rowwise_adagrad",
                 R.hyper_vector("rowwise_adagrad", 0.1))
    assert ahead.is_alive()                       # still waiting on its disk read
    release.set()
    ahead.join(30)
    assert not ahead.is_alive() and not errors, errors
    expected = rows.copy()
    expected[5] = -7.0
    got = store.get(np.arange(n - 1))
    np.testing.assert_array_equal(got, expected[:n - 1])
    assert store.stats()["lookaheads"] == cold.shape[0]
    store.close()


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 -- reported by the test
        errors.append(exc)
