"""One writer per run folder: an exclusive lock held while a command writes into it.

Two runs on one folder would both build, both train and append to the same
`training_log.jsonl`. Every command that writes into a run folder takes this lock: `finqlora
run` for the whole run, `finqlora train` for its output folder, and `eval`, `report`, `export
zip` and `build` when they write inside a run folder (`lock_enclosing_run`). The lock is an
OS file lock (`filelock`, fcntl/msvcrt): the operating system releases it when its process
ends, however it ends, so the lock of a crashed or killed run is simply taken by the next one
(no pid guessing, no stale-file cleanup). Within one process the lock is reentrant (`finqlora
run` holds it while its train stage calls `train()`, which takes it too).

Who holds it is written next to it, in `run.lock.json` (pid, host, start time, command),
because the lock file itself is truncated by every attempt to take it.

It lives in `core` so that every stage (dataset, train, evaluate, report, export) can take it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import FileLock, Timeout

from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json

LOCK_FILE = "run.lock"
HOLDER_FILE = "run.lock.json"


def _describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not written its details yet)"
    command = holder.get("command") or "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started_at', '?')} ({command})"


def read_holder(root: Path) -> dict[str, Any] | None:
    """The details the current (or last) holder wrote, or None."""
    try:
        value = json.loads((root / HOLDER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class RunFolderLock:
    """`with RunFolderLock(root):` -- FinqloraError naming the holder if another run has it."""

    def __init__(self, root: Path, *, command: str | None = None) -> None:
        self.root = Path(root)
        self.command = command if command is not None else " ".join(["finqlora", *sys.argv[1:]])
        # One lock object per lock file in this process (filelock's singleton, filelock >= 3.13.1),
        # so taking it again from the same process nests instead of refusing itself.
        self._lock = FileLock(str((self.root / LOCK_FILE).resolve()), timeout=0, thread_local=False, is_singleton=True)

    def acquire(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        nested = self._lock.is_locked
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            holder = read_holder(self.root)
            pid = holder.get("pid") if holder else None
            raise FinqloraError(
                f"run folder {self.root} is in use by {_describe_holder(holder)}",
                hint="wait for that run to finish (its progress is in this folder's pipeline_state.json), "
                f"or stop it{f' (kill {pid})' if pid else ''} and run again: it resumes where the other one stopped; "
                "to run both at once, give this one another folder (--set train.output_dir=runs/OTHER)",
            ) from None
        if nested:
            return  # this process already holds it and wrote its details
        atomic_write_json(
            self.root / HOLDER_FILE,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": self.command,
            },
        )

    def release(self) -> None:
        # The holder file stays (it names the last run); only the lock is given back.
        self._lock.release()

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def enclosing_run_folder(path: Path) -> Path | None:
    """The run folder `path` is in (or is): the nearest folder, from `path` up, with a run lock file."""
    for folder in (Path(path).resolve(), *Path(path).resolve().parents):
        if (folder / LOCK_FILE).is_file():
            return folder
    return None


def lock_enclosing_run(path: Path) -> contextlib.AbstractContextManager[Any]:
    """`with lock_enclosing_run(out):` -- the run lock of the run folder `out` lies in, if any.

    For the commands that write into a folder a run may own (`eval --output runs/X/eval`,
    `report`, `export zip`, `build -o`): inside a run folder they wait for no one and refuse
    while a run holds it; elsewhere there is no run to collide with and nothing is locked.
    """
    folder = enclosing_run_folder(path)
    return RunFolderLock(folder) if folder is not None else contextlib.nullcontext()
