"""Atomic file writes, the one JSONL reader, and content fingerprints.

Every file finqlora produces is written to a temporary file in the same folder, flushed,
fsynced and renamed over the target, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.safe_input import InputError, json_loads


def umask_mode(path: str | os.PathLike[str]) -> None:
    """Give a file made by mkstemp (owner-only) the mode a plain open() would have given it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


# Errors of writing that the user fixes (permissions, a read-only mount, a full disk, a file
# where a folder should be), as opposed to bugs.
WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR})


def write_error(exc: OSError, path: str | os.PathLike[str] | None) -> FinqloraError:
    """A FinqloraError for an OSError of writing `path`, naming the folder and what to do."""
    target = Path(path) if path else None
    where = str(target) if target else "the output"
    folder = str(target.parent) if target else "the output folder"
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FinqloraError(f"cannot write {where}: the disk is full ({reason})",
                             hint=f"free some disk space where {folder} lies, or write to another folder, and run this again")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return FinqloraError(f"cannot write {where}: {reason} (a file stands where a folder is needed, or the other way round)",
                             hint="choose another output path, or move that file away")
    return FinqloraError(f"cannot write {where}: {reason} (the folder {folder} is not writable)",
                         hint="choose an output folder you can write to, or fix its permissions (or the read-only mount)")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise write_error(exc, target) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask_mode(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(exc, target) from exc
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterable[Any]) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return atomic_write_text(path, text)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def iter_jsonl(
    path: str | os.PathLike[str],
    *,
    what: str = "file",
    hint: str = "each line must be one JSON object (JSONL); fix or delete that line",
    torn_tail: bool = False,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file.

    A line that is not a JSON object raises FinqloraError naming the file and the line. With
    `torn_tail` (append-only caches), an unreadable *last* line is an interrupted write and is
    skipped; anywhere else it is still an error.
    """
    file = Path(path)
    if not file.is_file():
        raise FinqloraError(f"{what} not found: {file}", hint=f"check the path of the {what}")
    # Bytes, decoded a line at a time: a torn last line may end inside a multi-byte character.
    with file.open("rb") as handle:
        lines = list(enumerate(handle, start=1)) if torn_tail else enumerate(handle, start=1)
        last = lines[-1][0] if torn_tail and lines else None
        for number, raw in lines:
            if not raw.strip():
                continue
            try:
                row = json_loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                if number == last:
                    return
                raise FinqloraError(f"{file}:{number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", hint=hint) from None
            except InputError as exc:
                if number == last:
                    return
                raise FinqloraError(f"{file}:{number}: not valid JSON ({exc})", hint=hint) from None
            if not isinstance(row, dict):
                if number == last:
                    return
                raise FinqloraError(f"{file}:{number}: expected a JSON object, got {type(row).__name__}", hint=hint)
            yield number, row


def read_jsonl(path: str | os.PathLike[str], **options: Any) -> list[dict[str, Any]]:
    """All objects of a JSONL file (see `iter_jsonl` for the options and the errors)."""
    return [row for _number, row in iter_jsonl(path, **options)]


def load_datasets_folder(path: Path, option: str) -> Any:
    """A Hugging Face `datasets` folder written by `save_to_disk`: a Dataset, or a DatasetDict
    (a dict of splits). `option` names the flag that took the path, for the hint."""
    try:
        import datasets
    except ImportError as exc:
        raise FinqloraError(
            f"{path}: reading a Hugging Face datasets folder needs the datasets package, which is not installed",
            hint='pip install "finqlora[cfbenchmark]" (or pip install datasets)',
        ) from exc
    if not path.is_dir():
        raise FinqloraError(f"{path}: a CFBenchmark set is a Hugging Face datasets folder (written by save_to_disk)",
                            hint=f"pass {option} the folder, not a file")
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise FinqloraError(f"{path}: not a Hugging Face datasets folder ({exc})",
                            hint=f"point {option} at the folder that holds dataset_info.json/state.json (or dataset_dict.json)") from exc
