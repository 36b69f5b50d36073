"""Names of the speed profiles (`train.profile`), known below the training stage.

The profiles themselves live in `finqlora.train.speedups.PROFILES`, which probes the hardware
when imported; the config is checked at load, before any stage runs, so it needs the names
without the training stack. tests/test_config.py checks that the two lists are the same.
"""

from __future__ import annotations

PROFILE_NAMES: tuple[str, ...] = (
    "default", "t4", "fast", "fast-bf16", "fused", "t4-fused", "cpu", "compiled", "fast-compiled", "t4-compiled",
)
