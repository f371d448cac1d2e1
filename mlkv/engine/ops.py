"""Batched operations over one store's index, log and device.

Each operation reads top to bottom as one algorithm. Appending kernels stop when the tail
needs a frame that is not free; the operation's loop then evicts the oldest pages
(:meth:`HybridLog.make_room`) and resumes the kernel where it stopped, and once the batch is
done moves ``read_only`` on (:meth:`HybridLog.shift_read_only`). The loop is written out in
each operation, not passed a callback: a closure and its frame cost a training step
microseconds.

Inputs are already checked by :class:`mlkv.Store`: ``keys`` is a contiguous int64 vector and
``values`` a contiguous ``[n, dim]`` array of the store's dtype.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import CorruptionError
from . import _checksum_kernels as CK
from . import _init_kernels as IK
from . import _log_kernels as K
from . import _pair_kernels as PK
from . import _write_kernels as WK
from .device import FileDevice
from .helper import Helper
from .index import HashIndex
from .layout import RecordLayout
from .log import HybridLog, kernel_dtype
from .policy import CachePolicy


@dataclasses.dataclass
class Engine:
    """The parts one store is made of."""

    layout: RecordLayout
    dtype: np.dtype
    index: HashIndex
    log: HybridLog
    device: FileDevice
    policy: CachePolicy
    counts: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(("hits", "misses"), 0))
    #: bumped by every operation after which a record at or above ``read_only`` may no longer
    #: be its key's (upsert, delete, compaction); reads and updates never do that
    epoch: int = 0
    #: the last :func:`read_or_init`'s ``(keys, addresses, epoch)``, for an update of the same
    #: keys that follows (a training step): see :func:`.updates.update`
    last_read: tuple | None = None
    #: the process's helper thread, when the store shares its work with it (a float32
    #: store opened with ``threads=2``)
    helper: Helper | None = None
    #: an update the helper may still be running (see :func:`.updates.update`): finished by
    #: :func:`.updates.finish_update` before anything else touches the engine
    pending: tuple | None = None


def dead_fraction(eng: Engine) -> float:
    """Share of the log's bytes (``tail - begin``) not held by a live record."""
    log_bytes = eng.log.tail - eng.log.begin
    if log_bytes <= 0:
        return 0.0
    return max(0.0, 1.0 - eng.index.count * eng.layout.record_bytes / log_bytes)


def stats(eng: Engine) -> dict:
    """The engine's counters and sizes (see :meth:`mlkv.Store.stats`)."""
    return {
        "rows": eng.index.count, "hits": eng.counts["hits"], "misses": eng.counts["misses"],
        "disk_reads": eng.counts["misses"], "bytes_read": eng.device.bytes_read,
        "bytes_written": eng.device.bytes_written,
        "resident_bytes": eng.log.resident_bytes + eng.index.nbytes,
        "buffer_pool_bytes": eng.log.resident_bytes, "index_bytes": eng.index.nbytes,
        "disk_bytes": eng.device.disk_bytes(), "dead_fraction": dead_fraction(eng),
        "segments": len(eng.device.segments()), "record_bytes": eng.layout.record_bytes,
        "policy": eng.policy.name, "addresses": eng.log.markers(),
    }


@dataclasses.dataclass(slots=True)
class PendingRead:
    """A read between its passes: what the resident pass found, and the rows it left on disk."""

    keys: np.ndarray
    want_values: bool
    policy: int
    out: np.ndarray
    addrs: np.ndarray
    cold_pos: np.ndarray             # positions in ``keys`` of the rows on disk
    unique_addrs: np.ndarray         # their records' addresses, sorted, each once
    first: np.ndarray                # a position in ``cold_pos`` of each unique address
    rec_index: np.ndarray            # the unique address of each position in ``cold_pos``
    n_absent: int                    # keys with no row (address -1)


def read(eng: Engine, keys: np.ndarray, want_values: bool = True, policy_code: int | None = None):
    """Values of ``keys`` (``[n, dim]``) and their addresses (-1 where missing).

    1. Rows in memory are served in one kernel pass; rows below ``read_only`` that the
       policy admits are first copied to the tail. Rows on disk are listed.
    2. The listed rows are read from disk at once, address-sorted, each record once however
       often its key repeats in the batch, and checked against their checksums.
    3. They are copied to the tail where the policy admits, if their key still points there.

    The store runs all three under its lock, except for a lookahead: its disk reads (2) run
    without it, so other threads go on meanwhile (see :meth:`mlkv.Store.lookahead`).
    """
    pending = _read(eng, keys, want_values, policy_code)
    return pending.out, pending.addrs


def _read(eng: Engine, keys: np.ndarray, want_values: bool = True,
          policy_code: int | None = None) -> PendingRead:
    """:func:`read`'s three steps, all done: the read's values, addresses and counts."""
    pending = read_resident(eng, keys, want_values, policy_code)
    if pending.cold_pos.shape[0]:
        read_finish(eng, pending, read_disk(eng, pending))
    return pending


def read_resident(eng: Engine, keys: np.ndarray, want_values: bool = True,
                  policy_code: int | None = None) -> PendingRead:
    """Step 1 of :func:`read`; counts the read's hits and misses."""
    log, idx = eng.log, eng.index
    policy = eng.policy.code if policy_code is None else policy_code
    n = keys.shape[0]
    out = np.empty((n if want_values else 0, eng.layout.dim), dtype=eng.dtype)
    out_bits = out.view(kernel_dtype(eng.dtype))
    addrs = np.empty(n, dtype=np.int64)
    cold_pos = np.empty(n, dtype=np.int64)
    pos = n_cold = n_absent = 0
    helper = eng.helper
    if helper is not None and not (want_values and n >= PK.PAIR_MIN_KEYS
                                   and helper.lock.acquire(blocking=False)):
        helper = None
    while True:
        if helper is None:
            pos, n_cold, n_absent = K.read_resident(
                idx.slot_keys, idx.slot_addrs, log.words, log.vals, log.dirty, log.geo,
                log.marks, keys, pos, want_values, out_bits, addrs, cold_pos, n_cold, n_absent,
                policy, eng.policy.counters)
        else:
            # the lock is released before any eviction: make_room may write to the disk
            pos, n_cold, n_absent, asleep = PK.read_resident_pair(
                helper.control, idx.slot_keys, idx.slot_addrs, log.words, log.vals, log.dirty,
                log.geo, log.marks, keys, pos, out_bits, addrs, cold_pos, n_cold, n_absent,
                policy, eng.policy.counters)
            helper.lock.release()
            if asleep:
                helper.wake()
            helper = None
        if pos == n:
            break
        log.make_room()
    log.shift_read_only()
    eng.policy.after_reads(n)
    eng.counts["misses"] += n_cold
    eng.counts["hits"] += n - n_cold - n_absent          # absent: neither a hit nor a miss
    cold_pos = cold_pos[:n_cold]
    if n_cold:
        unique_addrs, first, rec_index = np.unique(addrs[cold_pos], return_index=True,
                                                   return_inverse=True)
    else:                             # all in memory: the common case of a warm store
        unique_addrs = first = rec_index = cold_pos
    return PendingRead(keys, want_values, policy, out, addrs, cold_pos, unique_addrs, first,
                       rec_index, n_absent)


def read_disk(eng: Engine, pending: PendingRead) -> np.ndarray:
    """Step 2 of :func:`read`: the records on disk, checked; touches only the device."""
    if not pending.cold_pos.shape[0]:
        return _NO_RECORDS
    records = eng.device.read_records(pending.unique_addrs, eng.layout.record_bytes)
    _check_records(eng, records.view(np.int64), pending.unique_addrs,
                   pending.keys[pending.cold_pos[pending.first]])
    return records


_NO_RECORDS = np.empty((0, 0), dtype=np.uint8)


def read_finish(eng: Engine, pending: PendingRead, records: np.ndarray) -> None:
    """Step 3 of :func:`read`: the rows read from disk (``records``) copied out, and to the
    tail where the policy admits; nothing to do when none was on disk."""
    log, idx, p = eng.log, eng.index, pending
    n_cold = p.cold_pos.shape[0]
    if not n_cold:
        return
    cold_addrs = p.addrs[p.cold_pos]
    rec_words, rec_vals = records.view(np.int64), records.view(kernel_dtype(eng.dtype))
    out_bits = p.out.view(kernel_dtype(eng.dtype))
    pos = 0
    while True:
        pos = K.finish_cold(
            idx.slot_keys, idx.slot_addrs, log.words, log.dirty, log.geo, log.marks,
            p.keys, p.cold_pos, cold_addrs, rec_words, rec_vals, p.rec_index, pos,
            p.want_values, out_bits, p.policy, eng.policy.counters)
        if pos == n_cold:
            break
        log.make_room()
    log.shift_read_only()


def _check_records(eng: Engine, rec_words, addrs, keys) -> None:
    """Raise CorruptionError unless every record read is the intact, live row of its key."""
    bad = CK.first_bad_record(rec_words, addrs, keys)
    if bad >= 0:
        address = int(addrs[bad])
        raise CorruptionError(
            f"{eng.device.location(address)}: the record of key {int(keys[bad])} (log "
            f"address {address:,}, page {address >> eng.layout.page_bits:,}) is damaged: it "
            f"fails its checksum or holds another key. No rows were returned; "
            f"`mlkv verify` lists every damaged page")


def upsert(eng: Engine, keys: np.ndarray, values: np.ndarray) -> None:
    """Write ``values`` for ``keys`` (optimizer state reset to zeros); the last repeat wins."""
    log, idx = eng.log, eng.index
    eng.epoch += 1
    idx.reserve(keys.shape[0])
    values = values.view(kernel_dtype(values.dtype))
    pos = 0
    while True:
        pos, inserted = WK.write_rows(idx.slot_keys, idx.slot_addrs, log.words, log.vals,
                                     log.f32, log.dirty, log.geo, log.marks, keys, values, pos)
        idx.count += inserted
        if pos == keys.shape[0]:
            break
        log.make_room()
    log.shift_read_only()


def delete(eng: Engine, keys: np.ndarray) -> int:
    """Remove ``keys`` (absent ones are skipped); returns how many were removed."""
    log, idx = eng.log, eng.index
    eng.epoch += 1
    pos = removed = 0
    while True:
        pos, r = WK.delete_rows(idx.slot_keys, idx.slot_addrs, log.words, log.dirty, log.geo,
                               log.marks, keys, pos)
        idx.count -= r
        removed += r
        if pos == keys.shape[0]:
            break
        log.make_room()
    log.shift_read_only()
    return removed


def read_or_init(eng: Engine, keys: np.ndarray, init) -> tuple[np.ndarray, int]:
    """Values of ``keys``, absent ones first created with ``init = (kind, scale, seed)``;
    and how many were created. Reads first: in training nearly every row exists."""
    pending = _read(eng, keys)
    out, addrs = pending.out, pending.addrs
    created = 0
    if pending.n_absent:
        missing = addrs < 0
        absent = keys[missing]
        created = create_missing(eng, absent, *init)
        out[missing], addrs[missing] = read(eng, absent)
    # a copy: the caller may change its array before the update that follows
    eng.last_read = (keys.copy(), addrs, eng.epoch)
    return out, created


def create_missing(eng: Engine, keys: np.ndarray, init_kind: int, init_scale: float,
                   seed: int) -> int:
    """Insert the absent ``keys`` with their initial rows; returns how many were created."""
    absent = keys[eng.index.lookup(keys) < 0]
    if absent.shape[0] == 0:
        return 0
    absent = np.unique(absent)
    # float16 rows are drawn in float32 and rounded, as Numba has no float16 arithmetic
    draw_dtype = np.float32 if eng.dtype == np.float16 else eng.dtype
    values = np.empty((absent.shape[0], eng.layout.dim), dtype=draw_dtype)
    IK.init_values(absent, np.uint64(seed), init_kind, init_scale, values)
    upsert(eng, absent, values.astype(eng.dtype, copy=False))
    return absent.shape[0]


#: a lookahead copies every row it reaches to the tail, whatever the store's policy
LOOKAHEAD_POLICY = K.POLICY_SECOND_CHANCE


def lookahead(eng: Engine, keys: np.ndarray) -> None:
    """Bring the rows of ``keys`` to the mutable region (absent keys are skipped)."""
    read(eng, keys, want_values=False, policy_code=LOOKAHEAD_POLICY)
