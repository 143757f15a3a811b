"""Handing freed memory back to the operating system once a job or a network is done.

glibc keeps freed blocks in its heaps for reuse: once a large block has been freed, its
dynamic mmap threshold rises (up to 32 MB), so later numpy and framework buffers of that size
come from the heap, and the heap is only returned to the system by `malloc_trim` (measured on
the tiny model: 540 MB resident after a 60 s job with every network dropped, 141 MB after a
trim). Elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading

# glibc's mallopt parameters and their defaults (malloc/malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_DEFAULT, _MMAP_MAX_DEFAULT = 128 * 1024, 65536
_heap_lock = threading.Lock()
_heap_depth = 0


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


def trim() -> bool:
    """Return free heap memory to the OS (glibc's malloc_trim); True if it could be asked."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def large_buffers_on_heap():
    """For the block, serve even large allocations from glibc's heap and keep freed ones
    there; afterwards restore the defaults and trim. glibc otherwise maps each buffer over
    32 MB afresh and unmaps it when freed, so a decoder's windows fault in their pages again
    and again; its heap, unlike a framework's exact-size buffer cache, reuses freed memory for
    any size. Process-wide (nesting and threads counted); elsewhere (macOS, musl) a no-op."""
    global _heap_depth
    libc = _libc()
    if libc is None:
        yield
        return
    with _heap_lock:
        if _heap_depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # an int: never trim
        _heap_depth += 1
    try:
        yield
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
                libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_DEFAULT)
                libc.malloc_trim(0)


def rss_bytes() -> int:
    """Resident memory of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
