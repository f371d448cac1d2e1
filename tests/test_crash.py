"""Crash tests: SIGKILL a writer at random moments, reopen, and compare with a dict model.

A child process (a script written to ``tmp_path``) opens a store with 4 KiB pages and a buffer
pool of a few pages, so eviction writes pages to disk between checkpoints, and runs a seeded,
deterministic workload of puts (new rows and updates), deletes and reads (``lookahead`` and
``get``, which copy cold rows to the tail under ``second_chance``), checkpointing now and then.
It prints a line on stdout just before each ``store.checkpoint()`` (``start``), at three points
inside it (after the pages are flushed, after the index file is written, just before the
manifest is written and renamed into place, and just after; the child wraps those functions,
mlkv is not changed), and after it returns (``done`` with the checkpoint id). It pauses 10 ms after each
phase line (except in runs killed after a random delay), so that a kill right after reading one
lands inside that phase.

The parent replays the same workload (:func:`workload`, whose source the child script embeds)
in a ``dict`` model, keeps a snapshot of the model at each checkpoint, and kills the child with
SIGKILL at a seeded moment: after a random delay, right after the k-th ``done``, or right after
the k-th ``start`` or phase line. It then drains what the child printed before dying and works
out which checkpoints the store may be at:

- no checkpoint begun after the last ``done``: exactly the last ``done`` one;
- a checkpoint begun, but its ``manifest`` line not printed: the manifest rename cannot have
  happened, so again exactly the last ``done`` one;
- the ``manifest`` line printed but not ``done``: the last ``done`` one or the new one, and the
  store's ``checkpoint_id`` says which; the rows must equal that one exactly;
- the ``renamed`` line printed but not ``done``: the new one (the rename is the commit).

With no checkpoint yet the expected state is the empty store. The parent reopens with
``mlkv.open(path)``, compares ``len``, every row of ``items()``, ``get`` of every model key and
``contains`` of the deleted keys, then starts another child on the same store, so state builds up
across kills. Half of the checks reopen read-only (so the next child is the first writer after
the crash), half for writing (closing is then one more checkpoint of the same rows).
"""

from __future__ import annotations

import inspect
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import mlkv

PAGE_BITS = 12
PAGE_BYTES = 1 << PAGE_BITS
PHASE_PAUSE = 0.01


def workload(seed, round_no, dim, dtype, steps, universe, p_checkpoint, first_checkpoint):
    """The ops of one child run: a deterministic function of its arguments only.

    Yields ``("put", keys, values)``, ``("delete", keys)``, ``("read", keys)`` and
    ``("checkpoint", step)``; it never depends on what the store holds, so the parent can
    replay it on a model of whatever checkpoint the previous crash left.
    """
    import numpy as np
    rng = np.random.default_rng([seed, round_no, 7919])
    for step in range(steps):
        n = int(rng.integers(1, 48))
        keys = rng.integers(0, universe, n).astype(np.int64)
        if rng.random() < 0.1:      # far-apart keys land in other home slots
            keys = keys * np.int64(1_000_003) - np.int64(2**40)
        r = rng.random()
        if r < 0.6:
            values = (rng.standard_normal((n, dim)) * 10).astype(dtype)
            yield ("put", keys, values)
        elif r < 0.8:
            yield ("delete", keys)
        else:
            yield ("read", keys)
        if step >= first_checkpoint and rng.random() < p_checkpoint:
            yield ("checkpoint", step)


CHILD = r'''
import sys, time
import numpy as np
import mlkv
from mlkv.engine import checkpoint as ckpt_mod
from mlkv.engine.log import HybridLog

PAUSE = {pause!r}

def say(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()

def phase(name):
    say("phase", name)
    time.sleep(PAUSE)

_flush = HybridLog.flush
def flush(self):
    _flush(self)
    phase("flush")
HybridLog.flush = flush

_write_index = ckpt_mod._write_index
def write_index(*args, **kwargs):
    out = _write_index(*args, **kwargs)
    phase("index")
    return out
ckpt_mod._write_index = write_index

_write_json_atomic = ckpt_mod.write_json_atomic
def write_json_atomic(*args, **kwargs):
    phase("manifest")
    out = _write_json_atomic(*args, **kwargs)
    phase("renamed")
    return out
ckpt_mod.write_json_atomic = write_json_atomic

{workload_source}

args = {args!r}
store = mlkv.open(args["path"], dim=args["dim"], dtype=args["dtype"], policy=args["policy"],
                  memory_bytes=args["memory_bytes"], page_bits={page_bits})
say("ready", store.checkpoint_id)
for op in workload(args["seed"], args["round"], args["dim"], args["dtype"], args["steps"],
                   args["universe"], args["p_checkpoint"], args["first_checkpoint"]):
    if op[0] == "put":
        store.put(op[1], op[2])
    elif op[0] == "delete":
        store.delete(op[1])
    elif op[0] == "read":
        keys = op[1]
        store.lookahead(keys)
        present = keys[store.contains(keys)]
        store.get(present)
    else:
        say("start", op[1])
        cid = store.checkpoint()
        say("done", op[1], cid)
    if args["slow"]:
        time.sleep(args["slow"])
store.close()
say("closed", store.checkpoint_id)
'''


class Lines:
    """Lines of a pipe, read with a timeout (no thread: the kill follows the read at once)."""

    def __init__(self, stream):
        self.fd = stream.fileno()
        self.buf = b""
        self.eof = False

    def next(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            if chunk:
                self.buf += chunk
            else:
                self.eof = True
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def drain(self, timeout=30.0):
        out = []
        while True:
            line = self.next(timeout)
            if line is None:
                assert self.eof, "child's stdout did not close after it died"
                return out
            out.append(line)


def apply(model, op):
    if op[0] == "put":
        for k, row in zip(op[1].tolist(), op[2]):
            model[k] = row
    elif op[0] == "delete":
        for k in op[1].tolist():
            model.pop(k, None)


def checkpoints_of(model, args):
    """Replay the workload on a copy of ``model``: {step: snapshot after that checkpoint}, final."""
    model = dict(model)
    snaps = {}
    for op in workload(args["seed"], args["round"], args["dim"], args["dtype"], args["steps"],
                       args["universe"], args["p_checkpoint"], args["first_checkpoint"]):
        if op[0] == "checkpoint":
            snaps[op[1]] = dict(model)
        else:
            apply(model, op)
    return snaps, model


def check_store(path, model, checkpoint_id, readonly, dim, dtype, ever):
    """Reopen ``path`` and compare it with ``model`` exactly; returns the id after closing."""
    store = mlkv.open(path, readonly=readonly)
    try:
        assert store.checkpoint_id == checkpoint_id
        assert store.stats()["checkpoint_id"] == checkpoint_id
        assert store.dim == dim and store.dtype == np.dtype(dtype)
        assert len(store) == len(model)
        seen = {}
        for keys, values in store.items(batch=97):
            assert values.shape == (keys.shape[0], dim) and values.dtype == np.dtype(dtype)
            for k, row in zip(keys.tolist(), values):
                assert k not in seen, f"key {k} listed twice"
                seen[k] = row
        assert set(seen) == set(model), (
            f"missing {sorted(set(model) - set(seen))[:10]}, "
            f"extra {sorted(set(seen) - set(model))[:10]}")
        for k, row in model.items():
            np.testing.assert_array_equal(seen[k], row, err_msg=f"row of key {k}")
        if model:
            keys = np.fromiter(model, dtype=np.int64, count=len(model))
            np.testing.assert_array_equal(store.get(keys), np.stack([model[k] for k in keys.tolist()]))
        gone = np.array(sorted(ever - set(model)), dtype=np.int64)
        if gone.shape[0]:
            assert not store.contains(gone).any()
    finally:
        store.close()
    return store.checkpoint_id


def run_child(tmp_path, args):
    script = tmp_path / f"child-{args['round']}.py"
    script.write_text(CHILD.format(pause=args["pause"], page_bits=PAGE_BITS, args=args,
                                   workload_source=textwrap.dedent(inspect.getsource(workload))))
    with open(tmp_path / f"child-{args['round']}.err", "wb") as err:
        return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                stderr=err, cwd=str(tmp_path))


def stderr_of(tmp_path, round_no):
    return (tmp_path / f"child-{round_no}.err").read_text()[-3000:]


def crash_round(tmp_path, path, cfg, round_no, mode, rng, state, state_id, slow=0.0,
                p_checkpoint=0.08, first_checkpoint=0):
    """One child run killed per ``mode``; returns (recovered model, its id, how it ended)."""
    args = dict(path=str(path), seed=cfg["seed"], round=round_no, dim=cfg["dim"],
                dtype=cfg["dtype"], policy=cfg["policy"], memory_bytes=cfg["frames"] * PAGE_BYTES,
                steps=cfg["steps"], universe=cfg["universe"], p_checkpoint=p_checkpoint,
                first_checkpoint=first_checkpoint, slow=slow,
                # random-delay kills: no pauses, so they land anywhere in puts, evictions, reads
                pause=0.0 if mode[0] == "delay" else PHASE_PAUSE)
    if mode[0] == "delay" and not slow:
        args["slow"] = 0.0005   # at least 1.5 s per run however fast the machine: outlasts the delay
    snaps, final = checkpoints_of(state, args)
    proc = run_child(tmp_path, args)
    lines = Lines(proc.stdout)
    got = []
    try:
        first = lines.next(120)     # the first child may compile kernels
        assert first is not None, stderr_of(tmp_path, round_no)
        assert first == f"ready {state_id}", (first, stderr_of(tmp_path, round_no))
        got.append(first)
        kind, target = mode[:2]
        late = mode[2] if len(mode) > 2 else 0.0
        if kind == "delay":
            deadline = time.monotonic() + target
            while True:
                line = lines.next(max(0.0, deadline - time.monotonic()))
                if line is None:
                    break
                got.append(line)
                if line.startswith("closed"):
                    break
        elif kind != "none":
            count = 0
            while True:
                line = lines.next(60)
                assert line is not None, (got[-5:], stderr_of(tmp_path, round_no))
                got.append(line)
                if line.startswith("closed"):
                    break
                if line == kind or line.startswith(kind + " "):
                    count += 1
                    if count == target:
                        break
            if late and not got[-1].startswith("closed"):
                time.sleep(late)
        if kind != "none":
            os.kill(proc.pid, signal.SIGKILL)
        got += lines.drain()
    finally:
        if proc.poll() is None and mode[0] != "none":
            proc.kill()
        proc.wait(60)
        proc.stdout.close()
    assert not any(l.startswith(("Traceback", "Error")) for l in got)
    if got and got[-1].startswith("closed"):
        assert proc.returncode == 0, stderr_of(tmp_path, round_no)
        return final, int(got[-1].split()[1]), "closed", False
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, stderr_of(tmp_path, round_no))
    # What completed: the last "done"; what may have: a checkpoint whose manifest line printed.
    last_model, last_id = state, state_id
    pending, manifest_seen, renamed = None, False, False
    for line in got[1:]:
        words = line.split()
        if words[0] == "start":
            pending, manifest_seen, renamed = int(words[1]), False, False
        elif words == ["phase", "manifest"]:
            manifest_seen = True
        elif words == ["phase", "renamed"]:
            renamed = True
        elif words[0] == "done":
            step, cid = int(words[1]), int(words[2])
            assert step == pending and cid == last_id + 1
            last_model, last_id = snaps[step], cid
            pending = None
    mid_checkpoint = pending is not None
    store = mlkv.open(path, readonly=True)
    try:
        found = store.checkpoint_id
    finally:
        store.close()
    if pending is not None and renamed:
        assert found == last_id + 1, "the manifest was renamed into place, but not reopened"
    if pending is not None and manifest_seen and found == last_id + 1:
        return snaps[pending], found, "new", mid_checkpoint
    return last_model, last_id, "old", mid_checkpoint


CONFIGS = [
    # dim/dtype chosen so a 4 KiB page holds ~45, 1, ~10 and ~125 records
    dict(name="second_chance-f32-16", policy="second_chance", dtype="float32", dim=16, frames=5,
         universe=400, steps=3000, seed=101),
    dict(name="fifo-f32-1000", policy="fifo", dtype="float32", dim=1000, frames=4,
         universe=120, steps=3000, seed=202),
    dict(name="fifo-f16-200", policy="fifo", dtype="float16", dim=200, frames=6,
         universe=300, steps=3000, seed=303),
    dict(name="second_chance-f64-1", policy="second_chance", dtype="float64", dim=1, frames=4,
         universe=2000, steps=3000, seed=404),
]
MODES = ("delay", "done", "start", "phase flush", "phase index", "phase manifest",
         "phase renamed")
ROUNDS = 9


@pytest.fixture(scope="module", autouse=True)
def warm_kernels(tmp_path_factory):
    """Compile (or load from the on-disk cache) the kernels once, before timed child runs."""
    path = tmp_path_factory.mktemp("warm")
    code = ("import numpy as np, mlkv\n"
            f"s = mlkv.open({str(path / 's')!r}, dim=4, page_bits=12, memory_bytes=16384)\n"
            "k = np.arange(3000)\n"
            "s.put(k, np.ones((3000, 4), np.float32)); s.lookahead(k); s.get(k); s.delete(k[::2])\n"
            "s.checkpoint(); list(s.items()); s.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c["name"] for c in CONFIGS])
def test_kill_and_recover(tmp_path, cfg):
    rng = np.random.default_rng(cfg["seed"])
    path = tmp_path / "store"
    state, state_id = {}, 0
    ever = set()
    kills = mid = 0
    outcomes = []
    for round_no in range(ROUNDS):
        # the fixed modes first, then kills after random delays (often in the middle of an
        # eviction or a put)
        kind = MODES[round_no] if round_no < len(MODES) else "delay"
        if kind == "delay":
            mode = (kind, float(rng.uniform(0.05, 0.5)))
        else:
            mode = (kind, int(rng.integers(1, 4)))
        # every op's keys, for checking deleted keys stay deleted
        for op in workload(cfg["seed"], round_no, cfg["dim"], cfg["dtype"], cfg["steps"],
                           cfg["universe"], 0.0, 0):
            if op[0] != "checkpoint":
                ever.update(op[1].tolist())
        state, state_id, how, was_mid = crash_round(tmp_path, path, cfg, round_no,
                                                    mode, rng, state, state_id)
        outcomes.append((*mode, how))
        kills += how != "closed"
        mid += was_mid
        readonly = bool(rng.integers(2))
        closed_id = check_store(path, state, state_id, readonly, cfg["dim"], cfg["dtype"], ever)
        if not readonly:
            state_id = closed_id
            assert closed_id >= 1
    print(f"{cfg['name']}: {kills} kills, {mid} inside a checkpoint: {outcomes}")
    assert kills == ROUNDS, outcomes
    assert mid >= 2, outcomes


def test_kill_before_first_checkpoint_gives_empty_store(tmp_path):
    """No checkpoint yet: a kill mid-run, or during the first checkpoint before its manifest
    is renamed into place, reopens as an empty store."""
    cfg = dict(policy="second_chance", dtype="float32", dim=16, frames=4, universe=500,
               steps=3000, seed=505)
    rng = np.random.default_rng(cfg["seed"])
    for name, mode, first in [("a", ("delay", 0.3), 10**9), ("b", ("phase flush", 1), 200),
                              ("c", ("phase index", 1), 200)]:
        path = tmp_path / name
        sub = tmp_path / f"run-{name}"
        sub.mkdir()
        state, state_id, how, _ = crash_round(sub, path, cfg, 0, mode, rng, {}, 0,
                                              first_checkpoint=first)
        assert how == "old" and state == {} and state_id == 0
        for readonly in (True, False):
            store = mlkv.open(path, readonly=readonly)
            try:
                assert len(store) == 0 and store.checkpoint_id == 0
                assert list(store.items()) == []
                assert store.keys().shape == (0,)
                assert not store.contains(np.arange(500)).any()
                if not readonly:
                    # the empty reopened store works: write, checkpoint, read back
                    store.put([1, 2], np.ones((2, 16), np.float32))
                    assert store.checkpoint() == 1
            finally:
                store.close()
        store = mlkv.open(path, readonly=True)
        try:
            assert len(store) == 2 and store.checkpoint_id == 2
            np.testing.assert_array_equal(store.get([1, 2]), np.ones((2, 16), np.float32))
        finally:
            store.close()


def test_clean_close_counts_as_checkpoint(tmp_path):
    """A child that runs to the end and closes, with no checkpoint of its own, then a kill of
    the next child before it checkpoints: both reopen at the close."""
    cfg = dict(policy="fifo", dtype="float64", dim=50, frames=4, universe=300, steps=400,
               seed=606)
    rng = np.random.default_rng(cfg["seed"])
    path = tmp_path / "store"
    state, state_id, how, _ = crash_round(tmp_path, path, cfg, 0, ("none", 0), rng, {}, 0,
                                          p_checkpoint=0.0)
    assert how == "closed" and state_id == 1 and len(state) > 0
    check_store(path, state, 1, True, cfg["dim"], cfg["dtype"], set())
    cfg["steps"] = 100_000
    state2, state_id2, how, _ = crash_round(tmp_path, path, cfg, 1, ("delay", 0.3), rng, state,
                                            state_id, p_checkpoint=0.0)
    assert how == "old" and state_id2 == 1 and state2 is state
    check_store(path, state, 1, False, cfg["dim"], cfg["dtype"], set())


TAIL_PAGE_CHILD = """
import os, sys
import numpy as np
import mlkv
from mlkv.engine import _rule_kernels as R
s = mlkv.open(sys.argv[1], dim=4, state_dim=4, page_bits=12, memory_bytes=16 * 4096)
s.put(np.arange(10), np.ones((10, 4)))
s.checkpoint()
# after the checkpoint: updates give rows of the tail page non-zero state, and the page
# reaches the disk (as an eviction or a later flush would write it) before the crash
s.update(np.arange(10), np.full((10, 4), 3.0), "adagrad", R.hyper_vector("adagrad", 0.1))
s.engine.log.flush()
os._exit(0)
"""


def test_new_rows_after_a_crash_start_from_zero_state(tmp_path):
    """A crash after the checkpoint may leave later records in the checkpoint's tail page on
    disk. Reopened, rows appended there must start with zero optimizer state, as on a fresh
    page: an adagrad step from a new row gives the reference numbers for a zero accumulator."""
    from mlkv.engine import _rule_kernels as R
    path = str(tmp_path / "s")
    subprocess.run([sys.executable, "-c", TAIL_PAGE_CHILD, path], check=True, timeout=120)
    with mlkv.open(path) as s:
        keys = np.arange(100, 110)
        s.put(keys, np.ones((10, 4)))            # appended where the lost records were
        grads = np.full((10, 4), 2.0, np.float32)
        hyper = R.hyper_vector("adagrad", 0.1)
        s.update(keys, grads, "adagrad", hyper)
        rows, state = np.ones((10, 4), np.float32), np.zeros((10, 4), np.float32)
        R.apply("adagrad", rows, state, grads, hyper)
        np.testing.assert_array_equal(s.get(keys), rows)
        np.testing.assert_array_equal(s.get(np.arange(10)), np.ones((10, 4)))
        assert s.verify(progress=False)["ok"]


def test_content_id_names_the_rows_and_close_without_checkpoint_drops_writes(tmp_path):
    """content_id moves only with checkpoints that changed rows; close(checkpoint=False)
    returns the store to its last checkpoint."""
    path = str(tmp_path / "s")
    N = 2000                                       # 12 pages: most of them on disk
    with mlkv.open(path, dim=4, page_bits=12, memory_bytes=4 * 4096,
                   segment_bits=13, auto_compact=None) as s:
        assert s.content_id == 0 and not s.changed
        s.put(np.arange(N), np.ones((N, 4)))
        assert s.changed
        first = s.checkpoint()
        assert s.content_id == first and not s.changed
        s.get(np.arange(N))                      # copies rows to the tail: no change
        assert s.checkpoint() == first + 1 and s.content_id == first
        s.put(np.arange(N), np.full((N, 4), 2.0))   # dead records: compaction frees them
        s.checkpoint()
        changed_at = s.content_id
        assert changed_at == first + 2
        assert s.compact()["checkpoint_id"] == first + 3
        assert s.content_id == changed_at and s.stats()["content_id"] == changed_at
        s.put(np.arange(10), np.zeros((10, 4)))
        s.close(checkpoint=False)
    with mlkv.open(path) as s:
        assert s.checkpoint_id == first + 3 and s.content_id == changed_at
        np.testing.assert_array_equal(s.get(np.arange(N)), np.full((N, 4), 2.0))
    with mlkv.open(path) as s:        # the clean close above checkpointed, changing nothing
        assert s.content_id == changed_at
