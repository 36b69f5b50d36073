"""Shared test fixtures.

Tests that need the third-party data in ../shared/data use the `shared_data` fixture, which
skips with a reason when the folder is absent (a user's fresh clone).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FINQLORA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"third-party data not found at {SHARED_DATA} (set FINQLORA_SHARED_DATA to use it)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _offline() -> None:
    """The Hugging Face hub is never reachable in tests: fail fast instead of retrying."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
