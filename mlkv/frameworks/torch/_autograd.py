"""The autograd link between a lookup and the store: rows in, coalesced gradients out.

A lookup reads the rows of the batch's *unique* ids into a small local table ``W``
(``[n_unique, dim]``) through :class:`StoreRows`, then runs ``F.embedding`` or
``F.embedding_bag`` on the inverse indices. torch's own backward of those functions sums the
gradient of every occurrence of an id into its row of ``W``, which is exactly the coalesced
sparse gradient (``Tensor.coalesce()``) a sparse ``nn.Embedding`` hands its optimizer; the
backward of :class:`StoreRows` passes it to the module, which applies it in the store.

``KVEmbedding`` itself uses :class:`Lookup` instead: the store reads every position straight
into the output (no local table, no second gather pass). Its backward hands the output's
gradient, a row per position, to the store's fused update, whose kernel sums the rows of a
repeated id as it updates that id; when the gradient must outlive the backward (``fused=False``,
a pipeline's update queue) it is first summed per distinct id in one Numba pass. Either way
the sums run in position order and agree with torch's to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from ...engine._batch_kernels import sum_rows_first_seen, unique_inverse


#: An empty leaf that requires grad, handed to every lookup's autograd node so autograd records
#: it. One for all: no backward gives it a gradient (each returns None for it), and a fresh
#: one per lookup cost about 10 µs a step.
_ANCHOR = torch.empty(0, requires_grad=True)


class StoreRows(torch.autograd.Function):
    """``W = rows`` with a backward that hands ``dL/dW`` to ``module._receive_grad``.

    ``anchor`` is :data:`_ANCHOR`: it makes autograd record the node (the rows come from the
    store, not from a tensor of the graph).
    """

    @staticmethod
    def forward(ctx, anchor, module, unique_ids, rows, local_pad):
        ctx.module, ctx.unique_ids, ctx.local_pad = module, unique_ids, local_pad
        return torch.from_numpy(rows)

    @staticmethod
    def backward(ctx, grad):
        ctx.module._receive_grad(ctx.unique_ids, grad, ctx.local_pad)
        return None, None, None, None, None


class Lookup(torch.autograd.Function):
    """The rows of a batch (``F.embedding`` without norms), read straight from the store into
    the output. Backward hands the gradient, a row per position (padding positions left out),
    to the store's fused update; or, when it must be kept, the gradient summed per distinct id
    to ``module._receive_grad``.

    The gradient's sum over repeated ids runs in Numba kernels (the store's update, or
    :mod:`mlkv.engine._batch_kernels`), several times cheaper than ``index_add_`` on the CPU
    for batches of thousands of ids.
    """

    @staticmethod
    def forward(ctx, anchor, module, flat, out):
        ctx.module, ctx.flat = module, flat
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):
        grads = np.ascontiguousarray(cpu_numpy(grad_out).reshape(-1, grad_out.shape[-1]))
        module, flat, pad = ctx.module, ctx.flat, ctx.module.padding_idx
        if module.fused and module._update_sink is None:
            # applied right here, padding positions left out: the store sums repeated ids
            # inside its update kernel (sgd adds them in turn, as torch's SGD does)
            if pad is not None:
                keep = flat != pad
                if not keep.all():
                    flat, grads = flat[keep], grads[keep]
            module._receive_position_grads(flat, grads)
            return None, None, None, None
        # kept for later: summed per distinct id first
        unique_ids, inverse = unique_inverse(flat)
        summed = np.empty((unique_ids.shape[0], grads.shape[1]), dtype=grads.dtype)
        sum_rows_first_seen(grads, inverse, summed)
        module._receive_grad(unique_ids, torch.from_numpy(summed), position_of(unique_ids, pad),
                             owned=True)
        return None, None, None, None


#: ``Function.apply`` without its Python wrapper (torch's C++ ``apply``). Outside torch.func's
#: transforms the wrapper only unwraps functorch's dead wrappers, of which these Functions'
#: arguments (the anchor, a module, numpy arrays) hold none, and calls this; skipping it
#: saved 3-4 µs a training step, whose Python runs with caches the kernels just swept.
_LOOKUP_APPLY = super(torch.autograd.Function, Lookup).apply
_STORE_ROWS_APPLY = super(torch.autograd.Function, StoreRows).apply


def _apply(function, direct):
    """``direct``, or inside a torch.func transform ``function.apply`` (which refuses these
    Functions with torch's own message: they define no ``setup_context``)."""
    return function.apply if torch._C._are_functorch_transforms_active() else direct


def lookup(module, ids: torch.Tensor) -> torch.Tensor:
    """``module``'s rows of ``ids``: ``(*ids.shape, dim)`` on ``ids.device``.

    Every position is read from the store, repeats included, straight into the output: a
    repeat costs a probe and a copy of a row already in cache, cheaper than reading the
    distinct rows and gathering them into the output in a second pass.
    """
    flat = flat_ids(ids)
    out = module._read_rows(flat)
    if ids.dim() != 1:
        out = out.reshape(*ids.shape, module.dim)
    if torch.is_grad_enabled():
        result = _apply(Lookup, _LOOKUP_APPLY)(_ANCHOR, module, flat, out)
    else:
        result = torch.from_numpy(out)
    return result if ids.is_cpu else result.to(ids.device)


def lookup_table(module, ids: torch.Tensor):
    """Read the rows of ``ids``'s unique values through ``module``.

    Returns ``(W, inverse, local_pad)``: ``W`` the rows on ``ids.device`` (requiring grad
    when grad mode is on), ``inverse`` the positions of ``ids`` in ``W`` with ``ids``'s shape
    and device, ``local_pad`` the row of ``module.padding_idx`` in ``W`` (None without one).
    The padding id is a row of ``W`` even when no position looks it up: torch's bag kernel
    sums in another order (fused multiply-adds) when it is given no ``padding_idx``, so the
    numbers stay ``nn.EmbeddingBag``'s. (Not on a read-only store without that row: it can
    neither create nor read it, and sums differ from torch's by float rounding there.)
    """
    unique_ids, inverse = distinct(ids)
    pad, store = module.padding_idx, module.store
    local_pad = position_of(unique_ids, pad)
    if pad is not None and local_pad is None and (not store.readonly or pad in store):
        local_pad = unique_ids.shape[0]
        unique_ids = np.append(unique_ids, np.int64(pad))
    rows = module._read_rows(unique_ids, unique_ids)
    if torch.is_grad_enabled():
        table = _apply(StoreRows, _STORE_ROWS_APPLY)(_ANCHOR, module, unique_ids, rows,
                                                     local_pad)
    else:
        table = torch.from_numpy(rows)
    return table.to(ids.device), inverse.reshape(ids.shape).to(ids.device), local_pad


def flat_ids(ids: torch.Tensor) -> np.ndarray:
    """``ids`` as a flat, contiguous int64 numpy vector on the CPU."""
    if ids.dtype != torch.int64:
        ids = ids.to(torch.int64)
    return np.ascontiguousarray(cpu_numpy(ids).reshape(-1))


def cpu_numpy(tensor: torch.Tensor) -> np.ndarray:
    """``tensor``'s numbers as a numpy array (copied only from another device). Runs twice a
    training step: each check it skips (``detach``, ``to``) saves a microsecond."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    return tensor.numpy() if tensor.is_cpu else tensor.cpu().numpy()


def distinct(ids: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """The distinct ids of a batch (int64, first-seen order) and, for every position, the
    index of its id among them (a flat CPU LongTensor)."""
    unique_ids, inverse = unique_inverse(flat_ids(ids))
    return unique_ids, torch.from_numpy(inverse)


def position_of(unique_ids: np.ndarray, padding_idx) -> int | None:
    """Where ``padding_idx`` is among ``unique_ids`` (None if absent or no padding)."""
    if padding_idx is None:
        return None
    hits = np.flatnonzero(unique_ids == padding_idx)
    return int(hits[0]) if hits.shape[0] else None


def check_ids(ids, what: str = "ids") -> None:
    """Refuse what ``nn.Embedding`` refuses: non-tensors and non-integer (Long/Int) tensors."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of int64 or int32, got "
                        f"{type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what} must be a LongTensor or IntTensor (int64 or int32), got "
                        f"dtype {ids.dtype}")


def check_bag_input(input, offsets, per_sample_weights, mode: str) -> None:
    """Refuse the arguments ``nn.EmbeddingBag.forward`` refuses, naming the problem."""
    check_ids(input, "input")
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D (each row of input "
                             "is a bag)")
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets must be a 1-D tensor of bag starts when input is "
                             "1-D, got None")
        check_ids(offsets, "offsets")
        if offsets.dim() != 1:
            raise ValueError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
    else:
        raise ValueError(f"input must be 1-D (with offsets) or 2-D, got shape "
                         f"{tuple(input.shape)}")
    if per_sample_weights is not None:
        if mode != "sum":
            raise NotImplementedError(f"per_sample_weights is only supported with "
                                      f"mode='sum' (as in torch), got mode={mode!r}")
        if per_sample_weights.shape != input.shape:
            raise ValueError(f"per_sample_weights must have input's shape "
                             f"{tuple(input.shape)}, got {tuple(per_sample_weights.shape)}")
