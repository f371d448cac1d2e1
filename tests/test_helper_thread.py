"""Reads shared with the helper thread (``threads=2``): the rows, addresses and counts of a
read on one thread, whatever the helper does (helps, sleeps, is gone after a fork)."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import mlkv
from mlkv.engine import _pair_kernels as PK
from mlkv.engine import helper as H

DIM = 8


@pytest.fixture
def awake_helper(monkeypatch):
    """The process's helper, spinning until the test ends (a fresh one, stopped after)."""
    monkeypatch.setattr(H, "_helper", None)
    monkeypatch.setattr(H, "SPIN_LIMIT", 1 << 40)
    h = H.helper()
    h.wake()
    deadline = time.monotonic() + 300          # with no Numba cache, serve() compiles first
    while h.control[PK.STATE] != PK.AWAKE:
        assert time.monotonic() < deadline, "the helper thread did not start"
        time.sleep(0.001)
    # each thread on a CPU of its own, so that on a loaded machine the scheduler does not
    # queue the helper behind the test's own thread (it would never claim a half)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[0]})
        os.sched_setaffinity(h._thread.native_id, {cpus[1]})
    yield h
    h.stop()
    os.sched_setaffinity(0, cpus)


def _pair(tmp_path, **options):
    """Two stores with the same rows, one reading on one thread, one with the helper."""
    stores = [mlkv.open(str(tmp_path / f"s{t}"), dim=DIM, threads=t, **options)
              for t in (1, 2)]
    return stores


def _same(a, b, keys):
    np.testing.assert_array_equal(a.get_or_init(keys), b.get_or_init(keys))


def _until_helped(helper, attempt, tries=300):
    """Call ``attempt(i)`` until the helper has done its part of a job. On a loaded machine
    the caller may claim every second half itself (correct, but it tests the caller alone)."""
    for i in range(tries):
        before = helper.control[PK.HELPED]
        attempt(i)
        if helper.control[PK.HELPED] > before:
            return
        time.sleep(0.002)         # let the scheduler run the helper in some of the tries
    pytest.fail(f"the helper did no part of {tries} jobs")


def test_reads_match_one_thread_with_rows_on_disk_absent_and_moved(tmp_path, awake_helper):
    """A pool of 16 pages of 4 KiB for 20,000 rows of 48 bytes: most rows on disk, the policy
    copies read rows to the tail (moves below read_only), ids absent or repeated."""
    rng = np.random.default_rng(5)
    a, b = _pair(tmp_path, page_bits=12, memory_bytes=16 * 4096, policy="second_chance")
    keys = np.arange(20_000, dtype=np.int64)
    values = rng.standard_normal((keys.shape[0], DIM)).astype(np.float32)
    for s in (a, b):
        s.put(keys, values)
    seq, helped = awake_helper.control[PK.SEQ], awake_helper.control[PK.HELPED]
    for step in range(40):
        batch = rng.integers(0, 25_000, 4096)            # a fifth absent: created
        batch[:1000] = rng.integers(0, 50, 1000)         # hot repeats
        _same(a, b, batch)
        assert a.stats()["hits"] == b.stats()["hits"]
        assert a.stats()["misses"] == b.stats()["misses"]
    assert awake_helper.control[PK.SEQ] > seq, "no read was shared"
    if awake_helper.control[PK.HELPED] == helped:
        _until_helped(awake_helper, lambda i: _same(a, b, rng.integers(0, 25_000, 4096)))
    _same(a, b, np.arange(25_000))


def test_a_read_in_memory_is_split_between_the_threads(tmp_path, awake_helper):
    a, b = _pair(tmp_path)
    keys = np.arange(10_000, dtype=np.int64)
    for s in (a, b):
        s.put(keys, np.arange(keys.shape[0] * DIM, dtype=np.float32).reshape(-1, DIM))
    batch = np.random.default_rng(1).integers(0, 10_000, 5000)

    def read(i):
        got = b.get(batch)
        np.testing.assert_array_equal(got, a.get(batch))
        np.testing.assert_array_equal(got[:, 0], batch * DIM)

    _until_helped(awake_helper, read)

    def create(i):
        # keys only the helper's half leaves for later (absent: created by the caller after)
        first = 10_000 + 2000 * i
        _same(a, b, np.concatenate([np.arange(2000), np.arange(first, first + 2000)]))

    _until_helped(awake_helper, create)


def test_a_sleeping_helper_is_woken_and_the_read_runs_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "_helper", None)
    monkeypatch.setattr(H, "SPIN_LIMIT", 1)          # asleep again at once
    a, b = _pair(tmp_path)
    keys = np.arange(3000, dtype=np.int64)
    for s in (a, b):
        s.put(keys, np.ones((keys.shape[0], DIM), np.float32) * keys[:, None])
    for _ in range(20):
        _same(a, b, keys[::-1])
    h = H.helper()
    assert h._thread is not None, "the first read should have woken the helper"
    h.stop()


def test_float64_stores_and_small_batches_read_on_one_thread(tmp_path, awake_helper):
    s64 = mlkv.open(str(tmp_path / "d"), dim=DIM, dtype="float64", threads=2)
    s32 = mlkv.open(str(tmp_path / "f"), dim=DIM, threads=2)
    assert s64._engine.helper is None and s32._engine.helper is awake_helper
    keys = np.arange(2000, dtype=np.int64)
    for s in (s64, s32):
        s.put(keys, np.ones((keys.shape[0], DIM)))
    seq = awake_helper.control[PK.SEQ]
    s64.get(keys)
    s32.get(keys[:PK.PAIR_MIN_KEYS - 1])
    assert awake_helper.control[PK.SEQ] == seq


@pytest.mark.parametrize("threads", [0, 3, True, 2.0, "2"])
def test_threads_must_be_1_or_2(tmp_path, threads):
    with pytest.raises(ValueError, match="threads must be 1 or 2"):
        mlkv.open(str(tmp_path / "s"), dim=DIM, threads=threads)


def test_a_forked_child_reads_with_a_helper_of_its_own(tmp_path, awake_helper):
    """As a DataLoader worker forked from a training process would."""
    parent = mlkv.open(str(tmp_path / "p"), dim=DIM, threads=2)
    parent.put(np.arange(4000), np.ones((4000, DIM)))
    parent.get(np.arange(4000))
    pid = os.fork()
    if pid == 0:                                      # the child: exits with a status
        code = 1
        try:
            child_helper = H.helper()
            assert child_helper is not awake_helper
            assert child_helper.control[PK.STATE] == PK.ASLEEP
            s = mlkv.open(str(tmp_path / "c"), dim=DIM, threads=2)
            s.put(np.arange(4000), np.full((4000, DIM), 2.0))
            for _ in range(5):
                assert (s.get(np.arange(4000)) == 2.0).all()
            s.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (parent.get(np.arange(4000)) == 1.0).all()


def test_a_process_with_a_spinning_helper_exits_at_once(tmp_path):
    code = ("import numpy as np, mlkv, mlkv.engine.helper as H\n"
            "H.SPIN_LIMIT = 1 << 40\n"
            f"s = mlkv.open({str(tmp_path / 's')!r}, dim=4, threads=2)\n"
            "s.put(np.arange(5000), np.ones((5000, 4)))\n"
            "for _ in range(3): s.get(np.arange(5000))\n"
            "print('read', flush=True)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "read"
    assert time.monotonic() - started < 30


def test_a_posted_half_nobody_claims_is_done_by_the_caller(tmp_path, monkeypatch):
    """The helper says it is awake but never claims (it went to sleep right after): the
    caller claims the second half itself and reads it."""
    monkeypatch.setattr(H, "_helper", None)
    h = H.helper()
    monkeypatch.setattr(h, "wake", lambda: None)      # no thread ever starts
    a, b = _pair(tmp_path)
    keys = np.arange(6000, dtype=np.int64)
    for s in (a, b):
        s.put(keys, np.random.default_rng(2).standard_normal((6000, DIM)))
    for step in range(5):
        h.control[PK.STATE] = PK.AWAKE
        seq = h.control[PK.SEQ]
        batch = np.random.default_rng(step).integers(0, 7000, 3000)
        if step == 4:           # rows to create in the second half only
            batch = np.concatenate([np.arange(1500), np.arange(8000, 9500)])
        _same(a, b, batch)
        assert h.control[PK.SEQ] > seq
        assert h.control[PK.CLAIM] == h.control[PK.DONE] == h.control[PK.SEQ]
    assert h._thread is None


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_training_with_threads_2_gives_the_numbers_of_one_thread(tmp_path, awake_helper,
                                                                 optimizer):
    torch = pytest.importorskip("torch")
    from mlkv.frameworks.torch import KVEmbedding
    embs = [KVEmbedding(16, path=str(tmp_path / f"e{t}"), optimizer=optimizer, lr=0.05,
                        threads=t) for t in (1, 2)]
    gen = torch.Generator().manual_seed(0)
    done = awake_helper.control[PK.HELPED]
    for step in range(30):
        ids = torch.randint(0, 3000, (2048,), generator=gen)
        w = torch.randn(2048, 16, generator=gen)
        outs = []
        for emb in embs:
            out = emb(ids)
            (out * w).sum().backward()
            outs.append(out.detach())
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    if awake_helper.control[PK.HELPED] == done:      # a loaded machine: more steps
        def step(i):
            ids = torch.randint(0, 3000, (2048,), generator=gen)
            outs = [emb(ids) for emb in embs]
            for out in outs:
                out.sum().backward()
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        _until_helped(awake_helper, step)
    ids = torch.arange(3000)
    torch.testing.assert_close(embs[0](ids), embs[1](ids), rtol=0, atol=0)


def _hyper(rule, step):
    from mlkv.engine._rule_kernels import hyper_vector
    return hyper_vector(rule, 0.1, step=step)


@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam"])
def test_an_update_left_to_the_helper_is_finished_by_the_next_call(tmp_path, awake_helper,
                                                                     rule):
    """``update(wait=False)`` returns with the update on the helper; whatever call comes
    next (a read, a write, stats, a checkpoint, from another thread) sees it done. A pool of
    16 pages of 4 KiB leaves most rows on disk, so the helper stops early and the next call
    does the rest (evictions, rows brought in, rows created)."""
    import threading
    rng = np.random.default_rng(3)
    options = dict(page_bits=12, memory_bytes=16 * 4096, state_dim=2 * DIM)
    a, b = _pair(tmp_path, **options)
    keys = np.arange(8000, dtype=np.int64)
    rows = rng.standard_normal((keys.shape[0], DIM))
    for s in (a, b):
        s.put(keys, rows)
    nexts = [lambda s, k: s.get_or_init(k), lambda s, k: s.stats(),
             lambda s, k: s.put(k[:3], np.zeros((3, DIM))), lambda s, k: s.checkpoint(),
             lambda s, k: s.contains(k)]
    for step in range(1, 26):
        batch = rng.integers(0, 9000, 2048)
        _same(a, b, batch)                               # a training step's read first
        grads = rng.standard_normal((2048, DIM)).astype(np.float32)
        a.update(batch, grads, rule, _hyper(rule, step))
        b.update(batch, grads, rule, _hyper(rule, step), wait=False)
        assert b._engine.pending is not None or step == 1
        call = nexts[step % len(nexts)]
        if step % 7 == 0:                                # the next call from another thread
            t = threading.Thread(target=call, args=(b, batch))
            t.start()
            t.join()
            call(a, batch)
        else:
            call(a, batch), call(b, batch)
        assert b._engine.pending is None
    _same(a, b, np.arange(9000))


def test_closing_with_an_update_pending_keeps_it(tmp_path, awake_helper):
    n = 300_000                   # an update of some milliseconds
    keys = np.arange(n, dtype=np.int64)
    grads = np.ones((n, DIM), np.float32)
    for checkpoint in (True, False):
        path = str(tmp_path / f"s{checkpoint}")
        s = mlkv.open(path, dim=DIM, threads=2)
        s.put(keys, np.zeros((n, DIM)))
        s.checkpoint()
        s.get(keys)
        s.update(keys, grads, "sgd", _hyper("sgd", 1), wait=False)
        s.close(checkpoint=checkpoint)
        # nothing left running on the buffer pool the store just freed
        assert awake_helper.control[PK.DONE] == awake_helper.control[PK.SEQ]
        with mlkv.open(path) as s:
            assert (s.get(keys) == (-0.1 if checkpoint else 0.0)).all()


def test_a_child_forked_while_an_update_runs_does_not_wait_for_it(tmp_path, awake_helper):
    """A DataLoader's workers are forked when its iterator starts, maybe right after a
    backward whose update still runs on the parent's helper: the child, which has no helper,
    must not wait for it (at exit, a finalizer may close a store)."""
    s = mlkv.open(str(tmp_path / "s"), dim=DIM, threads=2)
    n = 2_000_000                       # an update of tens of milliseconds
    keys = np.arange(n, dtype=np.int64)
    s.put(keys, np.zeros((n, DIM), np.float32))
    s.get(keys)
    s.update(keys, np.ones((n, DIM), np.float32), "sgd", _hyper("sgd", 1), wait=False)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            s.close(checkpoint=False)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child waited for the parent's update")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert (s.get(keys[:1000]) == np.float32(-0.1)).all()


def test_a_pipeline_with_threads_2_trains_as_one_thread(tmp_path, awake_helper):
    """Lookahead on the pipeline's thread, reads shared with the helper, updates left to it,
    most rows on disk: the numbers of the same pipeline with one thread (staleness 0; with
    more, what a read sees depends on timing, on one thread too)."""
    staleness = 0
    torch = pytest.importorskip("torch")
    from mlkv.frameworks.torch import KVEmbedding, Pipeline
    gen = torch.Generator().manual_seed(7)
    batches = [((torch.rand(1024, generator=gen) ** 2 * 5000).long(),
                torch.randn(1024, 16, generator=gen)) for _ in range(20)]
    results = []
    for threads in (1, 2):
        emb = KVEmbedding(16, path=str(tmp_path / f"e{threads}"), optimizer="adagrad", lr=0.1,
                          memory_bytes=16 * 4096, page_bits=12, threads=threads)
        losses = []
        for ids, w in Pipeline(batches, {emb: lambda b: b[0]}, lookahead=2,
                               staleness=staleness):
            loss = (emb(ids) * w).sum()
            loss.backward()
            losses.append(loss.item())
        keys = np.sort(emb.store.keys())
        results.append((losses, keys, emb.store.get(keys)))
        emb.close()
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][2], results[1][2])
