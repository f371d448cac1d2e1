"""Hash index: key -> logical address of the key's newest record.

The index holds addresses only, never rows (as in FASTER). It lives in memory as two int64
arrays of power-of-two length and is written at checkpoint as the live (key, address) pairs.
It grows by rehashing into twice the capacity when more than ``MAX_LOAD`` of its slots are used,
so no capacity is chosen up front; at steady state it costs about 16 / load = 21-43 bytes a key.

The arrays are anonymous memory maps (:mod:`.buffers`): empty slots are zero pages that take no
memory, and a rehash walks the old slots a chunk at a time, handing each chunk back to the OS
once its keys are in the new arrays. Because home slots are monotone in the hash, the new
arrays fill front to back at the same pace, so growing costs about the new size at its peak,
not old plus new.
"""

from __future__ import annotations

import numpy as np

from . import _index_kernels as K
from .buffers import anonymous, release

MAX_LOAD = 0.75
MIN_CAPACITY = 1 << 10
MAX_CAPACITY = 1 << 32          # home slots scale 32 hash bits
REHASH_CHUNK = 1 << 16          # old slots moved between two hand-backs to the OS


class HashIndex:
    """Open-addressing map from int64 keys to int64 addresses.

    Parameters
    ----------
    capacity : int
        Initial number of slots (rounded up to a power of two).
    """

    def __init__(self, capacity: int = MIN_CAPACITY):
        capacity = max(MIN_CAPACITY, 1 << int(np.ceil(np.log2(max(capacity, 1)))))
        self.slot_keys, self.slot_addrs = _empty_slots(capacity)
        self.count = 0

    @property
    def capacity(self) -> int:
        return self.slot_keys.shape[0]

    @property
    def nbytes(self) -> int:
        return self.slot_keys.nbytes + self.slot_addrs.nbytes

    def reserve(self, extra: int) -> None:
        """Grow so that ``extra`` more keys fit under the maximum load."""
        needed = self.count + extra
        if needed <= MAX_LOAD * self.capacity:
            return
        capacity = self.capacity
        while needed > MAX_LOAD * capacity:
            capacity *= 2
        new_keys, new_addrs = _empty_slots(capacity)
        old_keys, old_addrs = self.slot_keys, self.slot_addrs
        for lo in range(0, old_keys.shape[0], REHASH_CHUNK):
            hi = lo + REHASH_CHUNK
            K.rehash(old_keys[lo:hi], old_addrs[lo:hi], new_keys, new_addrs)
            release(old_keys[lo:hi])
            release(old_addrs[lo:hi])
        self.slot_keys, self.slot_addrs = new_keys, new_addrs

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Addresses of ``keys`` (int64 array), -1 where a key is absent."""
        out = np.empty(keys.shape[0], dtype=np.int64)
        K.lookup(self.slot_keys, self.slot_addrs, keys, out)
        return out

    def assign(self, keys: np.ndarray, addrs: np.ndarray) -> None:
        self.reserve(keys.shape[0])
        self.count += K.assign(self.slot_keys, self.slot_addrs, keys, addrs)

    def iter_pairs(self, chunk: int):
        """Yield the live (key, address) pairs as ``[m, 2]`` arrays, a slice of slots at a time."""
        for lo in range(0, self.capacity, chunk):
            keys = self.slot_keys[lo:lo + chunk]
            addrs = self.slot_addrs[lo:lo + chunk]
            live_keys = np.empty(keys.shape[0], dtype=np.int64)
            live_addrs = np.empty(keys.shape[0], dtype=np.int64)
            m = K.live_entries(keys, addrs, live_keys, live_addrs)
            if m:
                yield np.stack([live_keys[:m], live_addrs[:m]], axis=1)

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Live (keys, addresses), in slot order."""
        keys = np.empty(self.count, dtype=np.int64)
        addrs = np.empty(self.count, dtype=np.int64)
        n = K.live_entries(self.slot_keys, self.slot_addrs, keys, addrs)
        assert n == self.count, (n, self.count)
        return keys, addrs

    @classmethod
    def from_entries(cls, keys: np.ndarray, addrs: np.ndarray) -> "HashIndex":
        index = cls.for_count(keys.shape[0])
        index.assign(keys, addrs)
        return index

    @classmethod
    def for_count(cls, n: int) -> "HashIndex":
        """An empty index that holds ``n`` keys without growing."""
        return cls(int(np.ceil(n / MAX_LOAD)))


def _empty_slots(capacity: int) -> tuple[np.ndarray, np.ndarray]:
    if capacity > MAX_CAPACITY:
        raise MemoryError(f"the index cannot grow past {MAX_CAPACITY} slots")
    return anonymous((capacity,), np.int64), anonymous((capacity,), np.int64)
