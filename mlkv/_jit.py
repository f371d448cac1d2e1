"""The one place that configures Numba for mlkv.

Every kernel module imports :data:`kernel` from here, so the Numba cache directory is set
before the first ``@kernel`` decorator runs. A read-only site-packages (a system install, a
container image) cannot hold Numba's cache beside the sources, so kernels are cached in a
per-user directory instead:

1. ``NUMBA_CACHE_DIR`` if the user set it (Numba's own setting wins);
2. else ``MLKV_CACHE_DIR`` if set;
3. else ``$XDG_CACHE_HOME/mlkv/numba`` (``~/.cache/mlkv/numba``);
4. else, when that is not writable, a directory under the system temp dir.
"""

from __future__ import annotations

import functools
import os
import tempfile


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-")
        probe.close()
        return True
    except OSError:
        return False


def numba_cache_dir() -> str:
    """The directory Numba caches mlkv's compiled kernels in (see module docstring)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    candidates = []
    if os.environ.get("MLKV_CACHE_DIR"):
        candidates.append(os.environ["MLKV_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates.append(os.path.join(xdg, "mlkv", "numba"))
    candidates.append(os.path.join(tempfile.gettempdir(), f"mlkv-numba-{os.getuid()}"))
    for path in candidates:
        if _writable_dir(path):
            return path
    return candidates[-1]


_CACHE_DIR = numba_cache_dir()
os.environ.setdefault("NUMBA_CACHE_DIR", _CACHE_DIR)

import numba  # noqa: E402  (must follow the environment set-up above)

# Numba may have been imported by the user before mlkv: its config is read at import, so set
# it directly too. Dispatchers read it when they are decorated, which happens after this line.
numba.config.CACHE_DIR = _CACHE_DIR

#: The decorator every mlkv kernel uses: compiled once, cached on disk, releasing the GIL so
#: Python threads can run kernels side by side (``parallel=True`` is avoided on purpose: its
#: OpenMP layer crashes forked DataLoader workers).
kernel = functools.partial(numba.njit, cache=True, nogil=True, error_model="numpy")

#: The decorator of small helpers called per row inside kernels: inlined at Numba's level, so
#: a call costs no argument boxing and no reference counting of the arrays it is handed.
inline_kernel = functools.partial(kernel, inline="always")


from llvmlite import ir as _ir  # noqa: E402
from numba import types as _types  # noqa: E402
from numba.core import cgutils as _cgutils  # noqa: E402
from numba.extending import intrinsic as _intrinsic  # noqa: E402


def _prefetch_codegen(for_write: int):
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        index = context.cast(builder, args[1], signature.args[1], _types.intp)
        if array_type.ndim == 1:      # any layout: follows the stride
            ptr = _cgutils.get_item_pointer(context, builder, array_type, ary, [index],
                                            wraparound=False)
        else:                         # a flat index into C-contiguous data
            ptr = builder.gep(ary.data, [index])
        ptr = builder.bitcast(ptr, _ir.PointerType(_ir.IntType(8)))
        i32 = _ir.IntType(32)
        fn = _cgutils.get_or_insert_function(
            builder.module, _ir.FunctionType(_ir.VoidType(), [ptr.type, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        # (read or write, high temporal locality, data cache)
        builder.call(fn, [ptr, _ir.Constant(i32, for_write), _ir.Constant(i32, 3),
                          _ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return codegen


@_intrinsic
def prefetch(typingctx, array, index):
    """``prefetch(array, i)``: ask the CPU to bring the cache line of element ``i`` in.

    ``i`` indexes a 1-D array of any layout, or the flat data of a C-contiguous one.

    A hint with no effect on results. Kernels that visit rows at random addresses prefetch a
    few iterations ahead, so several cache misses are in flight instead of one (the index and
    the buffer pool are far larger than the CPU caches).
    """
    return _types.void(array, index), _prefetch_codegen(0)


@_intrinsic
def prefetch_for_write(typingctx, array, index):
    """As :func:`prefetch`, for a line about to be written (fetched in exclusive state)."""
    return _types.void(array, index), _prefetch_codegen(1)


@_intrinsic
def fma(typingctx, a, b, c):
    """``fma(a, b, c)``: ``a * b + c`` rounded once (a fused multiply-add), for floats of one type.

    torch's CPU kernels compute ``x.add_(y, alpha=a)`` as ``fma(a, y, x)``; the update rules
    use this where torch does, so a row gets torch's numbers to the bit, not to an ulp per step.
    """
    if not (isinstance(a, _types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], _ir.FunctionType(ty, [ty] * 3))
        return builder.call(fn, args)

    return a(a, b, c), codegen
