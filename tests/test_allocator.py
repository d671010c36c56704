"""The allocator setting the CLI applies: freed memory stays in the process (glibc)."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from nbody_dt.allocator import retain_freed_memory

glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@pytest.mark.skipif(not glibc, reason="glibc only (mallinfo2)")
def test_large_tensors_come_from_the_heap_and_stay_mapped_after_free():
    assert retain_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    mapped_before = libc.mallinfo2().hblkhd
    block = torch.ones(4 << 20, dtype=torch.float64)  # 32 MiB: above glibc's default thresholds
    assert libc.mallinfo2().hblkhd == mapped_before  # not a fresh mmap
    heap = libc.mallinfo2().arena
    del block
    assert libc.mallinfo2().arena == heap  # the heap was not trimmed: the pages stay faulted in
