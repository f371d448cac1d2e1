"""Slow, obviously-correct references for mlkv's Numba kernels.

Everything here is written from the docstrings of :mod:`mlkv.engine.layout`,
:mod:`mlkv.engine._index_kernels`, :mod:`mlkv.engine._log_kernels` and
:mod:`mlkv.engine.device`, in plain Python (ints, lists, dicts, ``open()``), never by calling
or copying a kernel. Tests compare each kernel with the function of the same name here.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15

# layout.py: header bit fields
PENDING_BITS = 16
CHECKSUM_SHIFT = 16          # bits 16..47: the record's checksum, written at flush
CHECKSUM_BITS = 32
FLAGS_SHIFT = 48
FLAG_VALID = 1
FLAG_TOMBSTONE = 2

# layout.py: the log starts at page 1 (page 0 is a hole), so no record lives at address 0
FIRST_ADDRESS_PAGE = 1
# _index_kernels.py: a slot is empty when its address is 0
EMPTY = 0
# index.py: home slots scale 32 hash bits, so the capacity is at most 2**32
MAX_CAPACITY = 1 << 32


# ---- hashing --------------------------------------------------------------------------------
def u64(x: int) -> int:
    """Two's-complement reinterpretation of an int64 (or any Python int) as uint64."""
    return int(x) & MASK64


def mix64(x: int) -> int:
    """splitmix64's finalizer, on Python ints modulo 2**64."""
    x = u64(x)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return x ^ (x >> 31)


def i64(x: int) -> int:
    """uint64 (or any Python int) reinterpreted as a two's-complement int64."""
    x = u64(x)
    return x - (1 << 64) if x >> 63 else x


#: Fibonacci hashing's multiplier, 2**64 divided by the golden ratio, made odd
FIBONACCI = 0x9E3779B97F4A7C15


def key_hash(key: int) -> int:
    """The index's hash: the key times :data:`FIBONACCI`, modulo 2**64."""
    return (u64(key) * FIBONACCI) % (1 << 64)


def unkey_hash(h: int) -> int:
    """The inverse of :func:`key_hash` (the multiplier is odd, so invertible modulo 2**64)."""
    return i64((u64(h) * pow(FIBONACCI, -1, 1 << 64)) % (1 << 64))


def home_slot(key: int, capacity: int) -> int:
    """The top 32 bits of the key's hash scaled to ``capacity`` (a power of two <= 2**32)."""
    assert 0 < capacity <= MAX_CAPACITY and capacity & (capacity - 1) == 0, capacity
    return ((key_hash(key) >> 32) * capacity) >> 32


def key_with_home(home: int, capacity: int, pick: int) -> int:
    """An int64 key whose home slot at ``capacity`` is ``home``, built by inverting the hash.

    The hashes homed there are those whose top 32 bits lie in
    ``[home * 2**32 / capacity, (home + 1) * 2**32 / capacity)``; ``pick`` (any int) chooses
    one of them, so different picks give different keys."""
    assert 0 <= home < capacity
    span = (1 << 32) // capacity                # top-32-bit values per home slot
    top = home * span + (u64(pick) >> 32) % span
    key = unkey_hash((top << 32) | (pick & 0xFFFFFFFF))
    assert home_slot(key, capacity) == home
    return key


# ---- the index --------------------------------------------------------------------------
class RefIndex:
    """Linear-probing table at slot level, in Python lists.

    A slot is empty when its address is 0 (and then its key is 0 too); home slots are the
    top 32 hash bits scaled to the capacity. Deletion empties the slot and re-inserts every
    later entry of the same cluster (Knuth's "delete and re-insert the rest of the run"):
    a different algorithm from the kernel's backward shift, but it lands every entry in the
    same slot, so the two tables can be compared slot for slot.
    """

    def __init__(self, capacity: int):
        assert capacity & (capacity - 1) == 0
        self.keys = [0] * capacity
        self.addrs = [EMPTY] * capacity
        self.capacity = capacity
        self.mask = capacity - 1

    def find(self, key: int) -> int:
        """Slot of ``key`` or ``-(s + 1)`` with ``s`` the empty slot ending its probe run."""
        s = home_slot(key, self.capacity)
        for _ in range(len(self.keys)):
            if self.addrs[s] == EMPTY:
                return -(s + 1)
            if self.keys[s] == key:
                return s
            s = (s + 1) & self.mask
        raise RuntimeError("table full")

    def get(self, key: int) -> int:
        s = self.find(key)
        return self.addrs[s] if s >= 0 else -1

    def put(self, key: int, addr: int) -> bool:
        assert addr != EMPTY, "address 0 marks an empty slot: no record lives there"
        s = self.find(key)
        new = s < 0
        if new:
            s = -s - 1
            self.keys[s] = key
        self.addrs[s] = addr
        return new

    def remove_at(self, s: int) -> None:
        self.addrs[s] = EMPTY
        self.keys[s] = 0
        j = (s + 1) & self.mask
        run = []
        while self.addrs[j] != EMPTY:
            run.append((self.keys[j], self.addrs[j]))
            self.addrs[j] = EMPTY
            self.keys[j] = 0
            j = (j + 1) & self.mask
        for k, a in run:
            self.put(k, a)

    def remove(self, key: int) -> bool:
        s = self.find(key)
        if s < 0:
            return False
        self.remove_at(s)
        return True

    def live(self) -> list[tuple[int, int]]:
        return [(k, a) for k, a in zip(self.keys, self.addrs) if a != EMPTY]

    def as_dict(self) -> dict:
        return dict(self.live())

    def arrays(self):
        return np.array(self.keys, dtype=np.int64), np.array(self.addrs, dtype=np.int64)


def check_index_invariants(slot_keys, slot_addrs) -> None:
    """Every live entry is reachable from its home slot without crossing an empty slot;
    no key appears twice; empty slots hold key 0."""
    keys = [int(k) for k in slot_keys]
    addrs = [int(a) for a in slot_addrs]
    n = len(keys)
    mask = n - 1
    live = [k for k, a in zip(keys, addrs) if a != EMPTY]
    assert len(live) == len(set(live)), "a key is in the table twice"
    assert len(live) < n, "no empty slot left: probes would never end"
    for s in range(n):
        if addrs[s] == EMPTY:
            assert keys[s] == 0, f"empty slot {s} holds key {keys[s]}"
            continue
        h = home_slot(keys[s], n)
        t = h
        while t != s:
            assert addrs[t] != EMPTY, f"key {keys[s]} at slot {s} unreachable from home {h}"
            t = (t + 1) & mask


# ---- the initializer ----------------------------------------------------------------------
def unit(base: int, j: int) -> float:
    """The j-th uniform float64 in [0, 1) of a row's stream (top 53 bits of a mixed word)."""
    return (mix64((base + (j + 1) * GOLDEN) % (1 << 64)) >> 11) * 2.0 ** -53


def init_row(key: int, seed: int, kind: int, scale: float, dim: int) -> list[float]:
    """float64 row of ``key``: kind 0 U(-scale, scale), 1 N(0, scale^2) (Box-Muller), 2 zeros."""
    seed_mix = mix64((seed + GOLDEN) % (1 << 64))
    base = mix64(u64(key) ^ seed_mix)
    row = []
    for j in range(dim):
        if kind == 0:
            row.append((2.0 * unit(base, j) - 1.0) * scale)
        elif kind == 1:
            u1 = unit(base, 2 * j)
            u2 = unit(base, 2 * j + 1)
            row.append(math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)
                       * scale)
        else:
            row.append(0.0)
    return row


def init_values(keys, seed, kind, scale, dim, dtype) -> np.ndarray:
    out = np.array([init_row(int(k), seed, kind, scale, dim) for k in keys],
                   dtype=np.float64).reshape(len(keys), dim)
    return out.astype(dtype)


# ---- records ------------------------------------------------------------------------------
def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class Geometry:
    """Record layout from layout.py's docstring, computed independently."""

    def __init__(self, dim, dtype, state_dim, page_bits, segment_bits):
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.state_dim = state_dim
        self.page_bits = page_bits
        self.segment_bits = segment_bits
        self.page_bytes = 1 << page_bits
        self.value_offset = 16
        self.state_offset = round_up(16 + dim * self.dtype.itemsize, 4)
        self.record_bytes = round_up(self.state_offset + 4 * state_dim, 8)
        self.records_per_page = self.page_bytes // self.record_bytes

    @property
    def first_address(self) -> int:
        """Where a fresh log's first record goes: the start of page ``FIRST_ADDRESS_PAGE``."""
        return FIRST_ADDRESS_PAGE << self.page_bits

    def nth_address(self, n: int, first_page: int = FIRST_ADDRESS_PAGE) -> int:
        """Address of the n-th record appended from the start of ``first_page`` (by default
        the n-th record of a fresh log)."""
        page, k = divmod(n, self.records_per_page)
        return ((first_page + page) << self.page_bits) + k * self.record_bytes


def decode_record(buf: bytes, geo: Geometry) -> dict:
    """Split the bytes of one record into its fields."""
    assert len(buf) == geo.record_bytes
    (header,) = struct.unpack_from("<Q", buf, 0)
    (key,) = struct.unpack_from("<q", buf, 8)
    vb = geo.dim * geo.dtype.itemsize
    values = np.frombuffer(buf[16:16 + vb], dtype=geo.dtype.newbyteorder("<")).copy()
    state = np.frombuffer(buf[geo.state_offset:geo.state_offset + 4 * geo.state_dim],
                          dtype="<f4").copy()
    gap = bytes(buf[16 + vb:geo.state_offset]) + bytes(buf[geo.state_offset + 4 * geo.state_dim:])
    return {
        "header": header,
        "pending": header & ((1 << PENDING_BITS) - 1),
        "checksum": (header >> CHECKSUM_SHIFT) & ((1 << CHECKSUM_BITS) - 1),
        "flags": (header >> FLAGS_SHIFT) & 0xFF,
        "reserved": header >> 56,
        "key": key,
        "values": values,
        "state": state,
        "padding": gap,
        "raw": bytes(buf),
    }


def record_checksum(buf: bytes, address: int) -> int:
    """_checksum_kernels.py: a multiply chain over the record's words, seeded with its
    address; the header's pending counter and checksum bits are left out."""
    words = struct.unpack(f"<{len(buf) // 8}Q", buf)
    h = mix64(address)
    for k, word in enumerate(words):
        if k == 0:
            word &= ~((1 << 48) - 1) & MASK64        # flags and above only
        h = ((h ^ word) * GOLDEN) & MASK64
    return mix64(h) >> 32


def segment_path(directory: str, segment: int) -> str:
    return os.path.join(directory, f"segment-{segment:06d}.log")


def read_record_file(directory: str, address: int, record_bytes: int, segment_bits: int) -> bytes:
    """The bytes of the record at ``address``, read with plain open/seek/read."""
    segment = address >> segment_bits
    offset = address & ((1 << segment_bits) - 1)
    with open(segment_path(directory, segment), "rb") as f:
        f.seek(offset)
        data = f.read(record_bytes)
    if len(data) != record_bytes:
        raise EOFError(f"short read at {address}")
    return data


def read_record_frames(frames: np.ndarray, n_frames: int, address: int, geo: Geometry) -> bytes:
    """The bytes of an in-memory record: page p lives in frame p % n_frames."""
    page = address >> geo.page_bits
    off = address & (geo.page_bytes - 1)
    return bytes(frames[page % n_frames, off:off + geo.record_bytes])


def read_blocks_touched(addrs, record_bytes, block_bytes, segment_bits) -> int:
    """Number of distinct (segment, block) pairs the records at ``addrs`` touch."""
    blocks = set()
    mask = (1 << segment_bits) - 1
    for a in addrs:
        seg, off = a >> segment_bits, a & mask
        for b in range(off // block_bytes, (off + record_bytes - 1) // block_bytes + 1):
            blocks.add((seg, b))
    return len(blocks)


def next_address(tail: int, geo: Geometry) -> int:
    """Where the next record goes: at the tail, or at the next page if it would cross one."""
    page_end = ((tail >> geo.page_bits) + 1) << geo.page_bits
    if tail + geo.record_bytes > page_end:
        return page_end
    return tail


def frequency_slot(key: int, n_counters: int) -> int:
    """Counter of ``key`` in the frequency policy's side array (a hash of the key)."""
    return mix64(u64(key)) & (n_counters - 1)


def count_runs(addrs, record_bytes, block_bytes, segment_bits) -> int:
    """Number of maximal stretches of consecutive touched blocks (per segment): the fewest
    reads that fetch every touched block once and nothing else."""
    mask = (1 << segment_bits) - 1
    blocks = set()
    for a in addrs:
        seg, off = a >> segment_bits, a & mask
        for b in range(off // block_bytes, (off + record_bytes - 1) // block_bytes + 1):
            blocks.add((seg, b))
    return sum(1 for seg, b in blocks if (seg, b - 1) not in blocks)


def read_syscalls() -> int:
    """Read-type system calls this process has made so far (``syscr`` of /proc/self/io)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("syscr:"):
                return int(line.split()[1])
    raise RuntimeError("no syscr in /proc/self/io")
