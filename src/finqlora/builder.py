"""Compatibility alias: `finqlora.builder` is `finqlora.dataset.builder` (see docs/architecture.md)."""

import sys

from finqlora.dataset import builder as _module

sys.modules[__name__] = _module
