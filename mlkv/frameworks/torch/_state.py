"""The store a module holds, and ``state_dict`` by reference to one of its checkpoints.

A module opens its store here (or checks one it is given); a finalizer releases it with the
module. :func:`save` and :func:`load` implement ``state_dict`` by reference: a saved state
names its rows by the store's path and ``content_id`` (the id of the last checkpoint that
changed a row), so checkpoints and compactions that change no row keep it loadable. What
is saved is described in the docstring of :mod:`mlkv.frameworks.torch.modules`. Loading,
after the checks there:

1. The module's store is at the saved path. Its ``content_id`` equals the saved one and
   ``store.changed`` is False: nothing to do. ``store.changed`` is True and its last
   checkpoint's ``content_id`` is the saved one: the writes since are dropped by closing the
   store without a checkpoint (``close(checkpoint=False)``) and reopening it with the same
   options; only a store the module opened (one passed with ``store=`` raises
   :class:`~mlkv.MlkvError` instead). Another ``content_id``: a checkpoint of changed rows
   was taken since the save and the store keeps only its last checkpoint, so this raises
   :class:`~mlkv.MlkvError` naming both ids (to keep a state, copy the directory after
   ``state_dict()``; put the copy back at the saved path to load it).
2. The saved path is another store: it must exist and its ``content_id`` must be the saved
   one (else :class:`~mlkv.MlkvError`; a writer holding it raises
   :class:`~mlkv.StoreLockedError`). The module opens it and switches to it, releasing its
   own store as :meth:`~KVEmbedding.close` does (a copy at the module's path is not used).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import numpy as np
import torch

import mlkv
from mlkv import config
from mlkv.engine._rule_kernels import state_dim
from mlkv.errors import MlkvError, SettingsMismatchError

#: marks (and versions) the dict a module stores under ``<prefix>_extra_state``
FORMAT = "mlkv.frameworks.torch.KVEmbedding/2"
OPTIONS = ("lr", "eps", "betas", "weight_decay", "lr_decay")
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Held:
    """A module's store, whether the module opened it, and its temporary directory (if any)."""

    def __init__(self, store, owned, tempdir):
        self.store, self.owned, self.tempdir = store, owned, tempdir

    def release(self):
        """Finalizer: close an owned store (with a checkpoint, unless it is temporary);
        remove a temporary one."""
        try:
            if self.owned:
                self.store.close(checkpoint=not self.tempdir)
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
    reopen(module, tempdir or path, dtype, tempdir)


def reopen(module, path, dtype, tempdir):
    """Open the store at ``path`` and make it the module's (removing ``tempdir`` on failure)."""
    try:
        store = open_store(module, path, dtype)
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
    """The module's state by reference; checkpoints its store first if rows were written
    since its last checkpoint."""
    store = module.store
    if store.changed:
        store.checkpoint()
    options = {"lr": float(module.lr), "betas": tuple(float(b) for b in module.betas),
               "weight_decay": float(module.weight_decay), "lr_decay": float(module.lr_decay)}
    if module.eps is not None:                  # absent: the rule's default
        options["eps"] = float(module.eps)
    return {"format": FORMAT, "path": os.path.abspath(store.path),
            "content_id": int(store.content_id), "dim": module.dim, "dtype": module.dtype_name,
            "optimizer": module.optimizer, "options": options, "step": module._step}


def check_state(module, state) -> dict:
    """Validate a saved state against ``module``; returns its optimizer options.

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
    for name in ("dim", "step", "content_id"):
        value = state.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"KVEmbedding state: field {name!r} must be an integer >= 0, "
                             f"got {value!r}")
    saved = state.get("options")
    try:
        if set(saved) - set(OPTIONS):
            raise KeyError(sorted(set(saved) - set(OPTIONS)))
        options = {name: float(saved[name]) for name in ("lr", "weight_decay", "lr_decay")}
        options["eps"] = None if saved.get("eps") is None else float(saved["eps"])
        options["betas"] = tuple(float(b) for b in saved["betas"])
        if len(options["betas"]) != 2:
            raise ValueError(options["betas"])
    except (TypeError, ValueError, KeyError):
        raise ValueError(f"KVEmbedding state: field 'options' must be a dict of {OPTIONS} "
                         f"(eps optional), got {saved!r}") from None
    diffs = [f"{name}={state[name]!r} (this module has {name}={mine!r})"
             for name, mine in (("dim", module.dim), ("dtype", module.dtype_name),
                                ("optimizer", module.optimizer)) if state[name] != mine]
    if diffs:
        raise SettingsMismatchError("cannot load a KVEmbedding state saved with other "
                                    "settings: " + ", ".join(diffs))
    return options


def moved_past(path, ref, store) -> MlkvError:
    since = " and has writes since" if store.changed else ""
    return MlkvError(
        f"the store at {path!r} has moved past the saved state: the state names content_id "
        f"{ref}, the store's last checkpoint has content_id {store.content_id}{since}. A store "
        f"keeps only its last checkpoint: to load this state, put back at that path a copy "
        f"of the directory made after state_dict()")


def load(module, path, ref):
    """Make ``module``'s store the one at ``path`` holding the rows of ``content_id`` ``ref``
    (rules 1 and 2 of the docstring of :mod:`mlkv.frameworks.torch.modules`)."""
    held = module._held
    store = held.store
    if os.path.realpath(store.path) != os.path.realpath(path):
        return switch(module, path, ref)
    if store.content_id != ref:
        raise moved_past(path, ref, store)
    if not store.changed:
        return
    if not held.owned:
        raise MlkvError(
            f"the store at {path!r} has writes since its last checkpoint, which holds the "
            f"saved state (content_id {ref}); the module did not open it (store=), so it does "
            f"not drop them: close it with close(checkpoint=False), reopen it and load again")
    module._finalizer.detach()
    store.close(checkpoint=False)
    reopen(module, store.path, module.dtype_name, held.tempdir)
    if module.store.content_id != ref:           # another process checkpointed in between
        raise moved_past(path, ref, module.store)


def switch(module, path, ref):
    """Rule 2: open the saved store (it must exist and hold ``ref``) in place of the module's."""
    if not os.path.isfile(os.path.join(path, config.SETTINGS_FILE)):
        raise MlkvError(f"the state refers to the store at {path!r}, which does not exist "
                        f"(this module's store is at {module.store.path!r})")
    new = open_store(module, path, module.dtype_name)
    if new.content_id != ref:
        new.close(checkpoint=False)
        raise moved_past(path, ref, new)
    try:
        module._finalizer()                      # as at close()
    except BaseException:
        new.close(checkpoint=False)
        raise
    adopt(module, new, owned=True, tempdir=None)
