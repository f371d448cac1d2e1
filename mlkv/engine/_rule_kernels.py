"""Numba kernels of the sparse optimizer update rules: torch's numbers, one row at a time.

A rule updates one embedding row ``w`` (length ``dim``) in place from the row's gradient
``g`` and its optimizer state. Each rule gives, for every row of a sparse gradient, what the
torch optimizer named below does to that row (``lr``, ``eps``, ... are the optimizer's
options, ``t`` the global step count: 1 on the first optimizer step):

- ``sgd`` (``torch.optim.SGD``): ``w -= lr * g``. No state. torch refuses ``weight_decay`` with
  sparse gradients; its momentum buffer moves rows absent from the batch, so it is not offered.
- ``adagrad`` (``torch.optim.Adagrad``, sparse path): ``s += g*g``;
  ``w -= clr * g / (sqrt(s) + eps)`` with ``clr = lr / (1 + (t - 1) * lr_decay)``.
  State: ``s``, ``dim`` values. torch refuses ``weight_decay`` with sparse gradients.
- ``rowwise_adagrad`` (fbgemm / torchrec): ``g' = g + weight_decay * w`` (L2);
  ``a += mean(g'*g')`` over the row; ``w -= clr * g' / (sqrt(a) + eps)``, ``clr`` as adagrad.
  State: ``a``, one value.
- ``adam`` (``torch.optim.SparseAdam``): ``m += (1 - beta1) * (g - m)``;
  ``v += (1 - beta2) * (g*g - v)``; ``w -= step_size * m / (sqrt(v) + eps)`` with
  ``step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t)``. State: ``m`` then ``v``,
  ``2 * dim`` values. No weight decay (SparseAdam has none).

State is float32 whatever the row dtype, zero for a new row. The arithmetic runs in the row's
dtype, with the scalar options rounded to it where torch rounds them, in torch's order, and
with a fused multiply-add where torch's ``param.add_(x, alpha=a)`` uses one (sgd, adagrad).
Given the same gradient rows, an sgd row is then torch's to the bit; adagrad and adam agree
to an ulp or so per step, as torch's float32 sqrt is not correctly rounded (it is off by an
ulp on about 1 value in 6). (A float64 row keeps float32 state, where torch would keep
float64: agreement is then to float32 precision.)

A rule other than sgd is not linear in ``g``: the caller sums the gradients of duplicate ids
before it runs, as torch coalesces a sparse gradient, and runs the rule once per unique row.
sgd is linear: it may run once per gradient row, duplicates included, with the same result up
to float rounding (torch's SGD does so: it adds the uncoalesced gradient).
"""

import math

import numpy as np

from .._jit import fma, inline_kernel, kernel
from ..inputs import is_ready

RULE_SGD, RULE_ADAGRAD, RULE_ROWWISE_ADAGRAD, RULE_ADAM = range(4)
RULES = {"sgd": RULE_SGD, "adagrad": RULE_ADAGRAD, "rowwise_adagrad": RULE_ROWWISE_ADAGRAD,
         "adam": RULE_ADAM}
#: rules linear in the gradient: a duplicate id's gradient rows need no summing first
LINEAR_RULES = frozenset((RULE_SGD,))

# float64 hyper-parameter vector, indexed by these
H_LR, H_EPS, H_BETA1, H_BETA2, H_WEIGHT_DECAY, H_STEP, H_LR_DECAY = range(7)
N_HYPER = 7

#: default eps per rule: torch's Adagrad and SparseAdam; torchrec's RowWiseAdagrad (fbgemm's
#: fused kernels default to 1e-8 instead)
DEFAULT_EPS = {"sgd": 0.0, "adagrad": 1e-10, "rowwise_adagrad": 1e-10, "adam": 1e-8}


def _rule_code(rule_name: str) -> int:
    if rule_name not in RULES:
        raise ValueError(f"unknown update rule {rule_name!r}; valid rules: {', '.join(RULES)}")
    return RULES[rule_name]


def state_dim(rule_name: str, dim: int) -> int:
    """Number of float32 state values per row of rule ``rule_name`` for rows of length ``dim``.

    sgd 0; adagrad ``dim`` (sum of squared gradients); rowwise_adagrad 1 (the accumulator);
    adam ``2 * dim`` (``exp_avg`` then ``exp_avg_sq``).
    """
    return (0, dim, 1, 2 * dim)[_rule_code(rule_name)]


def hyper_vector(rule_name: str, lr: float, eps: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 lr_decay: float = 0.0, step: int = 1) -> np.ndarray:
    """The float64 hyper-parameter vector of one optimizer step (indices ``H_*``).

    Parameters
    ----------
    rule_name : str
        One of :data:`RULES`.
    lr : float
        Learning rate.
    eps : float, optional
        Denominator term; None takes the rule's default (:data:`DEFAULT_EPS`).
    betas : tuple of float
        ``(beta1, beta2)`` of adam; other rules ignore them.
    weight_decay : float
        L2 penalty; rowwise_adagrad only (torch refuses it for sparse sgd and adagrad).
    lr_decay : float
        adagrad and rowwise_adagrad only.
    step : int
        The global optimizer step count, 1 on the first update. torch keeps one step per
        parameter tensor, not per row: the caller increments it once per optimizer step.

    Raises
    ------
    ValueError
        For an unknown rule, an invalid value, or an option torch refuses for the rule.
    """
    _rule_code(rule_name)
    eps = DEFAULT_EPS[rule_name] if eps is None else float(eps)
    lr, weight_decay, lr_decay = float(lr), float(weight_decay), float(lr_decay)
    beta1, beta2 = (float(b) for b in betas)
    values = {"lr": lr, "eps": eps, "beta1": beta1, "beta2": beta2,
              "weight_decay": weight_decay, "lr_decay": lr_decay}
    for name, v in values.items():
        if not math.isfinite(v):
            raise ValueError(f"{rule_name}: {name} must be finite, got {v}")
    if isinstance(step, bool) or int(step) != step or step < 1:
        raise ValueError(f"{rule_name}: step must be an integer >= 1 (1 on the first "
                         f"update), got {step!r}")
    if rule_name in ("sgd", "adagrad") and weight_decay != 0:
        raise ValueError(f"{rule_name}: torch.optim.{'SGD' if rule_name == 'sgd' else 'Adagrad'}"
                         " refuses weight_decay with sparse gradients; use rowwise_adagrad "
                         "for an L2 penalty")
    if rule_name == "adam" and weight_decay != 0:
        raise ValueError("adam: torch.optim.SparseAdam has no weight_decay option")
    if rule_name in ("sgd", "adam") and lr_decay != 0:
        raise ValueError(f"{rule_name}: lr_decay is an option of adagrad and "
                         "rowwise_adagrad only")
    if rule_name == "sgd" and eps != 0:
        raise ValueError("sgd: eps is not an option of sgd")
    if lr < 0 or (rule_name == "adam" and lr == 0):
        raise ValueError(f"{rule_name}: invalid learning rate {lr}")
    if eps < 0 or (rule_name == "adam" and eps == 0):
        raise ValueError(f"{rule_name}: invalid eps {eps}")
    if weight_decay < 0 or lr_decay < 0:
        raise ValueError(f"{rule_name}: weight_decay and lr_decay must be >= 0")
    if rule_name == "adam" and not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"adam: betas must be in [0, 1), got {betas}")
    hyper = np.zeros(N_HYPER, dtype=np.float64)
    hyper[H_LR], hyper[H_EPS], hyper[H_BETA1], hyper[H_BETA2] = lr, eps, beta1, beta2
    hyper[H_WEIGHT_DECAY], hyper[H_STEP], hyper[H_LR_DECAY] = weight_decay, step, lr_decay
    return hyper


@inline_kernel
def _clr(hyper):
    """Adagrad's decayed learning rate (float64, as torch computes it in Python)."""
    return hyper[H_LR] / (1.0 + (hyper[H_STEP] - 1.0) * hyper[H_LR_DECAY])


@inline_kernel
def apply_rule(rule, value_row, state_row, grad_row, hyper):
    """Update one row in place with rule code ``rule`` (see the module docstring).

    Parameters
    ----------
    rule : int
        A ``RULE_*`` code.
    value_row : 1-D float32 or float64 array
        The embedding row, length ``dim``; the arithmetic runs in its dtype.
    state_row : 1-D float32 array
        The row's state, length ``state_dim`` (may be 0).
    grad_row : 1-D float32 or float64 array
        The row's summed (coalesced) gradient, length ``dim``.
    hyper : 1-D float64 array
        From :func:`hyper_vector`.
    """
    # np.sqrt keeps the row's dtype (math.sqrt would widen float32 to float64): the
    # arithmetic stays in float32 as torch's does, and vectorizes
    t = value_row.dtype.type
    dim = value_row.shape[0]
    if rule == RULE_SGD:                 # param.add_(grad, alpha=-lr)
        neg_lr = t(-hyper[H_LR])
        for j in range(dim):
            value_row[j] = fma(neg_lr, t(grad_row[j]), value_row[j])
    elif rule == RULE_ADAGRAD:           # torch.optim.adagrad, `grad.is_sparse` branch
        neg_clr, eps = t(-_clr(hyper)), t(hyper[H_EPS])
        for j in range(dim):
            g = t(grad_row[j])
            s = t(state_row[j]) + g * g
            state_row[j] = s
            value_row[j] = fma(neg_clr, g / (np.sqrt(s) + eps), value_row[j])
    elif rule == RULE_ROWWISE_ADAGRAD:
        neg_clr, eps, wd = t(-_clr(hyper)), t(hyper[H_EPS]), t(hyper[H_WEIGHT_DECAY])
        square_sum = 0.0                 # float64 accumulator of the row dtype's squares
        for j in range(dim):
            g = t(grad_row[j]) + wd * value_row[j]
            square_sum += g * g
        a = t(state_row[0]) + t(square_sum / dim)
        state_row[0] = a
        std = np.sqrt(a) + eps
        for j in range(dim):
            g = t(grad_row[j]) + wd * value_row[j]
            value_row[j] += neg_clr * (g / std)
    elif rule == RULE_ADAM:              # torch.optim._functional.sparse_adam
        beta1, beta2, step = hyper[H_BETA1], hyper[H_BETA2], hyper[H_STEP]
        step_size = hyper[H_LR] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
        neg_step_size, eps = t(-step_size), t(hyper[H_EPS])
        one_minus_b1, one_minus_b2 = t(1.0 - beta1), t(1.0 - beta2)
        for j in range(dim):
            g = t(grad_row[j])
            m, v = t(state_row[j]), t(state_row[dim + j])
            m = m + (g - m) * one_minus_b1
            v = v + (g * g - v) * one_minus_b2
            state_row[j], state_row[dim + j] = m, v
            value_row[j] += neg_step_size * (m / (np.sqrt(v) + eps))


def _apply_rules_for(rule):
    """The kernel below with ``rule`` fixed when it compiles (see APPLY_RULES)."""

    @kernel
    def apply_rules(values, state, grads, hyper):
        """:func:`apply_rule` on every row: ``values [n, dim]``, ``state [n, state_dim]``,
        ``grads [n, dim]`` (one row per unique id)."""
        for i in range(values.shape[0]):
            apply_rule(rule, values[i], state[i], grads[i], hyper)

    return apply_rules


#: ``apply_rules`` per rule code, each compiled with its rule as a constant: a rule chosen at
#: run time inside the row loop keeps every rule's loops and LLVM vectorizes none of them
#: (3-5x slower a row). :mod:`._update_kernels` specializes its kernel the same way.
APPLY_RULES = tuple(_apply_rules_for(rule) for rule in range(len(RULES)))


def apply(rule_name: str, values: np.ndarray, state: np.ndarray, grads: np.ndarray,
          hyper: np.ndarray) -> None:
    """Apply rule ``rule_name`` to every row of ``values`` and ``state``, in place.

    Parameters
    ----------
    rule_name : str
        One of :data:`RULES`.
    values : ndarray, float32 or float64, shape ``[n, dim]``, C-contiguous, writeable
    state : ndarray, float32, shape ``[n, state_dim(rule_name, dim)]``, C-contiguous, writeable
    grads : ndarray, float32 or float64, shape ``[n, dim]``, C-contiguous
        Each row's summed gradient: ids must be unique (sum duplicates first).
    hyper : ndarray, float64, shape ``[N_HYPER]``
        From :func:`hyper_vector` for the same rule.

    Raises
    ------
    TypeError
        For a wrong dtype or a non-array argument.
    ValueError
        For an unknown rule or a wrong shape, layout or writeability.
    """
    rule = _rule_code(rule_name)
    arrays = {"values": values, "state": state, "grads": grads, "hyper": hyper}
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(arr).__name__}")
        if not arr.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    floats = ("float32", "float64")
    for name, arr, ok in (("values", values, floats), ("state", state, ("float32",)),
                          ("grads", grads, floats), ("hyper", hyper, ("float64",))):
        if arr.dtype.name not in ok:
            raise TypeError(f"{name} must be {' or '.join(ok)}, got dtype {arr.dtype}")
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D [n, dim], got shape {values.shape}")
    n, dim = values.shape
    want = (n, state_dim(rule_name, dim))
    if state.shape != want:
        raise ValueError(f"state of rule {rule_name!r} must have shape {want} "
                         f"for values of shape {values.shape}, got {state.shape}")
    if grads.shape != values.shape:
        raise ValueError(f"grads must have the shape of values {values.shape}, got {grads.shape}")
    if hyper.shape != (N_HYPER,):
        raise ValueError(f"hyper must have shape ({N_HYPER},) (see hyper_vector), "
                         f"got {hyper.shape}")
    for name, arr in (("values", values), ("state", state)):
        if not arr.flags.writeable:
            raise ValueError(f"{name} must be writeable: the rule updates it in place")
    APPLY_RULES[rule](values, state, grads, hyper)


_TRAINABLE = (np.dtype(np.float32), np.dtype(np.float64))


def check_update(rule_name: str, hyper, dim: int, dtype, store_state_dim: int):
    """Check a store update's rule and options; returns ``(code, rule state_dim, hyper)``."""
    known = _CHECKED.get((rule_name, dim, dtype, store_state_dim))
    if known is not None and is_ready(hyper, _FLOAT64, 1) and hyper.shape[0] == N_HYPER:
        return known[0], known[1], hyper   # checked before: a training loop's every step
    code = _rule_code(rule_name)
    if np.dtype(dtype) not in _TRAINABLE:
        raise TypeError(f"update rules need a float32 or float64 store, not {np.dtype(dtype)}")
    need = state_dim(rule_name, dim)
    if store_state_dim < need:
        raise ValueError(f"rule {rule_name!r} keeps {need} state values a row; the store has "
                         f"state_dim={store_state_dim} (create it with state_dim={need})")
    hyper = np.ascontiguousarray(hyper, dtype=np.float64)
    if hyper.shape != (N_HYPER,):
        raise ValueError(f"hyper must have shape ({N_HYPER},) (see hyper_vector), "
                         f"got {hyper.shape}")
    _CHECKED[rule_name, dim, dtype, store_state_dim] = code, need
    return code, need, hyper


#: ``(rule_name, dim, dtype, store_state_dim)`` -> ``(code, rule state_dim)`` of the updates
#: checked so far
_CHECKED = {}
_FLOAT64 = np.dtype(np.float64)
