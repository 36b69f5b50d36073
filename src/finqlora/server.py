"""Compatibility alias: `finqlora.server` is `finqlora.serve.server` (see docs/architecture.md)."""

import sys

from finqlora.serve import server as _module

sys.modules[__name__] = _module
