"""Checksums and verification: damage of every kind is found, named, and never read as rows.

The expected page of each damaged byte is computed here from the file offset and the store's
geometry, not taken from mlkv; slot soundness is judged with the pure-Python checksum of
tests/reference.py.
"""

import io
import os

import numpy as np
import pytest

import mlkv
from mlkv.engine import _checksum_kernels as CK
from mlkv.progress import Progress

import reference as R

PAGE_BITS, SEGMENT_BITS, DIM = 12, 15, 8
RECORD_BYTES = 16 + 4 * DIM                     # no state: 48 bytes
PER_PAGE = (1 << PAGE_BITS) // RECORD_BYTES     # 85 records a page
ROWS = 3000


def _store(path, **kwargs):
    return mlkv.open(path, dim=DIM, page_bits=PAGE_BITS, segment_bits=SEGMENT_BITS,
                     memory_bytes=8 << PAGE_BITS, policy="fifo", **kwargs)


def _make(path):
    rows = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    with _store(path) as s:
        s.put(np.arange(ROWS), rows)
    return rows


def _address_of(path, key):
    with mlkv.open(path, readonly=True) as s:
        return int(s.engine.index.lookup(np.array([key], np.int64))[0])


def _flip(path, address, bit=0):
    """Flip one bit of the byte at log ``address``; returns the page it lies on."""
    segment = os.path.join(path, f"segment-{address >> SEGMENT_BITS:06d}.log")
    offset = address & ((1 << SEGMENT_BITS) - 1)
    with open(segment, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
    return address >> PAGE_BITS


def test_a_sound_store_verifies_while_open_and_closed(tmp_path):
    path = str(tmp_path / "s")
    rows = _make(path)
    with _store(path) as s:
        s.put(np.arange(100), rows[:100] + 1)     # some rows newer in memory than on disk
        report = s.verify(progress=False)
        assert report["ok"], report
        assert report["pages_checked"] >= ROWS // PER_PAGE
    with mlkv.open(path, readonly=True) as s:
        report = s.verify(progress=False)
        assert report["ok"] and not report["damaged_pages"] and not report["bad_entries"]


@pytest.mark.parametrize("where", ["value", "key", "header flags", "checksum bits"])
def test_a_flipped_bit_is_found_by_verify_and_by_reads(tmp_path, where):
    path = str(tmp_path / "s")
    rows = _make(path)
    key = 1234
    address = _address_of(path, key)
    offset = {"value": 16 + 4 * 3 + 1, "key": 8, "header flags": 6, "checksum bits": 3}[where]
    page = _flip(path, address + offset, bit=2)
    with mlkv.open(path, readonly=True) as s:
        report = s.verify(progress=False)
        assert not report["ok"]
        assert [d["page"] for d in report["damaged_pages"]] == [page]
        slot = (address - (page << PAGE_BITS)) // RECORD_BYTES
        assert report["damaged_pages"][0]["slots"] == [slot]
        assert f"segment-{address >> SEGMENT_BITS:06d}.log" in report["damaged_pages"][0][
            "location"]
        with pytest.raises(mlkv.CorruptionError, match=f"segment-{address >> SEGMENT_BITS:06d}"):
            s.get(np.array([key - 1, key, key + 1]))
        others = np.setdiff1d(np.arange(ROWS), [key])
        np.testing.assert_array_equal(s.get(others), rows[others])


def test_padding_made_valid_and_a_misplaced_page_are_found(tmp_path):
    path = str(tmp_path / "s")
    _make(path)
    # the padding after the last record of page 2 gains a VALID flag
    pad = (2 << PAGE_BITS) + PER_PAGE * RECORD_BYTES
    _flip(path, pad + 6, bit=0)
    # pages 5 and 6 swap places, as a misdirected write would leave them: every record
    # still checks as a record, but not at that address
    segment = os.path.join(path, "segment-000000.log")
    with open(segment, "r+b") as f:
        f.seek(5 << PAGE_BITS)
        five = f.read(1 << PAGE_BITS)
        six = f.read(1 << PAGE_BITS)
        f.seek(5 << PAGE_BITS)
        f.write(six + five)
    with mlkv.open(path, readonly=True) as s:
        report = s.verify(progress=False)
    damaged = {d["page"]: d for d in report["damaged_pages"]}
    assert set(damaged) == {2, 5, 6}
    assert damaged[2]["slots"] == [PER_PAGE]           # the padding's pseudo-slot
    assert len(damaged[5]["slots"]) == PER_PAGE and len(damaged[6]["slots"]) == PER_PAGE
    # the index entries of the swapped pages name other keys than theirs
    assert report["n_bad_entries"] == 2 * PER_PAGE


def test_a_truncated_segment_shows_missing_pages(tmp_path):
    path = str(tmp_path / "s")
    _make(path)
    segment = os.path.join(path, "segment-000001.log")
    size = os.path.getsize(segment)
    os.truncate(segment, size - (2 << PAGE_BITS))
    first_missing = ((1 << SEGMENT_BITS) + size - (2 << PAGE_BITS)) >> PAGE_BITS
    with mlkv.open(path, readonly=True) as s:
        report = s.verify(progress=False)
    missing = [d["page"] for d in report["damaged_pages"] if d["problem"] == "missing"]
    assert missing == [first_missing, first_missing + 1]
    assert report["n_bad_entries"] == 0 or not report["ok"]


def test_an_index_entry_pointing_at_another_row_is_reported(tmp_path):
    path = str(tmp_path / "s")
    _make(path)
    with _store(path) as s:
        index = s.engine.index
        other = int(index.lookup(np.array([7], np.int64))[0])
        index.assign(np.array([8], np.int64), np.array([other], np.int64))
        report = s.verify(progress=False)
        assert not report["ok"] and report["bad_entries"] == [{"key": 8, "address": other}]
        with pytest.raises(mlkv.CorruptionError, match="key 8"):
            s.get(np.array([8]))
        index.assign(np.array([8], np.int64), np.array([_address_of_open(s, 8)], np.int64))


def _address_of_open(store, key):
    """The address of ``key``'s record found by scanning the disk (the index is broken)."""
    with open(os.path.join(store.path, "segment-000000.log"), "rb") as f:
        data = f.read()
    for a in range(1 << PAGE_BITS, len(data) - RECORD_BYTES, RECORD_BYTES):
        page_start = a >> PAGE_BITS << PAGE_BITS
        slot_start = page_start + (a - page_start) // RECORD_BYTES * RECORD_BYTES
        if int.from_bytes(data[slot_start + 8:slot_start + 16], "little", signed=True) == key:
            return slot_start
    raise AssertionError(key)


def test_check_page_matches_the_reference_on_random_damage():
    """The kernel's damaged slots are exactly those the pure-Python checksum rejects."""
    rng = np.random.default_rng(5)
    record_words = RECORD_BYTES // 8
    words = np.zeros((1, (1 << PAGE_BITS) // 8), np.int64)
    first_address = 9 << PAGE_BITS
    n = PER_PAGE - 5                                    # the last slots stay empty
    for r in range(n):
        base = r * record_words
        words[0, base] = 1 << 48
        words[0, base + 1] = rng.integers(-2**62, 2**62)
        words[0, base + 2:base + record_words] = rng.integers(-2**62, 2**62, record_words - 2)
    CK.seal_pages(words, PAGE_BITS, record_words, 9, 10)
    page = words[0]
    for trial in range(200):
        damaged = page.copy()
        for _ in range(rng.integers(1, 4)):
            damaged.view(np.uint8)[rng.integers(0, 1 << PAGE_BITS)] ^= \
                np.uint8(1 << rng.integers(0, 8))
        bad = np.empty(PER_PAGE + 1, np.int64)
        got = bad[:CK.check_page(damaged, first_address, record_words, PER_PAGE, bad)]
        raw = damaged.view(np.uint8).tobytes()
        expected = []
        for r in range(PER_PAGE):
            rec = raw[r * RECORD_BYTES:(r + 1) * RECORD_BYTES]
            header = int.from_bytes(rec[:8], "little")
            if header >> 48 & R.FLAG_VALID:
                sound = (header >> 16) & 0xFFFFFFFF == R.record_checksum(
                    rec, first_address + r * RECORD_BYTES)
            else:
                sound = not any(rec)
            if not sound:
                expected.append(r)
        if any(raw[PER_PAGE * RECORD_BYTES:]):
            expected.append(PER_PAGE)
        assert got.tolist() == expected, trial


def test_progress_bar_draws_on_a_terminal_only(tmp_path, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    with Progress(10, "verify", stream=out) as bar:
        for _ in range(10):
            bar.update(1)
    text = out.getvalue()
    assert text.startswith("\rverify [") and text.endswith("\n")
    assert "100% 10/10 pages" in text
    quiet = io.StringIO()
    with Progress(10, "verify", stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
    path = str(tmp_path / "s")
    _make(path)
    with mlkv.open(path, readonly=True) as s:
        s.verify(progress=True)
    assert "verify [" in capsys.readouterr().err
    with _store(path) as s:
        s.put(np.arange(ROWS), np.zeros((ROWS, DIM)))
        s.compact(progress=True)
    assert "compact [" in capsys.readouterr().err
