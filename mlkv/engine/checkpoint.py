"""What a store writes to make itself durable, and how it reads it back.

Files of a store directory::

    settings.json        settings fixed at creation (see mlkv.config), written once
    manifest.json        markers, row count, the index file's name, size and CRC-32
    index-000001.bin     live (key, address) pairs: n x [int64 key, int64 address], little-endian
    segment-000000.log   log pages (see mlkv.engine.device)
    lock                 held (flock) by the process that has the store open for writing

Durable point: every dirty page is written and the segments fsynced; then a new index file is
written and fsynced under a fresh name; then the manifest is written to a temporary file,
fsynced and renamed into place, and the directory fsynced. The rename is the commit: a crash
before it leaves the previous manifest and the files it names untouched.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from ..config import FORMAT_VERSION, read_json, write_json_atomic
from ..errors import CorruptionError, DeviceError
from .index import HashIndex
from .log import HybridLog
from .ops import Engine

MANIFEST = "manifest.json"
CHUNK_PAIRS = 1 << 18          # 4 MiB of index file per read or write


def save(directory: str, log, index: HashIndex, device, changed: bool = True) -> int:
    """Make the current state durable; returns the new checkpoint id.

    ``changed``: rows were written since the last checkpoint. The manifest's ``content_id``
    is the id of the last checkpoint that changed the rows: a checkpoint that only moved them
    (compaction, reads copied to the tail) keeps the one before, so whoever names a state of
    the table by its ``content_id`` still finds it.
    """
    old = load_manifest(directory)
    checkpoint_id = (old["checkpoint_id"] if old else 0) + 1
    content_id = checkpoint_id if changed or not old else old["content_id"]
    log.seal()
    log.flush()
    device.sync()
    index_name = f"index-{checkpoint_id:06d}.bin"
    index_path = os.path.join(directory, index_name)
    try:
        index_bytes, crc = _write_index(index_path, index)
        manifest = {"format_version": FORMAT_VERSION, "checkpoint_id": checkpoint_id,
                    "content_id": content_id, "begin": log.begin, "tail": log.tail,
                    "rows": index.count,
                    "index_file": index_name, "index_bytes": index_bytes, "index_crc32": crc}
        write_json_atomic(os.path.join(directory, MANIFEST), manifest)
        _fsync_dir(directory)
    except OSError as exc:
        raise DeviceError(f"checkpoint {checkpoint_id} of {directory!r} failed: {exc}") from exc
    if old and old["index_file"] != index_name:
        _remove_quietly(os.path.join(directory, old["index_file"]))
    return checkpoint_id


def recover(directory: str, layout, dtype, memory_bytes: int, policy, device) -> tuple:
    """The engine of a store at its last checkpoint (empty without one), and the manifest
    (``{}`` without one).

    Takes ownership of ``device``: it is closed if recovery fails.
    """
    try:
        manifest = load_manifest(directory)
        index = load_index(directory, manifest) if manifest else HashIndex()
        log = HybridLog(layout, dtype, memory_bytes, device)
        if manifest:
            try:
                log.restore(manifest["begin"], manifest["tail"])
            except DeviceError as exc:
                if _holds(device, manifest["tail"]):
                    raise                       # the file is there: an I/O error, not damage
                raise CorruptionError(
                    f"{os.path.join(directory, MANIFEST)}: its tail {manifest['tail']} lies "
                    f"past the segment files ({exc})") from exc
    except BaseException:
        device.close()
        raise
    engine = Engine(layout, dtype, index, log, device, policy)
    return engine, manifest or {}


def _holds(device, tail: int) -> bool:
    """Whether the segment file of the log's tail page is long enough to hold that page."""
    path = device.segment_path(tail >> device.segment_bits)
    page_end = ((tail >> device.page_bits) + 1) << device.page_bits
    needed = page_end - (tail >> device.segment_bits << device.segment_bits)
    return os.path.exists(path) and os.path.getsize(path) >= needed


def _write_index(path: str, index: HashIndex) -> tuple[int, int]:
    """Write the live pairs a slice of slots at a time (no full-size copy); returns size, CRC."""
    crc = 0
    written = 0
    with open(path + ".tmp", "wb") as f:
        for pairs in index.iter_pairs(CHUNK_PAIRS):
            payload = pairs.astype("<i8", copy=False).tobytes()
            f.write(payload)
            crc = zlib.crc32(payload, crc)
            written += len(payload)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.replace(path + ".tmp", path)
    return written, crc


def load_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    manifest = read_json(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptionError(f"{path}: format version {manifest.get('format_version')!r} is not "
                              f"supported (this mlkv reads version {FORMAT_VERSION})")
    manifest.setdefault("content_id", manifest.get("checkpoint_id"))
    for name in ("checkpoint_id", "content_id", "begin", "tail", "rows", "index_bytes",
                 "index_crc32"):
        value = manifest.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CorruptionError(f"{path}: field {name!r} must be an integer >= 0, "
                                  f"got {value!r}")
    name = manifest.get("index_file")
    if not isinstance(name, str) or os.path.basename(name) != name or not name:
        raise CorruptionError(f"{path}: field 'index_file' must be a file name, got {name!r}")
    if not manifest["begin"] <= manifest["tail"]:
        raise CorruptionError(f"{path}: begin {manifest['begin']} lies past tail "
                              f"{manifest['tail']}")
    return manifest


def load_index(directory: str, manifest: dict) -> HashIndex:
    """The index a manifest names, checked against its recorded size and CRC-32.

    Read a chunk at a time into an index sized up front, so loading never holds the file and
    the index side by side.
    """
    path = os.path.join(directory, manifest["index_file"])
    n = manifest["rows"]
    if manifest["index_bytes"] != 16 * n:
        raise CorruptionError(f"{path}: manifest says {n} rows in {manifest['index_bytes']} bytes")
    index = HashIndex.for_count(n)
    crc = 0
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != 16 * n:
                raise CorruptionError(f"{path}: index file is {os.fstat(f.fileno()).st_size} "
                                      f"bytes, the manifest says {16 * n}")
            buf = bytearray(16 * CHUNK_PAIRS)
            left = n
            while left:
                take = min(left, CHUNK_PAIRS)
                view = memoryview(buf)[:16 * take]
                if f.readinto(view) != 16 * take:
                    raise CorruptionError(f"{path}: index file ends early")
                crc = zlib.crc32(view, crc)
                pairs = np.frombuffer(view, dtype="<i8").reshape(take, 2)
                addrs = pairs[:, 1].astype(np.int64)
                if addrs.min() < manifest["begin"] or addrs.max() >= manifest["tail"]:
                    raise CorruptionError(f"{path}: holds addresses outside the log "
                                          f"[{manifest['begin']}, {manifest['tail']})")
                index.assign(pairs[:, 0].astype(np.int64), addrs)
                left -= take
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except FileNotFoundError as exc:
        raise CorruptionError(f"{path}: index file named by the manifest is missing") from exc
    if crc != manifest["index_crc32"]:
        raise CorruptionError(f"{path}: index file is damaged (checksum mismatch)")
    if index.count != n:
        raise CorruptionError(f"{path}: holds {index.count} distinct keys, manifest says {n}")
    return index


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
