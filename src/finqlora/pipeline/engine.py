"""`finqlora run`: the whole workflow in one run folder, with stages that know when to skip.

Stages, in order (each also runs alone through its own command):

    database        the user's database, or the generated synthetic sample
    check           `db check`: refuse a database the pipeline cannot use
    build           the instruction dataset (train/val/test by event time)
    eval_base       the base model on the test prompts (generations cached)
    train           LoRA / QLoRA fine-tuning (resumes an interrupted run)
    eval_finetuned  the fine-tuned model on the same prompts, then the metrics
    report          report.html / report.md / metrics.json

Every stage records in `runs/<name>/pipeline_state.json` a fingerprint of what it consumed
(its config section and the fingerprints of the files it read) and of what it produced. A
rerun skips a stage whose inputs and outputs are unchanged. A stage's inputs include the
fingerprints of the files its upstream stages produced, so a change reruns exactly the stages
it reaches (a rebuilt but byte-identical dataset does not retrain). A training run killed half-way has no record yet, so the
rerun resumes it from its latest complete checkpoint.

The engine knows no stage: `run_pipeline` is given a factory that makes them
(`finqlora.pipeline.stages.make_stages` for `finqlora run`), so this module imports nothing
above `core`, and a test can run the engine on stages of its own. One run at a time holds
the run folder (`finqlora.core.lock`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finqlora import __version__
from finqlora.core.config import RunConfig, dump_config
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_text, sha256_file
from finqlora.core.hardware import release_freed_memory
from finqlora.core.lock import RunFolderLock

# The stages of `finqlora run`, in order (pipeline.stages makes them; the CLI's help and the UI
# name them).
STAGES = ("database", "check", "build", "eval_base", "train", "eval_finetuned", "report")
STATE_FILE = "pipeline_state.json"


@dataclass
class RunPaths:
    """Where each stage of a run reads and writes, all under one folder."""

    root: Path

    @property
    def sample_db(self) -> Path:
        return self.root / "sample_finance_analysis.db"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset" / "instructions.jsonl"

    @property
    def test_set(self) -> Path:
        return self.root / "dataset" / "test.jsonl"

    @property
    def adapter(self) -> Path:
        # Training writes its adapter, logs and checkpoints at the top of the run folder,
        # the layout users know from the guide (adapter_config.json beside training_info.json).
        return self.root

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran" | "skipped"
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    config: RunConfig
    paths: RunPaths
    stages: list[StageOutcome]
    headline: dict[str, Any]


def fingerprint_path(path: Path) -> str:
    """Content fingerprint of a file, or of a folder's files (names and contents)."""
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode())
            digest.update(sha256_file(file).encode())
        return digest.hexdigest()
    return "missing"


def fingerprint_value(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _load_state(paths: RunPaths) -> dict[str, Any]:
    if not paths.state.exists():
        return {}
    try:
        return json.loads(paths.state.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        # The file is written atomically, so this is a hand edit; start over rather than trust it.
        return {}


def _outputs_unchanged(record: dict[str, Any]) -> bool:
    return all(fingerprint_path(Path(p)) == fp for p, fp in record.get("outputs", {}).items())


@dataclass
class Stage:
    name: str
    inputs: Callable[[], dict[str, Any]]
    # Called with resume=True when this stage started earlier with the same inputs and never
    # finished (a killed run); only training has something to resume.
    run: Callable[[bool], dict[str, Any]]
    outputs: Callable[[], list[Path]]


def _select(stages: tuple[str, ...], start: str | None, only: str | None) -> tuple[set[str], set[str]]:
    """Which stages run at all, and which are forced to run even if up to date."""
    for given, flag in ((start, "--from"), (only, "--only")):
        if given is not None and given not in stages:
            raise FinqloraError(f"unknown stage {given!r} for {flag}", hint=f"stages, in order: {', '.join(stages)}")
    if start and only:
        raise FinqloraError("--from and --only cannot be combined", hint="use one of them")
    if only:
        return {only}, {only}
    if start:
        later = set(stages[stages.index(start) :])
        return set(stages), later
    return set(stages), set()


def config_yaml(config: RunConfig) -> str:
    return "# The resolved configuration of this run (finqlora run writes it; rerun with --config this file)\n" + dump_config(config)


StagesFactory = Callable[[RunConfig, RunPaths], Sequence[Stage]]


def run_pipeline(
    config: RunConfig,
    make_stages: StagesFactory,
    *,
    start: str | None = None,
    only: str | None = None,
    force: bool = False,
    runs_root: Path | None = None,
    log: Callable[[str], None] = print,
    headline: Callable[[RunPaths], dict[str, Any]] | None = None,
) -> RunResult:
    """Run (or bring up to date) the stages `make_stages(config, paths)` gives, in `runs/<name>/`.

    The run folder is locked for the whole run: a second run on it fails at once, naming the first.
    """
    root = Path(config.train.output_dir) if runs_root is None else runs_root / config.name
    paths = RunPaths(root)
    stages = list(make_stages(config, paths))
    selected, forced = _select(tuple(stage.name for stage in stages), start, only)
    with RunFolderLock(root):
        atomic_write_text(root / "run_config.yaml", config_yaml(config))
        outcomes = _run_stages(stages, paths, selected, forced, force=force, log=log)
    return RunResult(config, paths, outcomes, headline(paths) if headline else {})


def _run_stages(
    stages: Sequence[Stage], paths: RunPaths, selected: set[str], forced: set[str], *, force: bool, log: Callable[[str], None]
) -> list[StageOutcome]:
    state = _load_state(paths)
    outcomes: list[StageOutcome] = []
    for stage in stages:
        if stage.name not in selected:
            continue
        inputs = stage.inputs()
        inputs_fp = fingerprint_value({"inputs": inputs, "finqlora": __version__})
        record = state.get(stage.name)
        up_to_date = (
            record is not None
            and record.get("inputs") == inputs_fp
            and record.get("status") == "done"
            and _outputs_unchanged(record)
        )
        if up_to_date and not force and stage.name not in forced:
            log(f"[skip] {stage.name}: inputs and outputs unchanged")
            outcomes.append(StageOutcome(stage.name, "skipped", 0.0, record.get("summary", {})))
            continue
        resume = record is not None and record.get("status") == "started" and record.get("inputs") == inputs_fp
        log(f"[run ] {stage.name}" + (" (resuming an interrupted run)" if resume else ""))
        state[stage.name] = {"inputs": inputs_fp, "status": "started"}
        atomic_write_json(paths.state, state)
        started = time.perf_counter()
        summary = stage.run(resume)
        seconds = time.perf_counter() - started
        # The stage's model is garbage now: free it before the next stage loads its own.
        release_freed_memory()
        state[stage.name] = {
            "inputs": inputs_fp,
            "status": "done",
            "outputs": {str(p): fingerprint_path(p) for p in stage.outputs()},
            "seconds": round(seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "summary": summary,
        }
        atomic_write_json(paths.state, state)
        outcomes.append(StageOutcome(stage.name, "ran", seconds, summary))
    return outcomes
