"""trim_heap (core/hardware.py): freed memory in a fragmented glibc heap leaves the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finqlora.core.hardware import trim_heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")

# Blocks of varying size below glibc's dynamic mmap threshold (raised to 30 MB by the first large
# free), every other one freed: holes inside the heap that glibc keeps unless trimmed.
SCRIPT = r"""
import sys
import numpy as np
from finqlora.core.hardware import trim_heap
def rss_mb():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
warm = np.ones(30 * 2**20 // 8); del warm
blocks = [np.ones((2 + i % 7) * 2**20 // 8) for i in range(200)]   # ~1 GB in 2-8 MB blocks
before = rss_mb()
del blocks[::2]
if sys.argv[1] == 'trim':
    assert trim_heap()
print(round(before - rss_mb()))
"""


def test_trimming_returns_the_holes_of_a_fragmented_heap() -> None:
    freed = {}
    for mode in ("keep", "trim"):
        done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        freed[mode] = int(done.stdout.strip())
    assert freed["trim"] > 400, freed            # about half of the ~1 GB leaves the process
    assert freed["keep"] < freed["trim"] / 2, freed  # without the trim glibc keeps it


def test_training_trims_after_every_step_and_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training callback calls the trim at both events (the benchmark measures its effect)."""
    from finqlora.train import callbacks

    calls: list[str] = []
    monkeypatch.setattr(callbacks, "trim_heap", lambda: calls.append("trim") or True)
    callback = callbacks.ReleaseFreedMemory()
    callback.on_step_end(None, None, None)
    callback.on_evaluate(None, None, None)
    assert calls == ["trim", "trim"]
    assert trim_heap() is True
