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
