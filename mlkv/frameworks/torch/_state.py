"""The store a module holds, and ``state_dict`` by reference to one of its checkpoints.

A module opens its store here (or checks one it is given); a finalizer releases it with the
module. :func:`save` and :func:`load` implement ``state_dict`` by reference (the rules are in
the docstring of :mod:`mlkv.frameworks.torch.modules`).

A checkpoint is named by its *fingerprint*: id, log markers (``begin``, ``tail``), row count
and index CRC-32, from the store's manifest. Checkpoints, compactions and reads that copy rows
to the tail change the fingerprint but not the contents, so a module also tracks which
fingerprints hold the contents it last saw clean: the store's write counters (``puts``,
``updates``, ``deletes``, ``created`` of ``stats()``, counted since it was opened) grow with
every change of contents, and a store equals its last checkpoint when opened. While the
counters stay where they were at a moment the store equalled a checkpoint, every later
checkpoint holds the same contents. A module also closes a store it opened without a new
checkpoint when its contents have not changed, so the last checkpoint (the one a saved state
names) survives ``close()``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import numpy as np
import torch

import mlkv
from mlkv.engine import checkpoint as _checkpoint
from mlkv.engine._rule_kernels import state_dim
from mlkv.errors import MlkvError, SettingsMismatchError

#: marks (and versions) the dict a module stores under ``<prefix>_extra_state``
FORMAT = "mlkv.frameworks.torch.KVEmbedding/1"
FINGERPRINT = ("checkpoint_id", "begin", "tail", "rows", "index_crc32")
WRITE_COUNTERS = ("puts", "updates", "deletes", "created")
OPTIONS = ("lr", "eps", "betas", "weight_decay", "lr_decay")
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def fingerprint(path: str) -> tuple | None:
    """The fingerprint of the last checkpoint of the store at ``path`` (None without one)."""
    manifest = _checkpoint.load_manifest(path)
    return None if manifest is None else tuple(int(manifest[k]) for k in FINGERPRINT)


def write_counts(store) -> tuple:
    stats = store.stats()
    return tuple(int(stats[k]) for k in WRITE_COUNTERS)


def close_discarding(store) -> None:
    """Close ``store`` without the checkpoint ``close()`` takes: writes since its last
    checkpoint are dropped, and reopening it returns to that checkpoint.

    The Store has no public way to do this yet; ``close()`` skips its checkpoint for a store
    stopped by a failure, so this marks the store stopped first.
    """
    with store._lock:
        if not store._closed and store._failure is None:
            store._failure = MlkvError("closed without a checkpoint")
    store.close()


class Held:
    """A module's store, whether the module opened it, its temporary directory (if any), and
    what is known of its contents: ``clean_counts``, the write counters at the last moment it
    equalled a checkpoint, and ``clean_fps``, fingerprints known to hold those contents."""

    def __init__(self, store, owned, tempdir):
        self.store, self.owned, self.tempdir = store, owned, tempdir
        self.clean_counts = (0,) * len(WRITE_COUNTERS)       # as opened: its last checkpoint
        self.clean_fps = set()
        if write_counts(store) == self.clean_counts:
            self.clean_fps.add(fingerprint(store.path))

    def is_clean(self) -> bool:
        return write_counts(self.store) == self.clean_counts

    def holds(self, fp) -> bool:
        """Whether checkpoint ``fp`` holds the contents the store returns to when reverted."""
        here = fingerprint(self.store.path)
        return fp is not None and (here == fp or (fp in self.clean_fps and (
            here in self.clean_fps or self.is_clean())))

    def release(self):
        """Finalizer: close an owned store (with a checkpoint only if its contents changed);
        drop a temporary one."""
        try:
            if self.owned:
                try:
                    clean = bool(self.tempdir) or self.is_clean()
                except MlkvError:             # closed already, or stopped by a device error
                    clean = True
                (close_discarding if clean else type(self.store).close)(self.store)
        finally:
            if self.tempdir:
                shutil.rmtree(self.tempdir, ignore_errors=True)


# ---- the store a module holds ------------------------------------------------------------
def dtype_name(dtype) -> str | None:
    """``"float32"`` / ``"float64"`` from a torch or numpy dtype or a name (None stays None)."""
    if dtype is None:
        return None
    try:
        name = (str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype)
                else np.dtype(dtype).name)
    except TypeError:
        name = repr(dtype)
    if name not in TORCH_DTYPES:
        raise TypeError(f"dtype must be float32 or float64 (the update rules train those), "
                        f"got {dtype!r}")
    return name


def attach(module, path, store, dtype):
    """Give a new ``module`` its store: ``store`` if given, else the one at ``path`` (a new
    temporary directory when None)."""
    dtype = dtype_name(dtype)
    if store is not None:
        given = [k for k, v in module._open_options.items() if v is not None]
        if path is not None or given:
            raise ValueError("pass either store= or path= with store options, not both "
                             f"(got store= and {['path'] * (path is not None) + given})")
        check_store(module, store, dtype)
        return adopt(module, store, owned=False, tempdir=None)
    tempdir = tempfile.mkdtemp(prefix="mlkv-emb-") if path is None else None
    try:
        store = open_store(module, tempdir or path, dtype)
    except BaseException:
        if tempdir:
            shutil.rmtree(tempdir, ignore_errors=True)
        raise
    adopt(module, store, owned=True, tempdir=tempdir)


def adopt(module, store, owned, tempdir):
    """Make ``store`` the module's; a finalizer releases it with the module."""
    held = module._held = Held(store, owned, tempdir)
    module.dtype_name = store.dtype.name
    module._finalizer = weakref.finalize(module, held.release)


def open_store(module, path, dtype):
    """Open (or create) the store at ``path`` for ``module``'s dim, dtype and optimizer."""
    need = state_dim(module.optimizer, module.dim)
    options = {k: v for k, v in module._open_options.items() if v is not None}
    try:
        store = mlkv.open(path, dim=module.dim, dtype=dtype, state_dim=need, **options)
    except SettingsMismatchError as exc:
        raise SettingsMismatchError(f"{exc} (optimizer {module.optimizer!r} keeps {need} "
                                    f"state values a row of dim {module.dim})") from exc
    try:
        check_store(module, store, dtype)
    except BaseException:
        store.close()
        raise
    return store


def check_store(module, store, dtype):
    """Refuse a store ``module`` cannot train: another dim, too little state, another dtype."""
    need = state_dim(module.optimizer, module.dim)
    if store.dim != module.dim or store.state_dim < need:
        raise SettingsMismatchError(
            f"store at {store.path!r} has dim={store.dim}, state_dim={store.state_dim}; "
            f"KVEmbedding(dim={module.dim}, optimizer={module.optimizer!r}) needs dim="
            f"{module.dim} and state_dim >= {need}")
    if store.dtype.name not in TORCH_DTYPES:
        raise TypeError(f"store at {store.path!r} has dtype {store.dtype.name}: the update "
                        f"rules train float32 and float64 rows")
    if dtype is not None and store.dtype.name != dtype:
        raise SettingsMismatchError(f"store at {store.path!r} has dtype "
                                    f"{store.dtype.name}, not {dtype}")


# ---- state_dict ---------------------------------------------------------------------------
def save(module) -> dict:
    """The module's state by reference; checkpoints its store unless its contents have not
    changed since a checkpoint."""
    held = module._held
    store = held.store
    counts = write_counts(store)
    fp = fingerprint(store.path)
    if counts == held.clean_counts and fp is not None:
        held.clean_fps.add(fp)               # no write since the contents were clean
    else:
        store.checkpoint()
        fp = fingerprint(store.path)
        held.clean_counts, held.clean_fps = counts, {fp}   # a racing write counts as dirty
    state = {"format": FORMAT, "path": os.path.abspath(store.path), "dim": module.dim,
             "dtype": module.dtype_name, "optimizer": module.optimizer, "step": module._step}
    state.update(zip(FINGERPRINT, fp))
    state.update({name: getattr(module, name) for name in OPTIONS})
    state["betas"] = tuple(float(b) for b in module.betas)
    return state


def check_state(module, state) -> tuple:
    """Validate a saved state against ``module``; returns the fingerprint it refers to.

    Raises
    ------
    ValueError
        The dict is not a state this module saves (wrong format or fields).
    SettingsMismatchError
        ``dim``, ``dtype`` or ``optimizer`` differ from the module's (they fix the rows' and
        the state's layout).
    """
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a state of an mlkv KVEmbedding (format {found!r}; this mlkv "
                         f"reads {FORMAT!r})")
    for name in ("path", "dtype", "optimizer"):
        if not isinstance(state.get(name), str):
            raise ValueError(f"KVEmbedding state: field {name!r} must be a string, got "
                             f"{state.get(name)!r}")
    for name in ("dim", "step") + FINGERPRINT:
        value = state.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"KVEmbedding state: field {name!r} must be an integer >= 0, "
                             f"got {value!r}")
    diffs = [f"{name}={state[name]!r} (this module has {name}={mine!r})"
             for name, mine in (("dim", module.dim), ("dtype", module.dtype_name),
                                ("optimizer", module.optimizer)) if state[name] != mine]
    if diffs:
        raise SettingsMismatchError("cannot load a KVEmbedding state saved with other "
                                    "settings: " + ", ".join(diffs))
    return tuple(state[k] for k in FINGERPRINT)


def describe(fp) -> str:
    if fp is None:
        return "no checkpoint"
    cid, _, tail, rows, crc = fp
    return f"checkpoint {cid} (tail {tail}, {rows} rows, index CRC {crc:#010x})"


def load(module, path, ref):
    """Make ``module``'s store hold the referenced checkpoint's contents (rules 1-4 of the
    docstring of :mod:`mlkv.frameworks.torch.modules`)."""
    held = module._held
    here = fingerprint(held.store.path)
    if os.path.realpath(held.store.path) == os.path.realpath(path):
        if not held.holds(ref):
            raise MlkvError(
                f"the state refers to {describe(ref)} of the store at {path!r}, but its last "
                f"checkpoint is now {describe(here)} with other contents: a store keeps only "
                f"its last checkpoint (copy its directory after state_dict() to keep one)")
        return revert(module)
    try:
        there = fingerprint(path)
    except (OSError, MlkvError):
        there = None
    if there == ref:
        new = open_store(module, path, module.dtype_name)
        if fingerprint(path) != ref:
            new.close()
            raise MlkvError(f"the store at {path!r} moved past {describe(ref)} while it was "
                            f"being opened")
        module._finalizer()
        return adopt(module, new, owned=True, tempdir=None)
    if held.holds(ref):
        return revert(module)                 # a copy of the referenced store
    raise MlkvError(
        f"the state refers to {describe(ref)} of the store at {path!r}, which has "
        f"{describe(there)} now; this module's store at {held.store.path!r} has "
        f"{describe(here)}")


def revert(module):
    """Return the module's store to its last checkpoint if it has changed since."""
    held = module._held
    if held.is_clean():
        return
    if not held.owned:
        raise MlkvError(
            f"the store at {held.store.path!r} may have changes since its last checkpoint, "
            f"which the state refers to; the module did not open it (store=), so it does not "
            f"discard them: close and reopen that store, then load again")
    path, tempdir, fps = held.store.path, held.tempdir, held.clean_fps
    module._finalizer.detach()
    close_discarding(held.store)
    adopt(module, open_store(module, path, module.dtype_name), owned=True, tempdir=tempdir)
    module._held.clean_fps |= fps
