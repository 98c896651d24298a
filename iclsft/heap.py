"""Keep freed memory in the process while a model trains or scores (glibc on Linux; elsewhere nothing
changes).

Every step frees and allocates again the gradients and AdamW temporaries of every weight. glibc serves
each allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it to the
kernel at `free`, so on a CPU every step page-faults (and the kernel zeroes) its whole working set
again: for a full fine-tune of gemma3-270m kernel time was larger than user time and a step took 2.6×
as long (`benchmarks/sft_heap.py`, docs/sft.md). Scoring does the same with each packed batch's
activations (the hf engine scores inside it: docs/throughput.md). Inside `heap_kept()` allocations come
from the heap and freed memory stays there for the next step; on leaving, the defaults come back and
`malloc_trim` returns what is free. Allocation does not change arithmetic: losses, weights and scores
are bit-identical.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's defaults (mallopt(3))
DEFAULT_MMAP_MAX = 65536


@functools.cache
def _glibc():
    """The C library when it is glibc (has mallopt and malloc_trim), else None; looked up once (finding
    it runs ldconfig: ~1 ms, and the hf engine enters `heap_kept` at every score call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # musl and others: no mallopt/malloc_trim
        return None


_lock = threading.Lock()
_depth = 0  # heap_kept() calls inside each other (or at once, from threads): the policy ends with the last


@contextmanager
def heap_kept() -> Iterator[bool]:
    """Within: no mmap for large blocks, no trimming (yields whether the policy is in effect). Nested or
    concurrent uses share one policy, set by the first to enter and undone by the last to leave."""
    global _depth
    libc = _glibc()
    with _lock:
        active = libc is not None and (_depth > 0 or bool(libc.mallopt(M_MMAP_MAX, 0)
                                                          and libc.mallopt(M_TRIM_THRESHOLD, -1)))
        _depth += active
    if not active:
        yield False
        return
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
