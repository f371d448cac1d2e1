"""What a store writes to make itself durable, and how it reads it back.

Files of a store directory::

    settings.json        settings fixed at creation (see mlkv.config), written once
    manifest.json        markers, row count, the index file's name, size and CRC-32
    index-000001.bin     live (key, address) pairs: n int64 keys, then n int64 addresses (LE)
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
from ..errors import CorruptionError
from .index import HashIndex

MANIFEST = "manifest.json"


def save(directory: str, log, index: HashIndex, device) -> int:
    """Make the current state durable; returns the new checkpoint id."""
    old = load_manifest(directory)
    checkpoint_id = (old["checkpoint_id"] if old else 0) + 1
    log.flush()
    device.sync()
    keys, addrs = index.entries()
    order = np.argsort(addrs, kind="stable")     # log order: reopen then reads sequentially
    payload = np.concatenate([keys[order], addrs[order]]).astype("<i8").tobytes()
    index_name = f"index-{checkpoint_id:06d}.bin"
    index_path = os.path.join(directory, index_name)
    with open(index_path + ".tmp", "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(index_path + ".tmp", index_path)
    manifest = {"format_version": FORMAT_VERSION, "checkpoint_id": checkpoint_id,
                "begin": log.begin, "tail": log.tail, "rows": int(keys.shape[0]),
                "index_file": index_name, "index_bytes": len(payload),
                "index_crc32": zlib.crc32(payload)}
    write_json_atomic(os.path.join(directory, MANIFEST), manifest)
    _fsync_dir(directory)
    if old and old["index_file"] != index_name:
        _remove_quietly(os.path.join(directory, old["index_file"]))
    return checkpoint_id


def load_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    manifest = read_json(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptionError(f"{path}: format version {manifest.get('format_version')!r} is not "
                              f"supported (this mlkv reads version {FORMAT_VERSION})")
    for name in ("checkpoint_id", "begin", "tail", "rows", "index_file", "index_bytes",
                 "index_crc32"):
        if name not in manifest:
            raise CorruptionError(f"{path}: missing field {name!r}")
    return manifest


def load_index(directory: str, manifest: dict) -> HashIndex:
    """The index a manifest names, checked against its recorded size and CRC-32."""
    path = os.path.join(directory, manifest["index_file"])
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except FileNotFoundError as exc:
        raise CorruptionError(f"{path}: index file named by the manifest is missing") from exc
    if len(payload) != manifest["index_bytes"] or zlib.crc32(payload) != manifest["index_crc32"]:
        raise CorruptionError(f"{path}: index file is damaged (size or checksum mismatch)")
    pairs = np.frombuffer(payload, dtype="<i8").astype(np.int64)
    n = manifest["rows"]
    if pairs.shape[0] != 2 * n:
        raise CorruptionError(f"{path}: holds {pairs.shape[0] // 2} rows, manifest says {n}")
    return HashIndex.from_entries(pairs[:n], pairs[n:])


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
