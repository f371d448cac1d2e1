"""Store settings: what is fixed when a store is made, and what each ``open`` may choose.

``StoreSettings`` persist beside the data (``settings.json``); reopening with a different value
of any of them raises :class:`~mlkv.errors.SettingsMismatchError`. ``memory_bytes`` and
``policy`` are chosen per ``open`` (the last choice is remembered as the default).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np

from .errors import CorruptionError, MlkvError, SettingsMismatchError

#: 2: records carry a checksum in their header (version 1 stores had none)
FORMAT_VERSION = 2
SETTINGS_FILE = "settings.json"
DEFAULT_POLICY = "second_chance"
DTYPES = ("float32", "float16", "float64")
INITS = ("uniform", "normal", "zeros")
DEFAULT_MEMORY_BYTES = 256 << 20
DEFAULT_PAGE_BITS = 20          # 1 MiB pages
MIN_PAGE_BITS = 12              # 4 KiB: the O_DIRECT alignment unit
DEFAULT_SEGMENT_BITS = 28       # 256 MiB segment files: the unit compaction frees
MIN_FRAMES = 4                  # the buffer pool never has fewer page frames than this


@dataclasses.dataclass(frozen=True)
class StoreSettings:
    """Settings fixed at creation.

    Attributes
    ----------
    dim : int
        Embedding values per row.
    dtype : str
        ``"float32"``, ``"float16"`` or ``"float64"``.
    state_dim : int
        float32 optimizer-state values stored beside each row.
    init, init_scale, seed
        ``get_or_init`` initializer: ``uniform`` draws from U(-scale, scale), ``normal`` from
        N(0, scale**2), ``zeros`` gives zeros; deterministic per (key, seed).
    page_bits : int
        Log pages are ``2**page_bits`` bytes.
    segment_bits : int
        Segment files hold ``2**segment_bits`` bytes of log each.
    """

    dim: int
    dtype: str = "float32"
    state_dim: int = 0
    init: str = "uniform"
    init_scale: float = 0.01
    seed: int = 0
    page_bits: int = DEFAULT_PAGE_BITS
    segment_bits: int = DEFAULT_SEGMENT_BITS
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for name in ("dim", "state_dim", "seed", "page_bits", "segment_bits"):
            _check_int(name, getattr(self, name), minimum=0)
            object.__setattr__(self, name, int(getattr(self, name)))   # numpy ints -> int
        if isinstance(self.init_scale, bool) or not isinstance(self.init_scale, (int, float,
                                                                                 np.number)):
            raise TypeError(f"init_scale must be a number, got {type(self.init_scale).__name__}")
        object.__setattr__(self, "init_scale", float(self.init_scale))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        _check_int("dim", self.dim, minimum=1)
        _check_int("state_dim", self.state_dim, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.seed >= 1 << 64:
            raise ValueError(f"seed must be below 2**64, got {self.seed}")
        _check_int("page_bits", self.page_bits, minimum=MIN_PAGE_BITS)
        _check_int("segment_bits", self.segment_bits, minimum=self.page_bits)
        if self.page_bits > 30:
            raise ValueError(f"page_bits must be at most 30, got {self.page_bits}")
        if self.segment_bits > 40:
            raise ValueError(f"segment_bits must be at most 40, got {self.segment_bits}")
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not np.isfinite(self.init_scale) or self.init_scale < 0:
            raise ValueError(f"init_scale must be a finite number >= 0, got {self.init_scale!r}")

    @functools.cached_property
    def np_dtype(self) -> np.dtype:
        # cached: a store's every update asks for it, and np.dtype(name) is not free
        return np.dtype(self.dtype)

    # ---- persistence -------------------------------------------------------------------
    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str) -> "StoreSettings":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CorruptionError(
                f"{source}: store format version {version!r} is not supported by this mlkv "
                f"(it reads version {FORMAT_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError) as exc:
            raise CorruptionError(f"{source}: invalid settings: {exc}") from exc

    def check_same(self, requested: dict, path: str) -> None:
        """Raise SettingsMismatchError naming every requested setting that differs."""
        diffs = []
        for name, value in requested.items():
            if value is None:
                continue
            stored = getattr(self, name)
            if name == "dtype":
                value = _dtype_name(value)
            if value != stored:
                diffs.append(f"{name}={value!r} (the store has {name}={stored!r})")
        if diffs:
            raise SettingsMismatchError(
                f"store at {path!r} was made with other settings: asked for " + ", ".join(diffs))


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _dtype_name(dtype) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError as exc:
        raise TypeError(f"dtype must be one of {DTYPES}, got {dtype!r}") from exc
    if name not in DTYPES:
        raise TypeError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def default_page_bits(memory_bytes: int) -> int:
    """Largest page size up to 1 MiB that still gives the buffer pool 16 frames."""
    bits = DEFAULT_PAGE_BITS
    while bits > MIN_PAGE_BITS and (memory_bytes >> bits) < 16:
        bits -= 1
    return bits


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON to ``path`` through a fsynced temporary file renamed into place."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptionError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptionError(f"{path}: expected a JSON object")
    return data


def new_settings(requested: dict, memory_bytes: int) -> StoreSettings:
    """Settings of a new store from what ``open`` was given; defaults fill the rest.

    The page size defaults to the largest (up to 1 MiB) that gives the buffer pool 16 frames
    and still holds a record; segments default to 256 MiB.
    """
    given = {k: v for k, v in requested.items() if v is not None}
    StoreSettings(**{**given, "page_bits": MIN_PAGE_BITS,
                     "segment_bits": MIN_PAGE_BITS})          # check the values first
    if "dtype" in given:
        given["dtype"] = _dtype_name(given["dtype"])
    if "page_bits" not in given:
        itemsize = np.dtype(given.get("dtype", "float32")).itemsize
        record = 16 + int(given["dim"]) * itemsize + 4 * int(given.get("state_dim", 0)) + 8
        given["page_bits"] = max(default_page_bits(memory_bytes), int(np.ceil(np.log2(record))))
    if "segment_bits" not in given:
        given["segment_bits"] = max(DEFAULT_SEGMENT_BITS, given["page_bits"])
    return StoreSettings(**given)


def resolve(path: str, requested: dict, memory_bytes, policy, readonly: bool):
    """Settings of the store at ``path`` (checked against ``requested``) or of a new one.

    Returns ``(settings, memory_bytes, policy)``: the budget and policy default to what the
    store used last (they may change on each open), else to the library defaults.
    """
    if memory_bytes is not None:
        _check_int("memory_bytes", memory_bytes, minimum=1)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"store path {path!r} is a file, not a directory")
    settings_path = os.path.join(path, SETTINGS_FILE)
    if os.path.exists(settings_path):
        saved = read_json(settings_path)
        settings = StoreSettings.from_json(saved.get("settings", {}), settings_path)
        settings.check_same(requested, path)
        return (settings, memory_bytes or saved.get("memory_bytes", DEFAULT_MEMORY_BYTES),
                policy or saved.get("policy", DEFAULT_POLICY))
    if readonly:
        raise FileNotFoundError(f"no mlkv store at {path!r} to open read-only")
    if requested["dim"] is None:
        raise ValueError(f"no store at {path!r} yet: pass dim= to create one")
    if os.path.isdir(path) and set(os.listdir(path)) - {"lock"}:
        raise MlkvError(f"{path!r} is a non-empty directory that is not an mlkv store")
    memory_bytes = memory_bytes or DEFAULT_MEMORY_BYTES
    return new_settings(requested, memory_bytes), memory_bytes, policy or DEFAULT_POLICY


def save_settings(path: str, settings: StoreSettings, memory_bytes: int, policy: str) -> None:
    """Write ``settings.json``: the fixed settings and this open's budget and policy."""
    write_json_atomic(os.path.join(path, SETTINGS_FILE), {
        "settings": settings.to_json(), "memory_bytes": memory_bytes, "policy": policy})
