"""What the machine can do, read from the OS (no torch import): used by training, evaluation and the pipeline."""

from __future__ import annotations


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
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
