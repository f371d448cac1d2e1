"""Device faults: a store that meets one stops, and reopens at its last checkpoint.

A store with 4 KiB pages and a buffer pool of 16 pages (so puts, deletes and reads evict pages
to 16 KiB segment files) runs on :class:`FaultyDevice` beside a ``dict`` model, and a snapshot
of the model is kept at every checkpoint it completes (including those of automatic
compaction). Then a fault is armed and the store keeps operating until the fault fires:

- the disk fills up (a torn, partial write, then ``ENOSPC``) while a put evicts pages, while a
  mix of operations does, or while a checkpoint flushes its pages; budgets of 0 bytes, one
  block, a few pages plus a few bytes and random ones, so torn writes end at different places;
- ``fsync`` fails in a checkpoint;
- a cold ``get`` gets a short read; the tail-page read of reopening gets a short read.

Each time: the failing call raises ``mlkv.DeviceError`` naming the file or the call; every later
call raises ``DeviceError`` saying to reopen, and writes nothing; ``close()`` works and releases
the lock; reopening with the normal device gives exactly the snapshot of the last checkpoint,
``verify()`` finds nothing wrong, and the reopened store keeps working over the torn bytes.

Also: a flipped byte in a segment file raises ``CorruptionError`` naming the file (no rows
returned) while the other rows read fine, and ``store.verify()`` and ``mlkv verify`` name the
damaged page (exit status 1, and 0 on a sound store).
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from faulty_device import FaultyDevice
from model_checks import assert_store_holds

import mlkv
import mlkv.store
from mlkv.engine.device import FileDevice, _direct_block_bytes

PAGE_BITS = 12
PAGE = 1 << PAGE_BITS
SEGMENT_BITS = 14
DIM = 8
MEMORY = 16 * PAGE
UNIVERSE = 3000


@pytest.fixture
def use_device(monkeypatch):
    """Stores opened in the test run on FaultyDevice; ``use_device(cls)`` switches to ``cls``."""
    def use(device_class):
        monkeypatch.setattr(mlkv.store.Store, "_device_class", device_class)

    use(FaultyDevice)
    return use


def direct_modes():
    """O_DIRECT (where the temp directory allows it) and buffered I/O."""
    with tempfile.TemporaryDirectory() as d:
        direct_ok = bool(_direct_block_bytes(d))
    return [pytest.param(True, id="direct", marks=pytest.mark.skipif(
        not direct_ok, reason="the temp file system refuses O_DIRECT")),
            pytest.param(False, id="buffered")]


def open_store(path, direct=None, **kwargs):
    return mlkv.open(path, dim=DIM, page_bits=PAGE_BITS, segment_bits=SEGMENT_BITS,
                     memory_bytes=MEMORY, direct_io=direct, **kwargs)


class Workload:
    """Random operations on a store and on a dict model, with a snapshot per checkpoint."""

    def __init__(self, store, seed, model=None):
        self.store = store
        self.rng = np.random.default_rng(seed)
        self.model = dict(model or {})
        self.touched = set(self.model)
        self.durable = dict(self.model)
        self.durable_id = store.checkpoint_id

    def step(self, kinds=("put", "put", "delete", "get")) -> str:
        """One random operation; the model changes only if the store's call returns."""
        kind = kinds[int(self.rng.integers(len(kinds)))]
        n = int(self.rng.integers(1, 300))
        keys = self.rng.integers(0, UNIVERSE, n).astype(np.int64)
        if kind == "put":
            values = self.rng.standard_normal((n, DIM)).astype(np.float32)
            self.store.put(keys, values)
            self.model.update(zip(keys.tolist(), values))
            self.touched.update(keys.tolist())
        elif kind == "delete":
            removed = self.store.delete(keys)
            gone = {k for k in keys.tolist() if k in self.model}
            assert removed == len(gone)
            for k in gone:
                del self.model[k]
        elif kind == "get":
            present = np.array(sorted({k for k in keys.tolist() if k in self.model}),
                               dtype=np.int64)
            got = self.store.get(present)
            if present.size:
                np.testing.assert_array_equal(got, np.stack([self.model[k] for k in present]))
        elif kind == "checkpoint":
            self.store.checkpoint()
        else:
            raise ValueError(kind)
        if self.store.checkpoint_id != self.durable_id:     # ours, or automatic compaction's
            self.durable, self.durable_id = dict(self.model), self.store.checkpoint_id
        return kind

    def run(self, steps, checkpoint_every=7):
        for i in range(steps):
            self.step()
            if i % checkpoint_every == checkpoint_every - 1:
                self.step(("checkpoint",))

    def cold_keys(self) -> np.ndarray:
        """Keys of the model whose rows are on disk only (below the log's head)."""
        keys = np.array(sorted(self.model), dtype=np.int64)
        addrs = self.store.engine.index.lookup(keys)
        return keys[(addrs >= 0) & (addrs < self.store.engine.log.head)]


def read_bytes(path) -> bytes | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def first_fault(work, kinds, max_steps=300) -> mlkv.DeviceError:
    """Operate until a call raises DeviceError; return it."""
    for _ in range(max_steps):
        try:
            work.step(kinds)
        except mlkv.DeviceError as exc:
            return exc
    pytest.fail(f"no fault fired in {max_steps} operations")


def later_calls(store):
    keys = np.arange(5, dtype=np.int64)
    values = np.ones((5, DIM), dtype=np.float32)
    return {
        "get": lambda: store.get(keys),
        "put": lambda: store.put(keys, values),
        "delete": lambda: store.delete(keys),
        "get_or_init": lambda: store.get_or_init(keys),
        "contains": lambda: store.contains(keys),
        "lookahead": lambda: store.lookahead(keys),
        "len": lambda: len(store),
        "keys": lambda: store.keys(),
        "items": lambda: list(store.items()),
        "stats": lambda: store.stats(),
        "verify": lambda: store.verify(progress=False),
        "compact": lambda: store.compact(progress=False),
        "checkpoint": lambda: store.checkpoint(),
    }


def assert_stopped_then_recovers(path, store, work, error, use_device, mentions=()) -> None:
    """The checks every fault ends with (see the module docstring)."""
    device = store.engine.device
    assert isinstance(error, mlkv.MlkvError) and isinstance(error, mlkv.DeviceError)
    message = str(error)
    for part in mentions:
        assert part in message, f"{part!r} not in {message!r}"
    faults, written = device.faults, device.bytes_written
    # every later call fails, saying to reopen, and touches nothing
    for name, call in later_calls(store).items():
        with pytest.raises(mlkv.DeviceError) as later:
            call()
        assert "reopen" in str(later.value), (name, str(later.value))
        assert message in str(later.value), name
    assert "device error" in repr(store)
    assert (device.faults, device.bytes_written) == (faults, written)
    # close works without a checkpoint (the manifest stays at the last one) and frees all
    manifest = os.path.join(path, "manifest.json")
    before = read_bytes(manifest)
    store.close()
    store.close()
    assert read_bytes(manifest) == before
    assert device.segments() == [] and device._empty_fd < 0
    with pytest.raises(mlkv.ClosedStoreError):
        len(store)
    # reopen (which takes the lock again) with the normal device: the last checkpoint
    use_device(FileDevice)
    reopened = mlkv.open(path)
    try:
        assert type(reopened.engine.device) is FileDevice
        assert reopened.checkpoint_id == work.durable_id
        assert_store_holds(reopened, work.durable, work.touched)
        report = reopened.verify(progress=False)
        assert report["ok"], report
        # and it keeps working over whatever the torn write left past the tail
        more = Workload(reopened, seed=99, model=work.durable)
        more.touched |= work.touched
        more.run(25, checkpoint_every=10)
        more.step(("checkpoint",))
        model, touched = more.model, more.touched
    finally:
        reopened.close()
    with mlkv.open(path) as again:
        assert_store_holds(again, model, touched)
        assert again.verify(progress=False)["ok"]


BUDGETS = ["zero", "one-block", "pages", "random"]


def budget_for(name, device, rng) -> int:
    """Bytes the disk takes before it is full: torn writes then end at different places."""
    block = device.block_bytes if device.direct else 512        # buffered: one sector
    return {"zero": 0, "one-block": block, "pages": 3 * PAGE + 100,
            "random": int(rng.integers(0, 12 * PAGE))}[name]


# ---- a full disk ---------------------------------------------------------------------------
@pytest.mark.parametrize("direct", direct_modes())
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_disk_full_while_a_put_evicts(tmp_path, use_device, direct, budget, seed):
    path = str(tmp_path / "store")
    store = open_store(path, direct)
    work = Workload(store, seed)
    work.run(30)
    device = store.engine.device
    device.fail_write_after_bytes = budget_for(budget, device, work.rng)
    error = first_fault(work, ("put",))
    assert device.write_faults == 1
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ENOSPC
    segment_named = re.search(r"segment-\d{6}\.log", str(error))
    assert segment_named and os.path.exists(os.path.join(path, segment_named.group()))
    assert_stopped_then_recovers(path, store, work, error, use_device,
                                 mentions=(path, os.strerror(errno.ENOSPC)))


@pytest.mark.parametrize("direct", direct_modes())
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_disk_full_during_any_operation(tmp_path, use_device, direct, seed):
    """Puts, deletes and reads (which copy cold rows to the tail) all evict."""
    path = str(tmp_path / "store")
    store = open_store(path, direct)
    work = Workload(store, seed)
    work.run(20)
    store.engine.device.fail_write_after_bytes = int(work.rng.integers(0, 20 * PAGE))
    error = first_fault(work, ("put", "delete", "get", "get"))
    assert_stopped_then_recovers(path, store, work, error, use_device,
                                 mentions=(path, os.strerror(errno.ENOSPC)))


@pytest.mark.parametrize("direct", direct_modes())
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_disk_full_while_a_checkpoint_flushes(tmp_path, use_device, direct, budget, seed):
    path = str(tmp_path / "store")
    store = open_store(path, direct)
    work = Workload(store, seed)
    work.run(20)
    # dirty many pages without evicting: new rows fill most of the buffer pool
    per_page = PAGE // store.layout.record_bytes
    fresh = np.arange(UNIVERSE, UNIVERSE + 10 * per_page, dtype=np.int64)
    work.step(("checkpoint",))
    values = work.rng.standard_normal((fresh.size, DIM)).astype(np.float32)
    store.put(fresh, values)
    work.model.update(zip(fresh.tolist(), values))
    work.touched.update(fresh.tolist())
    device = store.engine.device
    dirty_bytes = int(store.engine.log.dirty.sum()) * PAGE
    device.fail_write_after_bytes = budget_for(budget, device, work.rng) % dirty_bytes
    with pytest.raises(mlkv.DeviceError) as caught:
        work.step(("checkpoint",))
    assert device.write_faults == 1
    assert caught.value.__cause__.errno == errno.ENOSPC
    assert_stopped_then_recovers(path, store, work, caught.value, use_device,
                                 mentions=(path, os.strerror(errno.ENOSPC)))


# ---- fsync ---------------------------------------------------------------------------------
@pytest.mark.parametrize("direct", direct_modes())
@pytest.mark.parametrize("seed", [0, 1])
def test_fsync_fails_in_a_checkpoint(tmp_path, use_device, direct, seed):
    path = str(tmp_path / "store")
    store = open_store(path, direct)
    work = Workload(store, seed)
    work.run(20)
    work.step(("put",))
    device = store.engine.device
    assert device.segments()
    device.fail_fsync = True
    with pytest.raises(mlkv.DeviceError) as caught:
        work.step(("checkpoint",))
    assert device.fsync_faults == 1 and device.write_faults == 0
    assert caught.value.__cause__.errno == errno.EIO
    assert_stopped_then_recovers(path, store, work, caught.value, use_device,
                                 mentions=("fsync", path, "segment-"))


# ---- short reads ---------------------------------------------------------------------------
@pytest.mark.parametrize("direct", direct_modes())
@pytest.mark.parametrize("n_keys", [1, 40, 200])
def test_short_read_on_a_cold_get(tmp_path, use_device, direct, n_keys):
    path = str(tmp_path / "store")
    store = open_store(path, direct)
    work = Workload(store, n_keys)
    work.run(30)
    cold = work.cold_keys()
    assert cold.size >= n_keys
    keys = work.rng.permutation(cold)[:n_keys]
    segments = {int(a) >> SEGMENT_BITS for a in store.engine.index.lookup(keys)}
    device = store.engine.device
    device.short_reads = True
    with pytest.raises(mlkv.DeviceError) as caught:
        store.get(keys)
    assert device.read_faults >= 1
    message = str(caught.value)
    assert "short read" in message
    assert any(device.segment_path(s) in message for s in segments), message
    assert_stopped_then_recovers(path, store, work, caught.value, use_device)


@pytest.mark.parametrize("readonly", [False, True], ids=["writer", "reader"])
@pytest.mark.parametrize("direct", direct_modes())
def test_short_read_of_the_tail_page_on_reopen(tmp_path, use_device, direct, readonly):
    path = str(tmp_path / "store")
    store = open_store(path, direct)
    work = Workload(store, 5)
    work.run(20)
    store.close()                           # a last checkpoint: the model as it is
    tail = json.loads(read_bytes(os.path.join(path, "manifest.json")))["tail"]
    assert tail % PAGE, "the tail page is read back only when the tail is inside it"
    armed = FaultyDevice.armed(short_reads=True)
    use_device(armed)
    with pytest.raises(mlkv.MlkvError) as caught:
        mlkv.open(path, readonly=readonly, direct_io=direct)
    message = str(caught.value)
    assert "short read" in message
    assert os.path.join(path, f"segment-{tail >> SEGMENT_BITS:06d}.log") in message, message
    (device,) = armed.instances
    assert device.read_faults == 1 and device.segments() == []     # and its files closed
    use_device(FileDevice)
    with mlkv.open(path) as reopened:       # the lock was released
        assert_store_holds(reopened, work.model, work.touched)
        assert reopened.verify(progress=False)["ok"]


def test_short_page_reads_in_verify_are_reported_not_hidden(tmp_path, use_device):
    store = open_store(str(tmp_path / "store"))
    try:
        Workload(store, 6).run(20)
        device = store.engine.device
        device.short_reads = True
        report = store.verify(progress=False)
        assert not report["ok"] and device.read_faults > 0
        assert {p["problem"] for p in report["damaged_pages"]} == {"missing"}
        device.short_reads = False
        assert store.verify(progress=False)["ok"]
    finally:
        store.close()


def test_fdatasync_failure_in_a_buffered_eviction_stops_the_store(tmp_path, use_device, monkeypatch):
    path = str(tmp_path / "store")
    store = open_store(path, direct=False)
    work = Workload(store, 8)
    work.run(20)

    def failing_fdatasync(fd):
        raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected fdatasync failure)")

    try:
        with monkeypatch.context() as m:
            m.setattr(os, "fdatasync", failing_fdatasync)
            error = first_fault(work, ("put",))
        assert_stopped_then_recovers(path, store, work, error, use_device,
                                     mentions=(path, os.strerror(errno.EIO)))
    finally:
        store.close()


# ---- the fault device itself ---------------------------------------------------------------
def aligned(nbytes):
    raw = np.zeros(nbytes + PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start:start + nbytes]


@pytest.mark.parametrize("direct", direct_modes())
@pytest.mark.parametrize("budget", [0, 1, 511, 512, 4096, 4096 + 700, 3 * 4096 - 1])
def test_a_torn_write_writes_the_prefix_the_budget_allows(tmp_path, direct, budget):
    device = FaultyDevice(str(tmp_path), PAGE_BITS, SEGMENT_BITS, direct=direct)
    try:
        rng = np.random.default_rng(budget)
        old = [aligned(PAGE) for _ in range(3)]
        for page in old:
            page[:] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        device.write_pages(0, old)
        new = [aligned(PAGE) for _ in range(3)]
        for page in new:
            page[:] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        device.fail_write_after_bytes = PAGE + budget   # one page fits, the next run tears
        device.write_pages(5, new[:1])
        with pytest.raises(mlkv.DeviceError) as caught:
            device.write_pages(0, new)
        assert caught.value.__cause__.errno == errno.ENOSPC
        assert device.segment_path(0) in str(caught.value)
        assert device.write_faults == 1
        prefix = budget - budget % device.block_bytes if device.direct else budget
        expected = np.concatenate(new).tobytes()[:prefix] + np.concatenate(old).tobytes()[prefix:]
        with open(device.segment_path(0), "rb") as f:
            assert f.read() == expected
        with open(device.segment_path(1), "rb") as f:
            assert f.read()[PAGE:] == new[0].tobytes()
        with pytest.raises(mlkv.DeviceError):           # the disk stays full
            device.write_pages(6, new[:1])
        assert device.write_faults == 2
        assert os.path.getsize(device.segment_path(1)) == 2 * PAGE
    finally:
        device.close()


def test_fault_device_short_reads_and_fsync(tmp_path):
    device = FaultyDevice(str(tmp_path), PAGE_BITS, SEGMENT_BITS)
    try:
        pages = [aligned(PAGE) for _ in range(4)]
        for i, page in enumerate(pages):
            page[:] = i + 1
        device.write_pages(0, pages)
        device.sync()
        device.fail_fsync = True
        with pytest.raises(mlkv.DeviceError, match="fsync"):
            device.sync()
        assert device.fsync_faults == 1
        device.short_reads = True
        with pytest.raises(mlkv.DeviceError, match="short read"):
            device.read_page(1, aligned(PAGE))
        assert 0 < device.read_pages(0, aligned(4 * PAGE)) < 4
        with pytest.raises(mlkv.DeviceError, match="short read"):
            device.read_records(np.array([8, 5000], dtype=np.int64), 48)
        assert device.read_faults == 3
        device.short_reads = False
        got = device.read_records(np.array([8, 5000], dtype=np.int64), 48)
        assert (got[0] == 1).all() and (got[1] == 2).all()
    finally:
        device.close()
    assert device._empty_fd < 0


# ---- damaged segment files -----------------------------------------------------------------
@pytest.fixture
def damaged_store(tmp_path):
    """A closed store with one byte of one cold row flipped in its segment file."""
    path = str(tmp_path / "store")
    store = open_store(path, auto_compact=None)
    work = Workload(store, 11)
    work.run(25)
    cold = work.cold_keys()
    tail_page = store.engine.log.tail >> PAGE_BITS
    addrs = store.engine.index.lookup(cold)
    keep = (addrs >> PAGE_BITS) < tail_page          # not on the tail page reopening checks
    victim = int(work.rng.choice(cold[keep]))
    address = int(store.engine.index.lookup(np.array([victim]))[0])
    record_bytes = store.layout.record_bytes
    store.close()
    segment = os.path.join(path, f"segment-{address >> SEGMENT_BITS:06d}.log")
    offset = (address & ((1 << SEGMENT_BITS) - 1)) + 16 + int(work.rng.integers(0, 4 * DIM))
    with open(segment, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x5A]))
    return {"path": path, "model": work.model, "touched": work.touched, "victim": victim,
            "address": address, "segment": segment, "record_bytes": record_bytes,
            "offset": offset, "byte": byte}


def test_a_damaged_row_raises_corruption_naming_the_file(damaged_store):
    d = damaged_store
    with mlkv.open(d["path"], auto_compact=None) as store:
        others = np.array(sorted(set(d["model"]) - {d["victim"]}), dtype=np.int64)
        batch = np.concatenate([others[:50], [d["victim"]], others[50:100]])
        for keys in (np.array([d["victim"]]), batch):
            with pytest.raises(mlkv.CorruptionError) as caught:
                store.get(keys)
            assert d["segment"] in str(caught.value)
            assert str(d["victim"]) in str(caught.value)
        assert store.contains(np.array([d["victim"]]))[0]
        # every other row still reads fine, from disk and memory, and the store is not stopped
        np.testing.assert_array_equal(store.get(others),
                                      np.stack([d["model"][k] for k in others]))
        assert len(store) == len(d["model"])
        with pytest.raises(mlkv.CorruptionError):
            store.get(np.array([d["victim"]]))
    # closing checkpointed; the damaged row was not copied anywhere with a fresh checksum
    with mlkv.open(d["path"], readonly=True) as store:
        with pytest.raises(mlkv.CorruptionError, match=re.escape(d["segment"])):
            store.get(np.array([d["victim"]]))
        assert not store.verify(progress=False)["ok"]


def test_verify_names_the_damaged_page(damaged_store):
    d = damaged_store
    page = d["address"] >> PAGE_BITS
    slot = (d["address"] & (PAGE - 1)) // d["record_bytes"]
    with mlkv.open(d["path"], readonly=True) as store:
        report = store.verify(progress=False)
    assert not report["ok"] and report["n_damaged_pages"] == 1
    (damaged,) = report["damaged_pages"]
    assert damaged["page"] == page and damaged["problem"] == "checksum"
    assert damaged["slots"] == [slot]
    assert damaged["location"].startswith(d["segment"])

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mlkv", "verify", *args, d["path"]],
                              check=False, capture_output=True, text=True, timeout=120)

    result = cli()
    assert result.returncode == 1, result.stderr
    assert f"page {page:,}" in result.stdout and d["segment"] in result.stdout
    result = cli("--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["damaged_pages"][0]["page"] == page

    # put the byte back: the store is sound again
    with open(d["segment"], "r+b") as f:
        f.seek(d["offset"])
        f.write(bytes([d["byte"]]))
    result = cli()
    assert result.returncode == 0, result.stdout + result.stderr
    with mlkv.open(d["path"], readonly=True) as store:
        assert store.verify(progress=False)["ok"]
        assert_store_holds(store, d["model"], d["touched"])
