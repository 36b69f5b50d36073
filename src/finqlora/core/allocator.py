"""Hand freed tensor memory back to the operating system (glibc's malloc on Linux).

Why: on the CPU, training allocates activations of a different size at every step (packed
micro-batches vary in length). glibc serves blocks below its *dynamic* mmap threshold (which
rises to 32 MB after the first large free) from its heaps, where freed blocks of varying size
fragment and are not returned: measured on the demo (Qwen 0.5B, 30 CPU steps), resident memory
grew from 3.8 to 6.4 GB. With a fixed 128 KiB mmap threshold every larger block is its own
mapping, given back when freed: the same run peaked at 3.4 GB, and was not slower
(docs/benchmarks.md, "Memory of CPU training"). Equivalent to starting the process with
MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD_BYTES))
