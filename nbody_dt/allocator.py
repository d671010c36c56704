"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

glibc's malloc serves large blocks (above 128 KiB, a threshold it raises adaptively) straight
from mmap and returns them to the kernel on free, and trims the heap's top when it grows. A
training or simulation step allocates and frees the same megabyte-sized tensors every call, so
every call page-faults them in again: at N = 256 the error series spent about half its time in
those faults (benchmarks/README.md, "Where a learned step's time goes"). Serving
them from a heap that is never trimmed makes the memory stay mapped between calls; the price is
that the process keeps its peak footprint. PyTorch's own CPU tuning advice (jemalloc, tcmalloc)
addresses the same cost; this needs no preloaded library.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGE = 1 << 30


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB (or the largest it accepts); False where the
    C library is not glibc (macOS, musl), which is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # older glibc refuses mmap thresholds above 32 MiB (HEAP_MAX_SIZE / 2)
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, _LARGE) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(mmap_ok and mallopt(_M_TRIM_THRESHOLD, _LARGE))
