"""Numba kernels of the hash index (see :mod:`mlkv.engine.index`).

The index is two parallel int64 arrays of power-of-two length: ``slot_keys`` and
``slot_addrs``. A slot is empty when its address is ``0``: no record lives at address 0 (the
log starts at page 1), while keys may be any int64, so no key value could mark emptiness. All
zeros being "empty", a fresh index is free memory until keys land in it. Collisions probe
linearly; deletion shifts later entries of the probe run back, so no tombstones are needed.

A key's home slot is the top bits of its hash (Fibonacci hashing, :func:`key_hash`), scaled
to the capacity (``(hash >> 32) * capacity >> 32``). Homes are then monotone in the hash:
doubling the capacity sends home ``h`` to ``2h`` or ``2h + 1``, so a rehash that walks the
old slots in order fills the new arrays front to back, and can hand the old slots back to
the OS as it goes (see :meth:`HashIndex.reserve`).

A batch of keys is probed by :func:`find_slots` (or a loop of the log's kernels built on
:func:`_probe_ahead`), which prefetches the home slots of the keys a few ahead.
"""

import numpy as np

from .._jit import inline_kernel, kernel, prefetch

#: how many keys ahead the batched kernels prefetch index slots and records. A row's work is a
#: few nanoseconds and a miss to DRAM costs 100 or more, so the prefetch must run dozens of rows
#: ahead: copying 4,096 random rows of a 70 MB log out took 91 µs prefetching 8 ahead, 62 µs at
#: 16 and 45 µs at 32 to 64 (the probe: 38 µs at 8, 33-34 µs from 16 on). With 8, a whole
#: sgd training step ran 20% slower (2 vCPUs AMD EPYC; see bench/README.md, run 9).
PREFETCH_DISTANCE = 32
_HOME_RING = 1 << PREFETCH_DISTANCE.bit_length()    # a power of two above it
_HOME_MASK = _HOME_RING - 1

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
#: 2**64 divided by the golden ratio, made odd: the multiplier of Fibonacci hashing
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)


@inline_kernel
def mix64(x):
    """splitmix64's finalizer: a bijection of uint64 that spreads every input bit."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@inline_kernel
def key_hash(key):
    """The hash of the index (and of a batch's table of distinct keys): Fibonacci hashing,
    ``key * 2**64/φ`` modulo ``2**64``, of which tables take the top bits.

    Embedding ids mostly follow one another (a vocabulary's 0 .. n-1, or such ranges under a
    few high-bit prefixes), and the top bits of ``k * 2**64/φ`` spread consecutive ``k``
    evenly (the three-gap theorem). In 2**19 slots at load 0.74 (the index grows past 0.75),
    ids 0 .. n-1 sat at most 2 slots past their home (0.06 on average), ids 1,000 apart and
    eight ranges under ``field << 32`` prefixes at most 4; with :func:`mix64` they sat up to
    146 past (1.4 on average). A probe that stops at its home slot is a branch the CPU
    predicts: finding 4,096 ids of a 262,144-row table took 12 µs a batch instead of 31 µs.
    Random 64-bit keys (hashed ids) probe as far as with any good hash.

    The price: keys in an arithmetic progression whose step times the multiplier is, modulo
    2**64, within about ``2**64 / capacity`` of zero crowd into a few homes. Their lookups
    get slower, never wrong.
    """
    return np.uint64(key) * _FIBONACCI


@inline_kernel
def home_slot(key, capacity):
    """The slot ``key``'s probe starts at: its hash's top 32 bits scaled to ``capacity``."""
    return np.int64(((key_hash(key) >> _S32) * np.uint64(capacity)) >> _S32)


@inline_kernel
def find_slot(slot_keys, slot_addrs, key):
    """Slot holding ``key``, or ``-(s + 1)`` where ``s`` is the empty slot ending its probe run."""
    return find_slot_from(slot_keys, slot_addrs, key, home_slot(key, slot_keys.shape[0]))


@inline_kernel
def find_slot_from(slot_keys, slot_addrs, key, s):
    """:func:`find_slot` given ``key``'s home slot ``s``."""
    mask = slot_keys.shape[0] - 1
    while True:
        if slot_addrs[s] == 0:
            return -(s + 1)
        if slot_keys[s] == key:
            return s
        s = (s + 1) & mask


@kernel
def remove_slot(slot_keys, slot_addrs, s):
    """Empty slot ``s`` and shift back the entries whose probe run passed through it."""
    capacity = slot_keys.shape[0]
    mask = capacity - 1
    hole = s
    j = s
    while True:
        j = (j + 1) & mask
        if slot_addrs[j] == 0:
            break
        home = home_slot(slot_keys[j], capacity)
        # Move j into the hole unless its home lies cyclically in (hole, j].
        if (j > hole and (home <= hole or home > j)) or (j < hole and (home <= hole and home > j)):
            slot_keys[hole] = slot_keys[j]
            slot_addrs[hole] = slot_addrs[j]
            hole = j
    slot_addrs[hole] = 0
    slot_keys[hole] = 0


@kernel
def lookup(slot_keys, slot_addrs, keys, out_addrs):
    """``out_addrs[i]`` = address of ``keys[i]``, or -1. Returns how many were missing."""
    missing = 0
    for i in range(keys.shape[0]):
        s = find_slot(slot_keys, slot_addrs, keys[i])
        if s >= 0:
            out_addrs[i] = slot_addrs[s]
        else:
            out_addrs[i] = -1
            missing += 1
    return missing


@kernel
def assign(slot_keys, slot_addrs, keys, addrs):
    """Insert or overwrite ``keys[i] -> addrs[i]``. Returns how many keys were new."""
    inserted = 0
    for i in range(keys.shape[0]):
        s = find_slot(slot_keys, slot_addrs, keys[i])
        if s < 0:
            s = -s - 1
            slot_keys[s] = keys[i]
            inserted += 1
        slot_addrs[s] = addrs[i]
    return inserted


@kernel
def rehash(old_keys, old_addrs, new_keys, new_addrs):
    """Insert every live entry of the old arrays (or a slice of them) into the new ones."""
    for s in range(old_keys.shape[0]):
        if old_addrs[s] != 0:
            t = -find_slot(new_keys, new_addrs, old_keys[s]) - 1
            new_keys[t] = old_keys[s]
            new_addrs[t] = old_addrs[s]


@kernel
def live_entries(slot_keys, slot_addrs, out_keys, out_addrs):
    """Copy live (key, address) pairs in slot order into the outputs; returns their count."""
    n = 0
    for s in range(slot_keys.shape[0]):
        if slot_addrs[s] != 0:
            out_keys[n] = slot_keys[s]
            out_addrs[n] = slot_addrs[s]
            n += 1
    return n


@inline_kernel
def _first_homes(slot_keys, keys):
    """The ring :func:`_probe_ahead` keeps home slots in, holding those of the first keys.
    Each key is hashed once, for its prefetch, and its home kept for its probe (hashing twice
    cost 5 µs a batch of 4,096)."""
    homes = np.empty(_HOME_RING, dtype=np.int64)
    for i in range(min(PREFETCH_DISTANCE, keys.shape[0])):
        homes[i & _HOME_MASK] = home_slot(keys[i], slot_keys.shape[0])
    return homes


@inline_kernel
def _probe_ahead(slot_keys, slot_addrs, keys, i, homes):
    """``find_slot(keys[i])``, after prefetching the home slot of the key a few ahead, for a
    loop over all of ``keys`` from 0 (``homes = _first_homes(slot_keys, keys)``).

    Callers resuming at a position hand views of their arrays from there: a loop from a
    ``start`` that is not a constant ran 5 µs slower a batch of 4,096 keys."""
    ahead = i + PREFETCH_DISTANCE
    if ahead < keys.shape[0]:
        h = home_slot(keys[ahead], slot_keys.shape[0])
        homes[ahead & _HOME_MASK] = h
        prefetch(slot_keys, h)
        prefetch(slot_addrs, h)
    return find_slot_from(slot_keys, slot_addrs, keys[i], homes[i & _HOME_MASK])


@kernel
def find_slots(slot_keys, slot_addrs, keys, start, addrs):
    """``find_slot`` for ``keys[start:]``, prefetching home slots a few keys ahead.

    Returns the slots (negative for absent keys, as ``find_slot``) and sets ``addrs[i]`` to
    each key's address then (-1 if absent), read while its index line is in cache.
    """
    keys, addrs = keys[start:], addrs[start:]
    slots = np.empty(keys.shape[0], dtype=np.int64)
    homes = _first_homes(slot_keys, keys)
    for i in range(keys.shape[0]):
        s = _probe_ahead(slot_keys, slot_addrs, keys, i, homes)
        slots[i] = s
        addrs[i] = slot_addrs[s] if s >= 0 else -1
    return slots
