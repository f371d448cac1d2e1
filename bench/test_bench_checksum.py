"""What record checksums cost: sealing pages at flush and checking records read from disk.

Both run over 64 MiB of pages of dim-64 float32 records (272 bytes) and are compared, in the
same run, with copying the same bytes (``np.copyto``): a ratio near or above 1 means the
checksum costs about a memory copy, far below the disk's own time for those bytes.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlkv.engine import _checksum_kernels as CK

PAGE_BITS = 20
RECORD_WORDS = 34                                   # 16 + 256 bytes, as dim 64 float32


@pytest.fixture(scope="module")
def pages(sizes):
    n_pages = 4 if sizes.smoke else 64
    words = np.zeros((n_pages, (1 << PAGE_BITS) // 8), np.int64)
    per_page = words.shape[1] // RECORD_WORDS
    rng = np.random.default_rng(0)
    body = words[:, :per_page * RECORD_WORDS].reshape(n_pages, per_page, RECORD_WORDS)
    body[:] = rng.integers(-2**62, 2**62, body.shape)
    body[:, :, 0] = 1 << 48                           # VALID
    CK.seal_pages(words, PAGE_BITS, RECORD_WORDS, 0, n_pages)
    records = body.reshape(-1, RECORD_WORDS).copy()
    addrs = ((np.arange(n_pages)[:, None] << PAGE_BITS)
             + np.arange(per_page)[None, :] * RECORD_WORDS * 8).reshape(-1)
    assert CK.first_bad_record(records, addrs, records[:, 1].copy()) == -1
    return words, records, addrs


def _record(benchmark, op, nbytes, system):
    benchmark.group = f"checksum {op}"
    benchmark.extra_info.update(scenario="checksum", op=op, system=system, bytes=nbytes)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median:
        benchmark.extra_info["gb_per_s"] = nbytes / stats.median / 1e9


def test_seal_pages(benchmark, pages):
    words = pages[0]
    benchmark(CK.seal_pages, words, PAGE_BITS, RECORD_WORDS, 0, words.shape[0])
    _record(benchmark, "seal", words.nbytes, "mlkv")


def test_check_records(benchmark, pages):
    _, records, addrs = pages
    keys = records[:, 1].copy()
    assert benchmark(CK.first_bad_record, records, addrs, keys) == -1
    _record(benchmark, "check", records.nbytes, "mlkv")


@pytest.mark.parametrize("op", ["seal", "check"])
def test_copy_same_bytes(benchmark, pages, op):
    src = pages[0] if op == "seal" else pages[1]
    dst = np.empty_like(src)
    benchmark(np.copyto, dst, src)
    _record(benchmark, op, src.nbytes, "memcpy")
