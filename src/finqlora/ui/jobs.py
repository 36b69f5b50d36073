"""Starting `finqlora run` from the browser, as a child process the page can watch.

The job is the real command (`python -m finqlora run --config FILE`), so it behaves exactly
like the terminal one: its stages skip and resume the same way, and it keeps running if the
page is closed. Its output goes to `ui-run.log` in the run folder; the page reads progress
from the run folder's files (see `finqlora.ui.runs`), not from the log.

A job may only start from a config the app offers (the YAML files in ./configs and the
`run_config.yaml` of each known run), never from a path typed into the page.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from finqlora.core.config import load_config
from finqlora.core.errors import FinqloraError

LOG_NAME = "ui-run.log"


@dataclass
class Job:
    id: int
    config: str
    run_name: str
    run_dir: Path
    process: subprocess.Popen[bytes]
    log_handle: IO[bytes]
    started: float = field(default_factory=time.time)

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def to_dict(self) -> dict[str, Any]:
        code = self.returncode
        return {
            "id": self.id, "config": self.config, "run": self.run_name, "pid": self.process.pid,
            "started": self.started, "status": "running" if code is None else ("done" if code == 0 else f"failed ({code})"),
            "returncode": code, "log_tail": tail(self.run_dir / LOG_NAME),
        }


def tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class JobManager:
    """The `finqlora run` processes started from this app (one per run folder at a time)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.jobs: list[Job] = []
        self._lock = threading.Lock()

    def configs(self, run_dirs: dict[str, Path]) -> list[str]:
        """The config files a job may start from, as the page shows them."""
        found = sorted(str(p.relative_to(self.workdir)) for p in (self.workdir / "configs").glob("*.yaml"))
        for run_dir in run_dirs.values():
            candidate = run_dir / "run_config.yaml"
            if candidate.is_file():
                try:
                    found.append(str(candidate.resolve().relative_to(self.workdir.resolve())))
                except ValueError:
                    found.append(str(candidate.resolve()))
        return found

    def start(self, config: str, run_dirs: dict[str, Path]) -> Job:
        if config not in self.configs(run_dirs):
            raise FinqloraError(f"config {config!r} is not one the app offers", hint="pick a config from the list on the Runs page")
        path = (self.workdir / config).resolve()
        resolved = load_config(path)  # a broken config fails here, with its own message
        run_dir = Path(resolved.train.output_dir)
        run_dir = run_dir if run_dir.is_absolute() else (self.workdir / run_dir)
        # The app knows a run by its folder's name: a config whose folder has the name of
        # another known run would replace that run on the pages.
        known = run_dirs.get(run_dir.name)
        if known is not None and known.resolve() != run_dir.resolve():
            raise FinqloraError(
                f"config {config!r} writes its run to {run_dir}, but the app already shows another run named {run_dir.name!r} ({known})",
                hint="set the config's name or train.output_dir so that its run folder has a name of its own",
            )
        with self._lock:
            for job in self.jobs:
                if job.run_dir.resolve() == run_dir.resolve() and job.returncode is None:
                    raise FinqloraError(f"run {run_dir.name!r} is already running (job {job.id})", hint="wait for it to finish")
            run_dir.mkdir(parents=True, exist_ok=True)
            log_handle = (run_dir / LOG_NAME).open("ab")
            process = subprocess.Popen(
                [sys.executable, "-m", "finqlora", "run", "--config", str(path)],
                cwd=self.workdir, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            job = Job(len(self.jobs) + 1, config, run_dir.name, run_dir, process, log_handle)
            self.jobs.append(job)
        return job

    def for_run(self, run_dir: Path) -> Job | None:
        matching = [job for job in self.jobs if job.run_dir.resolve() == run_dir.resolve()]
        return matching[-1] if matching else None

    def stop_all(self) -> None:
        """Jobs outlive the page but not the app: stop them when the app stops."""
        for job in self.jobs:
            if job.returncode is None:
                job.process.terminate()
                try:
                    job.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.process.kill()
            job.log_handle.close()
