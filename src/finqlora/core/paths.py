"""Where finqlora keeps its caches.

`FINQLORA_HOME` (default `~/.cache/finqlora`) holds converted built-in models and other
derived files that are expensive to rebuild; it is safe to delete.
"""

from __future__ import annotations

import os
from pathlib import Path


def finqlora_home() -> Path:
    root = os.environ.get("FINQLORA_HOME")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "finqlora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(name: str) -> Path:
    path = finqlora_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
