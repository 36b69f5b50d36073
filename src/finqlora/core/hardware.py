"""What the machine can do, read from the OS (no torch import): used by training, evaluation and the pipeline."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow.

    Measured on a 2-core Xeon with AMX: a bf16 matmul ran 3.8x faster than fp32 (docs/performance.md).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read(200_000)
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next stage starts small.

    A model freed by Python stays in glibc's heap (resident) until `malloc_trim` returns it;
    without this, `finqlora run` would carry the evaluation's memory into training. A no-op
    where the C library has no malloc_trim (macOS, Windows, musl).
    """
    import gc

    gc.collect()
    trim_heap()


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no glibc: musl, macOS, Windows
        return None
    if trim is not None:
        trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return trim


def trim_heap() -> bool:
    """`malloc_trim(0)`: give every whole free page of glibc's heaps back to the OS (madvise).

    Why after every CPU training step: activations of a different size at each step (packed
    micro-batches vary in length) fragment the heap, and resident memory grows with the steps:
    the demo's 30 steps (Qwen 0.5B) went from 3.8 to 6.4 GB. Fixing glibc's mmap threshold
    instead (MALLOC_MMAP_THRESHOLD_=131072) also bounds it, but maps and zeroes every large
    temporary afresh: training fell from 141.6 to 74.6 tokens/s here (docs/benchmarks.md). False where there is no glibc.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
