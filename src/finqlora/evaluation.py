"""Compatibility alias: `finqlora.evaluation` is `finqlora.evaluate.evaluation` (see docs/architecture.md)."""

import sys

from finqlora.evaluate import evaluation as _module

sys.modules[__name__] = _module
