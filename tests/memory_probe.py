"""Memory probes for tests and benchmarks: process RSS, peak RSS, and page-cache residency of files.

Linux only (``/proc`` and ``mincore(2)``).

- :func:`rss_bytes` / :func:`peak_rss_bytes`: ``VmRSS`` / ``VmHWM`` from ``/proc/self/status``.
- :func:`reset_peak_rss`: write ``5`` to ``/proc/self/clear_refs`` so that ``VmHWM`` restarts from
  the current RSS (returns False where the kernel refuses).
- :func:`page_cache_bytes`: bytes of a file's pages that sit in the OS page cache, measured
  with ``mincore(2)`` on a read-only ``MAP_SHARED`` mapping of the file. Mapping a file does not
  fault any page in, so the probe does not change what it measures. (Since Linux 5.0 mincore
  reports page-cache residency of a file only to processes that own the file or may write it;
  tests own the files they create.)
- :class:`RssSampler`: a background thread sampling RSS (and optionally page-cache residency of
  some files) to catch peaks where ``VmHWM`` cannot be reset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: mincore is called over windows of this many bytes, so the result vector stays small
_WINDOW = 256 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size of this process now (``VmRSS``), in bytes."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (``VmHWM``) since start or the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Restart ``VmHWM`` from the current RSS; False if ``/proc/self/clear_refs`` refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def file_page_cache_bytes(path) -> int:
    """Bytes of ``path``'s pages resident in the OS page cache (mincore over a mapping)."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        resident = 0
        for start in range(0, size, _WINDOW):
            length = min(_WINDOW, size - start)
            addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
            if addr in (None, _MAP_FAILED):
                err = ctypes.get_errno()
                raise OSError(err, f"mmap of {path}: {os.strerror(err)}")
            try:
                n_pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
                vec = (ctypes.c_ubyte * n_pages)()
                if _libc.mincore(addr, length, vec) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mincore of {path}: {os.strerror(err)}")
                resident += _count_resident(bytes(vec))
            finally:
                _libc.munmap(addr, length)
        return resident * PAGE_SIZE
    finally:
        os.close(fd)


_LOW_BIT = bytes(b & 1 for b in range(256))


def _count_resident(vec: bytes) -> int:
    # mincore sets bit 0 of each byte for a resident page; the other bits are reserved.
    return len(vec) - vec.translate(_LOW_BIT).count(0)


def page_cache_bytes(paths) -> int:
    """Total page-cache bytes of ``paths`` (files that vanish meanwhile count as 0)."""
    total = 0
    for p in paths:
        try:
            total += file_page_cache_bytes(p)
        except FileNotFoundError:
            pass
    return total


def files_under(directory, suffix: str = "") -> list[str]:
    """Regular files directly in ``directory`` whose names end with ``suffix``."""
    out = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(suffix) and os.path.isfile(path):
            out.append(path)
    return out


class RssSampler:
    """Sample RSS (and page-cache bytes of ``files()``) every ``interval`` s on a thread.

    Use as a context manager; ``peak_rss`` and ``peak_page_cache`` hold the largest samples.
    Sampling runs while mlkv's kernels release the GIL, so it also sees mid-kernel peaks,
    up to the sampling interval.
    """

    def __init__(self, interval: float = 0.02, files=None, cache_interval: float = 0.5):
        self.interval = interval
        self.files = files
        self.cache_interval = cache_interval
        self.peak_rss = rss_bytes()
        self.peak_page_cache = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = None

    def sample_now(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_bytes())
        if self.files is not None:
            self.peak_page_cache = max(self.peak_page_cache, page_cache_bytes(self.files()))

    def _loop(self):
        next_cache = 0.0
        elapsed = 0.0
        while not self._stop.wait(self.interval):
            elapsed += self.interval
            self.peak_rss = max(self.peak_rss, rss_bytes())
            self.samples += 1
            if self.files is not None and elapsed >= next_cache:
                next_cache = elapsed + self.cache_interval
                self.peak_page_cache = max(self.peak_page_cache,
                                           page_cache_bytes(self.files()))

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample_now()
