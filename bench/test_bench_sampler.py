"""The key samplers the benchmarks use (plain tests, no timing)."""

import numpy as np

import benchlib


def test_zipf_matches_its_distribution():
    n = 10_000
    z = benchlib.ZipfSampler(n, 0.99, seed=1)
    ranks = z.ranks(400_000)
    assert ranks.min() >= 0 and ranks.max() < n
    freq = np.bincount(ranks, minlength=n) / ranks.shape[0]
    # the head of the distribution within a few standard errors
    for r in range(5):
        p = z.pmf[r]
        assert abs(freq[r] - p) < 5 * np.sqrt(p * (1 - p) / ranks.shape[0]), (r, freq[r], p)
    # P(rank 1) / P(rank 10) = 10**0.99
    assert abs(z.pmf[0] / z.pmf[9] - 10 ** 0.99) < 1e-9


def test_zipf_is_seeded_and_scrambled():
    a = benchlib.ZipfSampler(1000, seed=3)(5000)
    b = benchlib.ZipfSampler(1000, seed=3)(5000)
    np.testing.assert_array_equal(a, b)
    z = benchlib.ZipfSampler(1000, seed=3)
    assert sorted(z.key_of_rank.tolist()) == list(range(1000))
    assert z.key_of_rank[0] != 0 or z.key_of_rank[1] != 1


def test_row_values_are_deterministic():
    k = np.array([5, 0, 5, 123456789], dtype=np.int64)
    v = benchlib.row_values(k)
    assert v.shape == (4, benchlib.DIM) and v.dtype == np.float32
    np.testing.assert_array_equal(v[0], v[2])
    assert not np.array_equal(v[0], v[1])
    assert v.min() >= -1 and v.max() < 1


def test_encodings_round_trip():
    k = np.array([0, 1, 2**40], dtype=np.int64)
    enc = benchlib.encode_keys(k)
    assert enc[1] == b"\0" * 7 + b"\1" and all(len(e) == 8 for e in enc)
    v = benchlib.row_values(k)
    np.testing.assert_array_equal(benchlib.decode_rows(benchlib.encode_rows(v)), v)
