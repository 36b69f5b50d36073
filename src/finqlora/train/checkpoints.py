"""Checkpoints: the completion marker, its verification, and which checkpoint a run resumes from.

Every `checkpoint-N` folder gets `finqlora_checkpoint.json` written last, listing each file with
its size and SHA-256. A checkpoint counts only when the marker exists and every listed file is
there with that size and that checksum, so a save that was interrupted, a truncated file and a
file overwritten in place (same size, other bytes) are all told apart and named. `auto` resume
takes the newest verified checkpoint; an explicit checkpoint path is verified the same way and
refused with the reason.

The marker also records the checkpoint's fingerprint: every setting that changes what the
training computes (model, LoRA, schedule, batch, lengths, seed, profile, ...), the SHA-256 of the
dataset file and the number of processes. A resume, `auto` or explicit, refuses a checkpoint
whose fingerprint differs from the run's and names the settings that differ: continuing another
configuration's weights, optimizer and schedule would pass off a mix of two runs as this one.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from finqlora.core.config import TrainConfig
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, sha256_file
from finqlora.train.distributed import is_main_process, world_size

CHECKPOINT_MARKER = "finqlora_checkpoint.json"
# 1: sizes only (finqlora before checksums); 2: size and SHA-256 of every file; 3: and the
# training fingerprint.
MARKER_VERSION = 3
# Train settings that do not change what a step computes: where files go, how often the loss
# is logged and to which trackers, how many old checkpoints are kept, an extra .bin copy of the adapter.
NOT_IN_FINGERPRINT = frozenset(
    {"dataset", "output_dir", "resume_from_checkpoint", "logging_steps", "keep_checkpoints", "save_adapter_bin", "report_to"}
)
_CHECKPOINT_RE = re.compile(r"^checkpoint-([0-9]{1,12})\Z")  # \Z: `$` would take "checkpoint-6\n"; at most 12 digits, a step number int() always reads


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def training_fingerprint(cfg: TrainConfig, dataset_sha256: str) -> dict[str, Any]:
    """What a checkpoint's weights depend on: the trajectory settings, the data and the process count."""
    settings = cfg.model_dump(mode="json", exclude=set(NOT_IN_FINGERPRINT))
    if cfg.lr_scheduler == "constant":
        # A flat schedule (no warmup either) makes every step independent of the run's length:
        # a run stopped by max_steps may be continued to more steps or epochs and stays exact.
        for key in ("max_steps", "num_epochs", "warmup_ratio"):
            settings.pop(key)
    return {"train": settings, "dataset_sha256": dataset_sha256, "processes": world_size()}


def write_checkpoint_marker(folder: Path, step: int, fingerprint: dict[str, Any]) -> None:
    """Record every file of a finished checkpoint (size + SHA-256) and its fingerprint; written last, atomically."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != CHECKPOINT_MARKER
    }
    atomic_write_json(
        folder / CHECKPOINT_MARKER,
        {"marker_version": MARKER_VERSION, "step": step, "files": files, "fingerprint": fingerprint, "written_at": now_utc()},
    )


UNRECORDED = "its marker records no training settings (it was saved by an older finqlora), so it cannot be shown to match"


def fingerprint_differences(folder: Path, fingerprint: dict[str, Any]) -> str | None:
    """How a verified checkpoint's fingerprint differs from `fingerprint`, in words; None when they match."""
    try:
        recorded = json.loads((folder / CHECKPOINT_MARKER).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("train"), dict):
        return UNRECORDED
    differences = []
    # The settings this run's fingerprint holds are compared; one added to finqlora after the
    # checkpoint was saved counts as its default there.
    defaults = TrainConfig().model_dump(mode="json")
    there, here = recorded["train"], fingerprint["train"]
    for key in sorted(here):
        old, new = there.get(key, defaults.get(key)), here[key]
        if old != new:
            differences.append(f"train.{key} {_short(old)} there, {_short(new)} here")
    if recorded.get("dataset_sha256") != fingerprint["dataset_sha256"]:
        differences.append("the dataset file differs (another SHA-256)")
    if recorded.get("processes") != fingerprint["processes"]:
        differences.append(f"{recorded.get('processes')} training processes there, {fingerprint['processes']} here")
    return "; ".join(differences) or None


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, in one sentence; None when every file verifies."""
    marker = folder / CHECKPOINT_MARKER
    if not marker.is_file():
        return f"it has no completion marker ({CHECKPOINT_MARKER}): its save was interrupted"
    try:
        listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return f"its completion marker {marker} is unreadable"
    for name, recorded in listed.items():
        if not isinstance(recorded, (int, dict)):
            return f"its completion marker {marker} is unreadable"
        problem = _file_problem(folder / name, recorded)
        if problem is not None:
            return problem
    return None


def _file_problem(path: Path, recorded: Any) -> str | None:
    # A version-1 marker records the size only (an int); version 2 records size and sha256.
    size, digest = (recorded, None) if isinstance(recorded, int) else (recorded.get("size"), recorded.get("sha256"))
    if not isinstance(size, int):
        return f"its completion marker lists {path.name} without a size"
    if not path.is_file():
        return f"file {path.name} is missing"
    actual = path.stat().st_size
    if actual < size:
        return f"file {path.name} is truncated: {actual} bytes, {size} when the checkpoint was saved"
    if actual != size:
        return f"file {path.name} has {actual} bytes, {size} when the checkpoint was saved"
    if digest is not None and sha256_file(path) != digest:
        return f"file {path.name} was changed after the save: same size ({size} bytes) but its SHA-256 differs from the recorded one"
    return None


def checkpoint_is_complete(folder: Path) -> bool:
    """True when the marker exists and every file it lists has its recorded size and SHA-256."""
    return checkpoint_problem(folder) is None


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[Path]]:
    """(newest verified checkpoint or None, the unverified checkpoint folders newer than it)."""
    unverified: list[Path] = []
    for _, folder in reversed(list_checkpoints(Path(output_dir))):
        if checkpoint_is_complete(folder):
            return folder, unverified
        unverified.append(folder)
    return None, unverified


def verify_checkpoint(folder: Path) -> None:
    """Raise FinqloraError saying what is wrong with an explicitly named checkpoint."""
    if not (folder / "trainer_state.json").is_file():
        raise FinqloraError(
            f"{folder} is not a training checkpoint (no trainer_state.json)",
            hint="pass a checkpoint-N folder of an earlier run, or 'auto' for the newest verified one",
        )
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise FinqloraError(
            f"cannot resume from {folder}: {problem}",
            hint="resuming from it would train on broken weights; use --resume_from_checkpoint auto (the newest "
            "verified checkpoint) or an older checkpoint-N folder",
        )


def check_fingerprint(folder: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a verified checkpoint that another configuration or other data trained."""
    differences = fingerprint_differences(folder, fingerprint)
    fresh = ("start this configuration fresh in another output folder (--output-dir, or --set train.output_dir=...; "
             "`finqlora run` starts fresh by itself after a config change)")
    if differences == UNRECORDED:
        raise FinqloraError(f"cannot resume from {folder}: {differences}",
                            hint=f"resume it with the finqlora version that saved it, or {fresh}")
    if differences is not None:
        raise FinqloraError(
            f"cannot resume from {folder}: it was trained with other settings or data than this run: {differences}",
            hint="resume with the config and data it was trained with (its run's training_info.json or run_config.yaml "
            f"lists them), or {fresh}",
        )


def resolve_resume(cfg: TrainConfig, output_dir: Path, fingerprint: dict[str, Any]) -> Path | None:
    """The verified checkpoint of this configuration that this run resumes from (None: start from scratch)."""
    spec = cfg.resume_from_checkpoint
    if spec is None:
        return None
    if spec != "auto":
        folder = Path(spec)
        verify_checkpoint(folder)
        check_fingerprint(folder, fingerprint)
        return folder
    latest, unverified = find_latest_checkpoint(output_dir)
    for folder in unverified if is_main_process() else ():  # one process cleans up, not all
        problem = checkpoint_problem(folder)
        if problem is not None and problem.startswith("it has no completion marker"):
            # Interrupted mid-save: nothing in it can be trusted, and the step will be saved again.
            print(f"skipping incomplete checkpoint {folder} ({problem}); removing it", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"skipping checkpoint {folder}: {problem}; left in place for inspection", file=sys.stderr)
    if latest is None:
        print(f"no verified checkpoint in {output_dir}: starting from scratch", file=sys.stderr)
    else:
        check_fingerprint(latest, fingerprint)
    return latest


def save_bytes_needed(trainable: int, tokenizer: Any) -> int:
    """About what one checkpoint writes, from this run's own sizes (not a fixed margin): the
    adapter and AdamW's two moments in fp32 (12 bytes per trainable parameter), the tokenizer's
    files as `save_pretrained` writes them, 1 MiB for the trainer's states and JSON, and 10% on
    top for the file system."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        tokenizer_bytes = sum(f.stat().st_size for f in Path(scratch).rglob("*") if f.is_file())
    return int((trainable * 12 + tokenizer_bytes + 2**20) * 1.1)


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse to start a save that cannot fit (a half-written checkpoint helps nobody)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise FinqloraError(
            f"not enough free disk space in {probe}: {free / 2**20:.0f} MiB free, a checkpoint needs about "
            f"{needed_bytes / 2**20:.0f} MiB",
            hint="free some space, point --output-dir at a larger disk, or lower train.keep_checkpoints",
        )
