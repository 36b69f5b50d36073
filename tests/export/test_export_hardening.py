"""Hostile adapter zips (issue 18 items 1, 2 and the export part of 6): refused fast and clearly.

Every zip here is built in the test from our own bytes; none takes more than a few MB.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from finqlora.cli import main
from finqlora.core.errors import FinqloraError
from finqlora.export import adapter
from finqlora.export.adapter import CHECKSUMS_NAME, ZipLimits, unpack_adapter, verify_adapter_zip

WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "  # a tiny (empty) safetensors file
CONFIG = b'{"peft_type": "LORA", "r": 4}'


def _sums(files: dict[str, bytes]) -> bytes:
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items()).encode()


def _write_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return path


def _adapter_files(**extra: bytes) -> dict[str, bytes]:
    return {"adapter_model.safetensors": WEIGHTS, "adapter_config.json": CONFIG, **extra}


def _good_zip(path: Path, **extra: bytes) -> Path:
    files = _adapter_files(**extra)
    return _write_zip(path, [*files.items(), (CHECKSUMS_NAME, _sums(files))])


@dataclass
class CliResult:
    exit_code: int
    output: str  # stdout + stderr, rich's line wrapping undone


@pytest.fixture
def unzip_cli(capsys):
    """Run `finqlora export unzip ARGS` through the real entry point (error: + hint:, exit 2)."""

    def run(*args: str) -> CliResult:
        with pytest.raises(SystemExit) as exited:
            main(["export", "unzip", *args])
        captured = capsys.readouterr()
        return CliResult(int(exited.value.code or 0), " ".join((captured.out + captured.err).split()))

    return run


def test_a_well_formed_zip_still_unpacks(tmp_path):
    folder = unpack_adapter(_good_zip(tmp_path / "ok.zip", **{"notes/readme.txt": b"hello"}), tmp_path / "out")
    assert (folder / "notes" / "readme.txt").read_bytes() == b"hello"
    assert (folder / CHECKSUMS_NAME).is_file()


# --- item 1: an oversized SHA256SUMS ------------------------------------------------------


@pytest.mark.timeout(60)
def test_item1_huge_one_line_checksums_is_refused_without_reading_it(tmp_path, unzip_cli):
    path = tmp_path / "hang.zip"
    files = _adapter_files()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        # One 32 MB line (the was 256 MB: the same attack, smaller): ~32 KB compressed.
        with archive.open(CHECKSUMS_NAME, "w") as handle:
            chunk = b"f" * (1 << 20)
            for _ in range(32):
                handle.write(chunk)
    assert path.stat().st_size < 100_000
    with pytest.raises(FinqloraError) as caught:
        verify_adapter_zip(path)
    assert "SHA256SUMS is larger than" in str(caught.value)
    assert len(str(caught.value)) < 400
    result = unzip_cli(str(path), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "hint:" in result.output and len(result.output) < 1500
    assert not (tmp_path / "out").exists()


def test_item1_a_bad_checksum_line_is_quoted_short(tmp_path):
    files = _adapter_files()
    bad_line = "g" * 64 + "  " + "x" * 50_000
    path = _write_zip(tmp_path / "bad.zip", [*files.items(), (CHECKSUMS_NAME, (bad_line + "\n").encode())])
    with pytest.raises(FinqloraError) as caught:
        verify_adapter_zip(path)
    message = str(caught.value)
    assert "line 1 of SHA256SUMS" in message and "characters)" in message and len(message) < 400


# --- item 2: unpacking limits -------------------------------------------------------------


def test_item2_a_zip_bomb_with_correct_checksums_is_refused_from_its_directory(tmp_path, unzip_cli):
    bomb = bytes(64 << 20)  # 64 MiB of zeros deflate to ~64 KB: ratio ~1000
    path = _good_zip(tmp_path / "bomb.zip", **{"training_log.jsonl": bomb})
    assert path.stat().st_size < 1_000_000
    with pytest.raises(FinqloraError) as caught:
        unpack_adapter(path, tmp_path / "out")
    assert "training_log.jsonl" in str(caught.value) and "--max-ratio" in caught.value.hint
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.zip"]  # no staging folder left behind
    result = unzip_cli(str(path), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "training_log.jsonl" in result.output
    # The user can raise the limit for a zip they trust.
    result = unzip_cli(str(path), "--output", str(tmp_path / "out"), "--max-ratio", "5000")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "training_log.jsonl").stat().st_size == 64 << 20


def test_item2_the_total_size_limit_names_the_entry_and_can_be_raised(tmp_path, unzip_cli):
    path = _good_zip(tmp_path / "big.zip", **{"a.bin": os.urandom(3 << 20), "b.bin": os.urandom(3 << 20)})
    small = ZipLimits(max_unpacked_bytes=4 << 20)
    with pytest.raises(FinqloraError) as caught:
        verify_adapter_zip(path, limits=small)
    assert "b.bin" in str(caught.value) and "--max-size-gb" in caught.value.hint
    result = unzip_cli(str(path), "--check", "--max-size-gb", "0.004")
    assert result.exit_code == 2 and "unpacks to more than" in result.output
    assert unzip_cli(str(path), "--check", "--max-size-gb", "1").exit_code == 0


def test_item2_extraction_counts_what_it_writes_not_what_the_directory_said(tmp_path):
    # The zip changes between verification and extraction (or the directory check was
    # passed): the extraction itself stops at the limit instead of filling the disk.
    path = _good_zip(tmp_path / "late.zip", **{"training_log.jsonl": bytes(16 << 20)})
    expected = verify_adapter_zip(path, limits=ZipLimits(max_ratio=1e6))
    destination = tmp_path / "dest"
    with pytest.raises(FinqloraError) as caught:
        adapter._extract_verified(path, destination, expected, ZipLimits(max_unpacked_bytes=8 << 20, max_ratio=1e6))
    assert "unpacking passed" in str(caught.value) and "training_log.jsonl" in str(caught.value)
    written = sum(p.stat().st_size for p in destination.rglob("*") if p.is_file())
    assert written <= 9 << 20


def test_item2_a_damaged_entry_is_a_clear_error(tmp_path):
    path = _good_zip(tmp_path / "crc.zip", **{"notes.txt": b"some text " * 100})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("notes.txt")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 5] ^= 0xFF  # corrupt the deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(FinqloraError) as caught:
        verify_adapter_zip(path)
    assert "notes.txt" in str(caught.value)


# --- item 6 (export): entries that cannot all be plain files ------------------------------


def _symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize(
    ("case", "needle"),
    [("file_then_child", "needs 'x' to be a folder"), ("symlink_then_child", "is a symbolic link"), ("twice", "appears twice")],
)
def test_item6_export_conflicting_entries_exit_2_and_write_nothing(tmp_path, case, needle, unzip_cli):
    outside = tmp_path / "outside"
    outside.mkdir()
    if case == "file_then_child":
        extra = [("x", b"a file"), ("x/y", b"a file inside it")]
    elif case == "symlink_then_child":
        extra = [_symlink_entry("link", str(outside)), ("link/file", b"written through the link?")]
    else:
        extra = [("x", b"one"), ("x", b"two")]
    files = _adapter_files()
    entries = [*files.items(), *extra]
    sums = _sums(files) + b"".join(
        f"{hashlib.sha256(data).hexdigest()}  {getattr(info, 'filename', info)}\n".encode() for info, data in extra[:1]
    )
    with pytest.warns(UserWarning) if case == "twice" else contextlib.nullcontext():
        path = _write_zip(tmp_path / f"{case}.zip", [*entries, (CHECKSUMS_NAME, sums)])
    result = unzip_cli(str(path), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert needle in result.output and "hint:" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["outside", path.name])
