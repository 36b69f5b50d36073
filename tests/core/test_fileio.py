"""Atomic writes: whole files or nothing, with the mode a plain open() gives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finqlora.core.fileio import atomic_write_json, atomic_write_text, sha256_file


def test_written_files_get_the_usual_mode(tmp_path: Path) -> None:
    """Atomic writes go through mkstemp (owner-only); the result must be readable like open()'s."""
    from finqlora.core.fileio import atomic_write_text

    mask = os.umask(0o022)
    try:
        written = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
    assert written.stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_sha256_file(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "x.txt", "abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
