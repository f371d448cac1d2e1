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


# ---- what kernels on two threads synchronise with (see mlkv.engine.helper) -------------------
def _int64_vector(array) -> bool:
    return isinstance(array, _types.Array) and array.dtype == _types.int64 and array.ndim == 1


def _element_pointer(context, builder, signature, args):
    array_type = signature.args[0]
    ary = context.make_array(array_type)(context, builder, args[0])
    index = context.cast(builder, args[1], signature.args[1], _types.intp)
    return _cgutils.get_item_pointer(context, builder, array_type, ary, [index],
                                     wraparound=False)


@_intrinsic
def load_acquire(typingctx, array, index):
    """``array[index]`` of an int64 vector, read atomically with acquire ordering: what another
    thread wrote before its :func:`store_release` of this value is visible after it. (A plain
    read in a loop may be read once and kept in a register: the loop would never see a change.)
    """
    if not _int64_vector(array):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element_pointer(context, builder, signature, args),
                                   "acquire", 8)

    return _types.int64(array, index), codegen


@_intrinsic
def store_release(typingctx, array, index, value):
    """``array[index] = value`` of an int64 vector, written atomically with release ordering
    (see :func:`load_acquire`)."""
    if not _int64_vector(array):
        return None

    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[2], signature.args[2], _types.int64)
        builder.store_atomic(value, _element_pointer(context, builder, signature, args),
                             "release", 8)
        return context.get_dummy_value()

    return _types.void(array, index, value), codegen


@_intrinsic
def compare_exchange(typingctx, array, index, expected, new):
    """Atomically: if ``array[index] == expected``, set it to ``new`` and return True; else
    return False (int64 vector; acquire-release ordering)."""
    if not _int64_vector(array):
        return None

    def codegen(context, builder, signature, args):
        i64 = _types.int64
        old = context.cast(builder, args[2], signature.args[2], i64)
        new = context.cast(builder, args[3], signature.args[3], i64)
        pair = builder.cmpxchg(_element_pointer(context, builder, signature, args), old, new,
                               "acq_rel", "acquire")
        return builder.extract_value(pair, 1)

    return _types.boolean(array, index, expected, new), codegen


_MACHINE = __import__("platform").machine().lower()


@_intrinsic
def spin_pause(typingctx):
    """Tell the CPU this thread is spinning (x86 ``pause``, arm ``yield``; nothing elsewhere):
    it saves power and lets a sibling hyper-thread run."""

    def codegen(context, builder, signature, args):
        void = _ir.FunctionType(_ir.VoidType(), [])
        if _MACHINE in ("x86_64", "amd64", "i686", "x86"):
            builder.call(builder.module.declare_intrinsic("llvm.x86.sse2.pause", [], void), [])
        elif _MACHINE in ("aarch64", "arm64"):
            i32 = _ir.IntType(32)
            hint = builder.module.declare_intrinsic(
                "llvm.aarch64.hint", [], _ir.FunctionType(_ir.VoidType(), [i32]))
            builder.call(hint, [_ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return _types.void(), codegen


@_intrinsic
def pointer_to(typingctx, address, like):
    """The int ``address`` as a pointer to ``like``'s dtype, for ``numba.carray``: how a thread
    that was handed another thread's arrays as addresses sees them."""
    if not isinstance(like, _types.Array):
        return None
    pointer = _types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        address = context.cast(builder, args[0], signature.args[0], _types.int64)
        return builder.inttoptr(address, context.get_value_type(pointer))

    return pointer(address, like), codegen
