"""One conformance suite that every segment-file device passes.

Each test runs on every device: ``FileDevice`` with ``O_DIRECT`` (skipped where the file
system of the test directory refuses it), ``FileDevice`` with buffered I/O, and the test-only
``FaultyDevice`` (see ``faulty_device.py``) with no fault armed, both ways. The reference is
independent of the device: a numpy array of the whole log address space plus the set of pages
written, compared with the segment files read back with plain Python file I/O.

The geometry is tiny (4 KiB pages, 16 KiB segment files of 4 pages), so random runs of pages
cross segment boundaries and files have holes.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from faulty_device import FaultyDevice
from model_checks import assert_store_holds

import mlkv
import mlkv.store
from mlkv.engine.device import FileDevice, _direct_block_bytes

PAGE_BITS = 12
SEGMENT_BITS = 14
PAGE = 1 << PAGE_BITS
SEGMENT = 1 << SEGMENT_BITS
PAGES_PER_SEGMENT = SEGMENT // PAGE
N_SEGMENTS = 6
N_PAGES = N_SEGMENTS * PAGES_PER_SEGMENT

# name -> (device class, direct argument)
DEVICES = {
    "direct": (FileDevice, True),
    "buffered": (FileDevice, False),
    "faulty-unarmed": (FaultyDevice, None),
    "faulty-unarmed-buffered": (FaultyDevice, False),
}


@pytest.fixture(params=list(DEVICES))
def device_kind(request, tmp_path):
    cls, direct = DEVICES[request.param]
    if direct and not _direct_block_bytes(str(tmp_path)):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    return cls, direct


@pytest.fixture
def make_device(device_kind, tmp_path):
    cls, direct = device_kind
    opened = []

    def make(directory=None, readonly=False, io_threads=4):
        directory = str(directory or tmp_path / "segments")
        os.makedirs(directory, exist_ok=True)
        device = cls(directory, PAGE_BITS, SEGMENT_BITS, readonly=readonly, direct=direct,
                     io_threads=io_threads)
        opened.append(device)
        return device

    yield make
    for device in opened:
        device.close()


def aligned(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array starting on a 4 KiB boundary (O_DIRECT buffers must be aligned)."""
    raw = np.zeros(nbytes + PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start:start + nbytes]


class LogModel:
    """What the segment files must hold: every byte of the log, and which pages were written."""

    def __init__(self):
        self.data = np.zeros(N_PAGES * PAGE, dtype=np.uint8)
        self.written = np.zeros(N_PAGES, dtype=bool)

    def write(self, first_page: int, pages: list) -> None:
        for i, page in enumerate(pages):
            p = first_page + i
            self.data[p * PAGE:(p + 1) * PAGE] = page
            self.written[p] = True

    def segments(self) -> list[int]:
        return sorted({p // PAGES_PER_SEGMENT for p in np.flatnonzero(self.written)})

    def file_pages(self, segment: int) -> int:
        """Pages the segment file holds (up to its last page written), 0 with no file."""
        pages = np.flatnonzero(self.written[segment * PAGES_PER_SEGMENT:
                                            (segment + 1) * PAGES_PER_SEGMENT])
        return int(pages.max()) + 1 if pages.size else 0

    def file_bytes(self, segment: int) -> bytes:
        start = segment * SEGMENT
        return self.data[start:start + self.file_pages(segment) * PAGE].tobytes()


def random_pages(rng, n: int) -> list:
    pages = []
    for _ in range(n):
        page = aligned(PAGE)
        page[:] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        pages.append(page)
    return pages


def write_random_runs(device, model, rng, runs: int, first_segment: int = 0) -> None:
    for _ in range(runs):
        first = int(rng.integers(first_segment * PAGES_PER_SEGMENT, N_PAGES))
        n = int(rng.integers(1, min(2 * PAGES_PER_SEGMENT + 2, N_PAGES - first) + 1))
        pages = random_pages(rng, n)
        before = device.bytes_written
        device.write_pages(first, pages)
        assert device.bytes_written - before == n * PAGE
        model.write(first, pages)


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_files_match(device, model) -> None:
    on_disk = sorted(int(name[8:-4]) for name in os.listdir(device.directory)
                     if re.fullmatch(r"segment-\d{6}\.log", name))
    assert on_disk == model.segments()
    for s in on_disk:
        assert read_file(device.segment_path(s)) == model.file_bytes(s), f"segment {s}"


@pytest.fixture
def written(make_device):
    """A device with random runs of pages written, and its model."""
    device = make_device()
    model = LogModel()
    write_random_runs(device, model, np.random.default_rng(1234), runs=12)
    return device, model


# ---- writes --------------------------------------------------------------------------------
def test_mode_is_what_was_asked(device_kind, make_device):
    device = make_device()
    _, direct = device_kind
    if direct is not None:
        assert device.direct == direct
    assert device.block_bytes > 0 and PAGE % device.block_bytes == 0
    assert device.segments() == [] and device.disk_bytes() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_written_pages_land_in_their_segment_files(make_device, seed):
    device = make_device()
    model = LogModel()
    rng = np.random.default_rng(seed)
    write_random_runs(device, model, rng, runs=15)
    assert len(model.segments()) > 1
    assert_files_match(device, model)
    assert device.segments() == model.segments()
    assert device.disk_bytes() == sum(model.file_pages(s) * PAGE for s in model.segments())
    assert device.disk_bytes() == sum(os.path.getsize(device.segment_path(s))
                                      for s in model.segments())
    device.write_pages(3, [])                       # nothing to write: nothing happens
    assert_files_match(device, model)


def test_a_run_across_segment_boundaries(make_device):
    device = make_device()
    model = LogModel()
    first = PAGES_PER_SEGMENT - 1                   # last page of segment 0 ...
    pages = random_pages(np.random.default_rng(5), 2 * PAGES_PER_SEGMENT + 2)   # ... to 3
    device.write_pages(first, pages)
    model.write(first, pages)
    assert device.segments() == [0, 1, 2, 3]
    assert_files_match(device, model)


# ---- page reads ----------------------------------------------------------------------------
def test_read_page_gives_what_was_written(written):
    device, model = written
    out = aligned(PAGE)
    for s in model.segments():
        for p in range(s * PAGES_PER_SEGMENT, s * PAGES_PER_SEGMENT + model.file_pages(s)):
            before = device.bytes_read
            out[:] = 0xAB
            device.read_page(p, out)
            # pages never written inside a file (holes) read as zeros
            assert out.tobytes() == model.data[p * PAGE:(p + 1) * PAGE].tobytes(), p
            assert device.bytes_read - before == PAGE


def test_read_page_outside_the_files_is_a_device_error(written):
    device, model = written
    out = aligned(PAGE)
    missing = N_SEGMENTS                            # never written: no file
    with pytest.raises(mlkv.DeviceError, match=re.escape(device.segment_path(missing))):
        device.read_page(missing * PAGES_PER_SEGMENT, out)
    for s in model.segments():
        if model.file_pages(s) < PAGES_PER_SEGMENT:     # a page past the end of the file
            with pytest.raises(mlkv.DeviceError, match=re.escape(device.segment_path(s))):
                device.read_page(s * PAGES_PER_SEGMENT + model.file_pages(s), out)


@pytest.mark.parametrize("seed", [0, 1])
def test_read_pages_returns_the_pages_the_file_holds(written, seed):
    device, model = written
    rng = np.random.default_rng(seed)
    buf = aligned(PAGES_PER_SEGMENT * PAGE)
    cases = [(int(rng.integers(0, N_PAGES + 2 * PAGES_PER_SEGMENT)), None) for _ in range(40)]
    for s in range(N_SEGMENTS + 2):                 # whole segments, from each page
        cases += [(s * PAGES_PER_SEGMENT + k, PAGES_PER_SEGMENT - k)
                  for k in range(PAGES_PER_SEGMENT)]
    for first, count in cases:
        segment, k = divmod(first, PAGES_PER_SEGMENT)
        if count is None:
            count = int(rng.integers(1, PAGES_PER_SEGMENT - k + 1))
        out = buf[:count * PAGE]
        out[:] = 0xCD
        got = device.read_pages(first, out)
        in_file = model.file_pages(segment) if segment < N_SEGMENTS else 0
        expected = max(0, min(count, in_file - k))
        assert got == expected, (first, count)
        assert out[:got * PAGE].tobytes() == model.data[first * PAGE:(first + got) * PAGE].tobytes()


def test_read_pages_refuses_a_range_across_segments(written):
    device, _ = written
    with pytest.raises(ValueError):
        device.read_pages(PAGES_PER_SEGMENT - 1, aligned(2 * PAGE))


# ---- record reads --------------------------------------------------------------------------
def random_record_addresses(rng, model, record_bytes: int, n: int) -> np.ndarray:
    """Sorted unique addresses of records lying inside one segment file each."""
    fits = [s for s in model.segments() if model.file_pages(s) * PAGE >= record_bytes]
    segments = rng.choice(fits, n)
    limits = np.array([model.file_pages(s) * PAGE - record_bytes for s in segments])
    offsets = (rng.random(n) * (limits + 1)).astype(np.int64)
    return np.unique(segments.astype(np.int64) * SEGMENT + offsets)


@pytest.mark.parametrize("record_bytes", [8, 48, 520, PAGE, 3 * PAGE + 24])
@pytest.mark.parametrize("n", [1, 7, 600])
def test_read_records_at_random_addresses(written, record_bytes, n):
    device, model = written
    rng = np.random.default_rng([record_bytes, n])
    addrs = random_record_addresses(rng, model, record_bytes, n)
    before = device.bytes_read
    out = device.read_records(addrs, record_bytes)
    assert out.shape == (addrs.shape[0], record_bytes) and out.dtype == np.uint8
    expected = np.stack([model.data[a:a + record_bytes] for a in addrs])
    mismatched = np.flatnonzero((out != expected).any(axis=1))
    assert mismatched.size == 0, f"wrong records at addresses {addrs[mismatched][:5]}"
    assert device.bytes_read - before >= addrs.shape[0] and device.bytes_read > before


def test_read_records_of_nothing(written):
    device, _ = written
    out = device.read_records(np.empty(0, dtype=np.int64), 48)
    assert out.shape == (0, 48)


def test_read_records_past_the_end_is_a_device_error(written):
    device, model = written
    s = model.segments()[-1]
    address = s * SEGMENT + model.file_pages(s) * PAGE - 8       # record runs past the file
    with pytest.raises(mlkv.DeviceError, match=re.escape(device.segment_path(s))):
        device.read_records(np.array([address], dtype=np.int64), 48)


# ---- durability, reopening, removing -------------------------------------------------------
def test_sync_and_reopen_see_the_same_files(written, make_device):
    device, model = written
    device.sync()
    device.close()
    assert device.segments() == []
    device.close()                                  # idempotent
    again = make_device()
    assert again.segments() == model.segments()
    assert again.disk_bytes() == sum(model.file_pages(s) * PAGE for s in model.segments())
    buf = aligned(PAGES_PER_SEGMENT * PAGE)
    for s in model.segments():
        got = again.read_pages(s * PAGES_PER_SEGMENT, buf)
        assert got == model.file_pages(s)
        assert buf[:got * PAGE].tobytes() == model.file_bytes(s)
    rng = np.random.default_rng(9)
    write_random_runs(again, model, rng, runs=4)    # and it keeps writing where asked
    again.sync()
    assert_files_match(again, model)


def test_close_releases_every_file(make_device):
    def open_fds():
        return len(os.listdir("/proc/self/fd"))
    before = open_fds()
    device = make_device()
    write_random_runs(device, LogModel(), np.random.default_rng(3), runs=8)
    assert open_fds() - before == len(device.segments()) > 0
    device.close()
    assert open_fds() == before


def test_remove_segments_below(make_device):
    device = make_device()
    model = LogModel()
    write_random_runs(device, model, np.random.default_rng(8), runs=12, first_segment=1)
    files = {s: os.path.getsize(device.segment_path(s)) for s in model.segments()}
    assert 0 not in files and len(files) >= 3
    # a file a crash left behind (never opened by this device) is removed too
    with open(device.segment_path(0), "wb") as f:
        f.write(b"x" * 100)
    files[0] = 100
    other = os.path.join(device.directory, "index-000001.bin")
    with open(other, "wb") as f:
        f.write(b"not a segment")
    assert device.remove_segments_below(0) == 0
    cut = sorted(files)[len(files) // 2]
    freed = device.remove_segments_below(cut)
    assert freed == sum(size for s, size in files.items() if s < cut)
    for s in files:
        assert os.path.exists(device.segment_path(s)) == (s >= cut)
    assert os.path.exists(other)
    assert device.segments() == [s for s in model.segments() if s >= cut]
    assert device.disk_bytes() == sum(size for s, size in files.items() if s >= cut)
    assert device.read_pages((cut - 1) * PAGES_PER_SEGMENT, aligned(PAGE)) == 0
    buf = aligned(PAGES_PER_SEGMENT * PAGE)
    for s in device.segments():                     # the rest is untouched
        got = device.read_pages(s * PAGES_PER_SEGMENT, buf)
        assert buf[:got * PAGE].tobytes() == model.file_bytes(s)
    assert device.remove_segments_below(cut) == 0


def test_read_only_device_refuses_writes(written, make_device):
    device, model = written
    device.close()
    reader = make_device(readonly=True)
    with pytest.raises(mlkv.DeviceError):
        reader.write_pages(0, random_pages(np.random.default_rng(0), 1))
    with pytest.raises(mlkv.DeviceError):
        reader.remove_segments_below(N_SEGMENTS)
    assert_files_match(reader, model)               # nothing written, nothing removed
    out = aligned(PAGE)
    p = int(np.flatnonzero(model.written)[0])
    reader.read_page(p, out)
    assert out.tobytes() == model.data[p * PAGE:(p + 1) * PAGE].tobytes()


def test_location_names_the_segment_file(written):
    device, _ = written
    rng = np.random.default_rng(4)
    for address in rng.integers(0, N_PAGES * PAGE, 50):
        segment, offset = divmod(int(address), SEGMENT)
        where = device.location(int(address))
        assert where.startswith(device.segment_path(segment))
        assert os.path.basename(device.segment_path(segment)) == f"segment-{segment:06d}.log"
        numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", where[len(
            device.segment_path(segment)):])]
        assert offset in numbers, where
        page = int(address) >> PAGE_BITS
        assert device.page_location(page) == device.location(page << PAGE_BITS)


# ---- the store on each device --------------------------------------------------------------
def test_store_end_to_end(device_kind, tmp_path, monkeypatch):
    cls, direct = device_kind
    monkeypatch.setattr(mlkv.store.Store, "_device_class", cls)
    path = tmp_path / "store"
    settings = {"memory_bytes": 8 * PAGE, "direct_io": direct}
    store = mlkv.open(path, dim=8, page_bits=PAGE_BITS, segment_bits=SEGMENT_BITS, **settings)
    assert type(store.engine.device) is cls
    rng = np.random.default_rng(77)
    model, gone = {}, set()
    try:
        for step in range(40):
            keys = rng.integers(0, 3000, int(rng.integers(1, 200))).astype(np.int64)
            r = rng.random()
            if r < 0.6:
                values = rng.standard_normal((keys.size, 8)).astype(np.float32)
                store.put(keys, values)
                model.update(zip(keys.tolist(), values))
            elif r < 0.75:
                store.delete(keys)
                for k in keys.tolist():
                    model.pop(k, None)
                gone.update(keys.tolist())
            else:
                present = np.array([k for k in keys.tolist() if k in model], dtype=np.int64)
                if present.size:
                    np.testing.assert_array_equal(store.get(present),
                                                  np.stack([model[k] for k in present.tolist()]))
            if step % 10 == 9:
                store.checkpoint()
            if step == 24:
                store.close()
                store = mlkv.open(path, **settings)
                assert type(store.engine.device) is cls
        stats = store.stats()
        assert stats["bytes_written"] > 0 and stats["segments"] > 1
        assert_store_holds(store, model, gone, batch=97)
    finally:
        store.close()
    store = mlkv.open(path, **settings)
    try:
        assert_store_holds(store, model, gone, batch=97)
        assert store.stats()["misses"] > 0           # rows came back from the segment files
        assert store.verify(progress=False)["ok"]
    finally:
        store.close()


def test_two_devices_opening_one_directory_at_once(tmp_path, monkeypatch):
    directory = str(tmp_path)
    if not _direct_block_bytes(directory):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT: no probe race")
    real_pwritev = os.pwritev
    others = []

    started = []

    def pwritev(fd, buffers, offset):
        if not started:     # another opener of the same store probes while this one does
            started.append(True)
            others.append(FileDevice(directory, PAGE_BITS, SEGMENT_BITS, readonly=True))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    try:
        first = FileDevice(directory, PAGE_BITS, SEGMENT_BITS, readonly=True)
        first.close()
    finally:
        for device in others:
            device.close()
    assert others and others[0].direct and first.direct
