"""``KVEmbedding`` and ``KVEmbeddingBag``: ``nn.Embedding`` / ``nn.EmbeddingBag`` over an mlkv store.

The table lives in a store (rows and optimizer state side by side, larger than memory); the
module has no ``nn.Parameter`` for it. The table trains itself: backward sums the gradient of
each unique id (as a sparse gradient is coalesced) and runs the module's update rule on those
rows inside the store. Train the rest of the model with any torch optimizer over
``model.parameters()`` as usual (the table is not among them)::

    emb = KVEmbedding(64, path="runs/emb", optimizer="adagrad", lr=0.05)
    opt = torch.optim.Adam(head.parameters())          # everything but the table
    loss = loss_fn(head(emb(ids)), y)
    loss.backward()                                     # also updates the rows of ids
    opt.step(); opt.zero_grad()

Decisions
---------
*Numbers.* ``optimizer`` is ``sgd``, ``adagrad``, ``rowwise_adagrad`` or ``adam`` with
torch's options; sgd, adagrad and adam give the numbers of ``torch.optim.SGD`` /
``Adagrad`` / ``SparseAdam`` on a sparse ``nn.Embedding`` (see
:mod:`mlkv.engine._rule_kernels`). Options torch refuses for sparse gradients are refused.
The step count ``t`` of adagrad's ``lr_decay`` and adam's bias correction counts the module's
optimizer steps, as torch counts them per parameter tensor.

*Fused or deferred.* ``fused=True`` (default): each backward that reaches the module is one
optimizer step, applied before backward returns. A module called twice before one backward
then takes two steps where torch takes one (the same numbers for sgd, not for adagrad and
adam): call it once per step (concatenate the ids) or use ``fused=False``. ``fused=False``:
backward adds the coalesced gradient to a pending sum; ``emb.step()`` applies it as one step
and clears it, ``emb.zero_grad()`` drops it (``model.zero_grad()`` and torch optimizers do
not reach it). The pending gradient is not part of ``state_dict``.

*Unseen ids* are created by the store's initializer on first read, in training and in eval
alike: a row depends only on (id, ``seed``). Any int64 is an id; no ``num_embeddings``.

*padding_idx* mirrors ``nn.Embedding``: that id's row is created as zeros (not by the
initializer), read like any row, and never updated (it gets no gradient, no optimizer state
change, and is excluded from bags by ``KVEmbeddingBag``). It is an id, not an index from the
end: a negative ``padding_idx`` is that negative id.

*Devices.* The store is on the CPU; ids may be on any device: the store reads ``ids.cpu()``
and the output is copied to ``ids.device``. *dtype* is the store's: float32 (default) or
float64; float16 stores cannot be trained.

*state_dict by reference.* ``state_dict()`` does not copy the table: it names the rows by
the store's path and ``content_id``, the id of the last checkpoint that changed a row (a
checkpoint or compaction that changes no row keeps it). If rows were written since the last
checkpoint (``store.changed``), it checkpoints first. Under ``<prefix>_extra_state`` it saves
``{format, path, content_id, dim, dtype, optimizer, options, step}`` (``options``: ``lr``,
``betas``, ``weight_decay``, ``lr_decay``, and ``eps`` unless the rule's default), strings,
ints and floats only, so ``torch.load(..., weights_only=True)`` reads it. ``load_state_dict``
checks ``dim``, ``dtype`` and ``optimizer`` (a difference raises
:class:`~mlkv.SettingsMismatchError`), takes the options and the step count (as a torch
optimizer's ``load_state_dict`` does), then finds the saved rows, rolling the store back
or switching to the saved store (the rules: :mod:`mlkv.frameworks.torch._state`).

*Lifetime.* ``path=None`` makes a store in a new temporary directory, removed (without a
checkpoint) at ``close()`` or when the module is garbage-collected; its ``state_dict`` is
loadable only while the module lives. A store the module opened is closed with
``store.close()`` (a checkpoint, which keeps ``content_id`` if no row changed) at ``close()``,
on leaving a ``with`` block, at garbage collection or at interpreter exit. A store passed
with ``store=`` is left open for its owner to close.

*Pipeline hooks* (:mod:`mlkv.frameworks.torch.pipeline`): ``_read_gate(module, unique_ids)``
is called before every store read with the distinct int64 ids about to be read;
``_update_sink(module, unique_ids, grads, step)``, when set, receives each step's coalesced
update instead of the module applying it with ``_apply_update(unique_ids, grads, step)``,
which may be called from any thread.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mlkv
from mlkv.engine._batch_kernels import unique_inverse
from mlkv.engine._rule_kernels import H_STEP, hyper_vector
from mlkv.engine.updates import coalesce

from . import _state
from ._autograd import check_bag_input, check_ids, cpu_numpy, lookup, lookup_table

_CHUNK = 1 << 16          # rows per store call in to_dense / from_dense


class KVEmbedding(nn.Module):
    """An embedding table in an mlkv store, trained by its own sparse optimizer.

    Parameters
    ----------
    dim : int
        Values per row.
    path : str or os.PathLike, optional
        The store's directory (created or reopened). None: a temporary directory, removed at
        :meth:`close` or garbage collection.
    optimizer : {"sgd", "adagrad", "rowwise_adagrad", "adam"}
        The update rule run in the store.
    lr, eps, betas, weight_decay, lr_decay
        Its options, as torch's optimizers take them (``eps=None``: the rule's default;
        ``weight_decay`` only for rowwise_adagrad, ``lr_decay`` for (rowwise_)adagrad).
        Plain attributes: assign ``emb.lr`` to schedule the learning rate.
    memory_bytes : int, optional
        The store's buffer-pool budget (default: the store's, 256 MiB for a new one).
    padding_idx : int, optional
        An id whose row is created as zeros and never updated (see the module docstring).
    dtype : torch.dtype or str, optional
        float32 or float64; default float32 for a new store, the store's when reopening.
    init, init_scale, seed : optional
        The store's initializer for unseen ids (new store defaults: ``"uniform"``, 0.01, 0).
    fused : bool
        Apply each backward's update at once (True) or on :meth:`step` (False).
    store : mlkv.Store, optional
        Wrap this open store instead of opening ``path`` (it stays the caller's to close).
    **store_options
        Further :func:`mlkv.open` options (``policy``, ``page_bits``, ``io_threads``, ...).
        ``threads=2`` reads each batch on two cores and runs the fused update on mlkv's
        helper thread while backward returns (the same numbers; the module's next call waits
        for it): do not change the gradient handed to ``backward`` in place before then.

    Raises
    ------
    ValueError
        For an unknown optimizer or an option torch refuses for it.
    SettingsMismatchError
        When the store was made with another ``dim``, ``dtype`` or optimizer state size.
    """

    def __init__(self, dim, path=None, optimizer="sgd", lr=0.01, memory_bytes=None,
                 padding_idx=None, dtype=None, init=None, init_scale=None, seed=None, eps=None,
                 betas=(0.9, 0.999), weight_decay=0.0, lr_decay=0.0, fused=True, store=None,
                 **store_options):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(
                padding_idx, (int, np.integer)) or not -2**63 <= padding_idx < 2**63):
            raise ValueError(f"padding_idx must be None or an int64 id, got {padding_idx!r}")
        self.dim, self.optimizer = int(dim), optimizer
        self.lr, self.eps = float(lr), None if eps is None else float(eps)
        self.betas = tuple(float(b) for b in betas)
        self.weight_decay, self.lr_decay = float(weight_decay), float(lr_decay)
        self._hyper(1)                                  # check the rule and its options now
        self.padding_idx = None if padding_idx is None else int(padding_idx)
        self.fused = bool(fused)
        self._read_gate = self._update_sink = None
        self._step, self._pending, self._grad_lock = 0, [], threading.Lock()
        self._open_options = dict(memory_bytes=memory_bytes, init=init, init_scale=init_scale,
                                  seed=seed, **store_options)
        _state.attach(self, path, store, dtype)

    # ---- the store ------------------------------------------------------------------------
    @property
    def store(self) -> mlkv.Store:
        """The :class:`mlkv.Store` holding the rows and their optimizer state."""
        return self._held.store

    @property
    def dtype(self) -> torch.dtype:
        """The rows' dtype (the store's)."""
        return _state.TORCH_DTYPES[self.dtype_name]

    def close(self) -> None:
        """Close the store if the module opened it, with a checkpoint (a temporary one is
        removed instead). Idempotent."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (f"{self.dim}, optimizer={self.optimizer!r}, lr={self.lr:g}{pad}, "
                f"dtype={self.dtype_name}, path={self.store.path!r}")

    # ---- lookup ---------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids``; unseen ids are created by the store's initializer.

        Parameters
        ----------
        ids : torch.Tensor
            int64 or int32 ids, any shape, any device.

        Returns
        -------
        torch.Tensor
            ``(*ids.shape, dim)`` on ``ids.device``, requiring grad when grad mode is on.
        """
        check_ids(ids)
        return lookup(self, ids)

    def _read_rows(self, keys: np.ndarray, unique_ids: np.ndarray | None = None) -> np.ndarray:
        """Rows of ``keys`` (``unique_ids``: its distinct ids, if known); gate, then create."""
        if self._read_gate is not None:
            self._read_gate(self, unique_inverse(keys)[0] if unique_ids is None else unique_ids)
        store, pad = self.store, self.padding_idx
        if store.readonly:
            return store.get(keys)
        if pad is not None and (keys == pad).any() and pad not in store:
            store.put([pad], np.zeros((1, self.dim), dtype=store.dtype))
        return store.get_or_init(keys)

    # ---- updates --------------------------------------------------------------------------
    def _hyper(self, step: int) -> np.ndarray:
        # checked (hyper_vector) once per change of options; kept outside nn.Module's __setattr__
        options = self.optimizer, self.lr, self.eps, self.betas, self.weight_decay, self.lr_decay
        if options != self.__dict__.get("_hyper_options"):
            self.__dict__.update(_hyper_options=options, _hyper_base=hyper_vector(*options, 1))
        hyper = self._hyper_base.copy()
        hyper[H_STEP] = step
        return hyper

    def _receive_grad(self, unique_ids, grad, local_pad, owned=False):
        """Backward of a lookup: ``grad`` (``unique_ids``' coalesced gradient) is copied when
        kept (a deferred step, a sink) unless ``owned`` (fresh, no one else's)."""
        g = cpu_numpy(grad)
        if local_pad is not None:
            keep = np.ones(unique_ids.shape[0], dtype=bool)
            keep[local_pad] = False
            unique_ids, g = unique_ids[keep], g[keep]
        kept = not self.fused or self._update_sink is not None      # else applied right here
        g = np.array(g, dtype=self.store.dtype, order="C", copy=(kept and not owned) or None)
        with self._grad_lock:
            if not self.fused:
                self._pending.append((unique_ids, g))
                return
            step = self._count_step()
        self._dispatch(unique_ids, g, step)

    def _receive_position_grads(self, ids, grads):
        """Backward of a lookup, fused and applied at once: ``grads`` has a row per position
        of ``ids`` (flat; ids repeat), summed per id by the store's update."""
        with self._grad_lock:
            step = self._count_step()
        if ids.shape[0]:
            self.store.update(ids, grads, self.optimizer, self._hyper(step), wait=False)

    def _count_step(self) -> int:
        # one more optimizer step (caller holds _grad_lock); set in __dict__ directly, as
        # nn.Module's __setattr__ costs microseconds a step
        self.__dict__["_step"] = step = self._step + 1
        return step

    def _dispatch(self, unique_ids, grads, step):
        sink = self._update_sink
        if sink is not None:
            sink(self, unique_ids, grads, step)
        else:
            self._apply_update(unique_ids, grads, step)

    def _apply_update(self, unique_ids: np.ndarray, grads: np.ndarray, step: int) -> None:
        """Run the update rule with step count ``step`` on these rows (any thread)."""
        if unique_ids.shape[0]:
            self.store.update(unique_ids, grads, self.optimizer, self._hyper(step), unique=True)

    def step(self) -> None:
        """``fused=False``: apply the gradient summed since the last step as one optimizer
        step, and clear it. Does nothing when no backward reached the module."""
        with self._grad_lock:
            pending, self._pending = self._pending, []
            if not pending:
                return
            step = self._count_step()
        ids, grads = coalesce(np.concatenate([p[0] for p in pending]),
                              np.concatenate([p[1] for p in pending]))
        self._dispatch(ids, grads, step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradient pending for :meth:`step` (``fused=False``) without applying it."""
        super().zero_grad(set_to_none)
        with self._grad_lock:
            self._pending = []

    # ---- dense tables ---------------------------------------------------------------------
    def to_dense(self, num: int | None = None) -> torch.Tensor:
        """Rows ``0 .. num-1`` as a dense table (for ``nn.Embedding.from_pretrained``).

        Parameters
        ----------
        num : int, optional
            Rows to return; default the largest id in the store + 1.

        Returns
        -------
        torch.Tensor
            ``[num, dim]`` on the CPU, in the module's dtype. Ids without a row read as zeros
            (they are not created; a lookup would create them with the initializer). The read
            does not disturb the store's cache.
        """
        if num is None:
            keys = self.store.keys()
            num = int(keys.max()) + 1 if keys.shape[0] and keys.max() >= 0 else 0
        if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
            raise ValueError(f"num must be an int >= 0, got {num!r}")
        out = np.zeros((int(num), self.dim), dtype=self.store.dtype)
        for keys, values in self.store.items(batch=_CHUNK):
            inside = (keys >= 0) & (keys < num)
            out[keys[inside]] = values[inside]
        return torch.from_numpy(out)

    def from_dense(self, weight) -> None:
        """Put rows ``0 .. n-1`` of a dense table into the store.

        Parameters
        ----------
        weight : torch.Tensor, numpy.ndarray, nn.Embedding or nn.EmbeddingBag
            ``[n, dim]`` rows (a module's ``weight``). Their optimizer state is reset to zeros,
            as for fresh rows; other rows and the step count are kept.
        """
        if isinstance(weight, (nn.Embedding, nn.EmbeddingBag)):
            weight = weight.weight
        if isinstance(weight, torch.Tensor):
            weight = weight.detach().cpu().numpy()
        weight = np.asarray(weight)
        if weight.ndim != 2 or weight.shape[1] != self.dim:
            raise ValueError(f"weight must be [n, {self.dim}], got shape {weight.shape}")
        for lo in range(0, weight.shape[0], _CHUNK):
            hi = min(lo + _CHUNK, weight.shape[0])
            self.store.put(np.arange(lo, hi, dtype=np.int64), weight[lo:hi])

    # ---- state_dict -----------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """The module's state by reference (see the module docstring); checkpoints the
        store first if rows were written since its last checkpoint."""
        return _state.save(self)

    def set_extra_state(self, state) -> None:
        """Load a state saved by :meth:`get_extra_state` (through ``load_state_dict``)."""
        options = _state.check_state(self, state)
        hyper_vector(self.optimizer, step=max(1, state["step"]), **options)   # check first
        _state.load(self, state["path"], state["content_id"])
        for name, value in options.items():
            setattr(self, name, value)
        self._step = state["step"]


class KVEmbeddingBag(KVEmbedding):
    """Sums or means of bags of rows, as ``nn.EmbeddingBag``, over an mlkv store.

    Parameters
    ----------
    dim, path
        As :class:`KVEmbedding`.
    mode : {"sum", "mean"}
        How a bag's rows are reduced (``"max"`` is not offered: torch has no sparse gradient
        for it).
    include_last_offset : bool
        As ``nn.EmbeddingBag``: ``offsets`` has one more element, the end of the last bag.
    **kwargs
        Everything else :class:`KVEmbedding` takes (``optimizer``, ``lr``, ``padding_idx``, ...).
        ``padding_idx`` is left out of its bags (and of a ``mean``'s count), as in torch.
    """

    def __init__(self, dim, path=None, mode="mean", include_last_offset=False, **kwargs):
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}"
                             + (" (max has no sparse gradient in torch)" if mode == "max"
                                else ""))
        super().__init__(dim, path, **kwargs)
        self.mode, self.include_last_offset = mode, bool(include_last_offset)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Bags of rows, ``[n_bags, dim]``; arguments as ``nn.EmbeddingBag.forward``.

        ``input`` 2-D: each row is a bag (``offsets`` must be None). ``input`` 1-D: bags
        start at ``offsets`` (1-D). ``per_sample_weights`` (input's shape) scales each row
        of a ``sum``.
        """
        check_bag_input(input, offsets, per_sample_weights, self.mode)
        table, inverse, local_pad = lookup_table(self, input)
        if offsets is not None:
            offsets = offsets.to(device=inverse.device, dtype=torch.int64)
        return F.embedding_bag(inverse, table, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset,
                               padding_idx=local_pad)
