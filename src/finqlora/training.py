"""Compatibility alias: `finqlora.training` is `finqlora.train.training` (see docs/architecture.md)."""

import sys

from finqlora.train import training as _module

sys.modules[__name__] = _module
