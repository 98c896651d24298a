"""`heap_kept`: large allocations come from the heap and stay there for the next one (glibc's own
accounting, mallinfo2, is the reference), the default comes back on leaving (the last of nested uses
leaving), and a non-glibc C library is left alone."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from iclsft import heap
from iclsft.heap import heap_kept

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@pytest.fixture
def mallinfo():
    if heap._glibc() is None:
        pytest.skip("not glibc")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2


def test_a_large_block_is_mmapped_by_default_and_heap_allocated_inside(mallinfo):
    # In a fresh process: in this one, earlier tests may have left a free heap region that glibc
    # reuses for a large block before it would mmap one, so "the default" would not be observable.
    subprocess.run([sys.executable, "-c", _CHECK], check=True, timeout=120)


_CHECK = f"""
import ctypes, ctypes.util
import numpy as np
from iclsft.heap import heap_kept
BLOCK = {BLOCK}
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in {[name for name, _ in MallInfo2._fields_]!r}]
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = MallInfo2
mallinfo = libc.mallinfo2
before = mallinfo().hblkhd
block = np.ones(BLOCK, dtype=np.uint8)
assert mallinfo().hblkhd - before >= BLOCK, "the default: its own mapping"
del block
with heap_kept() as active:
    assert active
    mapped, used = mallinfo().hblkhd, mallinfo().uordblks
    block = np.ones(BLOCK, dtype=np.uint8)
    assert mallinfo().hblkhd - mapped < BLOCK and mallinfo().uordblks - used >= BLOCK
    del block
    assert mallinfo().fordblks >= BLOCK, "freed, and kept for the next allocation"
    used = mallinfo().uordblks
    again = np.ones(BLOCK, dtype=np.uint8)
    assert mallinfo().uordblks - used >= BLOCK and mallinfo().hblkhd - mapped < BLOCK
    del again
before = mallinfo().hblkhd
block = np.ones(BLOCK, dtype=np.uint8)
assert mallinfo().hblkhd - before >= BLOCK, "and the default policy is back"
del block
with heap_kept():
    with heap_kept() as inner:  # nested (a score inside a training, or two engines' threads at once)
        assert inner
    mapped = mallinfo().hblkhd
    block = np.ones(BLOCK, dtype=np.uint8)
    assert mallinfo().hblkhd - mapped < BLOCK, "the inner one leaving does not end the outer one's policy"
    del block
before = mallinfo().hblkhd
block = np.ones(BLOCK, dtype=np.uint8)
assert mallinfo().hblkhd - before >= BLOCK, "the outer one leaving does"
"""


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    with heap_kept() as active:
        assert active is False
