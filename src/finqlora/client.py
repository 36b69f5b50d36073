"""Compatibility alias: `finqlora.client` is `finqlora.models.client` (see docs/architecture.md)."""

import sys

from finqlora.models import client as _module

sys.modules[__name__] = _module
