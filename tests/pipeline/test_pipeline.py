"""`finqlora run`: stages, skipping, resuming, selection flags and bad input.

The end-to-end tests run the real pipeline (sample database, real builder, real training and
evaluation) with the tiny random model, so they check mechanics, not answer quality.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest
import yaml

from finqlora.core.config import load_config
from finqlora.core.errors import FinqloraError
from finqlora.pipeline.engine import STAGES, run_pipeline
from finqlora.pipeline.stages import headline, make_stages


def _write_config(tmp_path: Path, model_dir: Path, **train: object) -> Path:
    config = {
        "name": "pipe",
        "data": {"db": "sample", "num_samples": 40, "seed": 0},
        "train": {
            "model": str(model_dir),
            "output_dir": str(tmp_path / "runs" / "pipe"),
            "device": "cpu",
            "load_in_4bit": False,
            "compute_dtype": "fp32",
            "max_steps": 4,
            "batch_size": 2,
            "max_length": 512,
            "learning_rate": 1e-3,
            "eval_steps": 2,
            "logging_steps": 1,
            **train,
        },
        "eval": {"max_samples": 3, "max_new_tokens": 6, "batch_size": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _quiet(_line: str) -> None:
    pass


@pytest.mark.slow
def test_full_run_then_rerun_skips_everything(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = load_config(_write_config(tmp_path, tiny_model_dir))
    first = run_pipeline(config, make_stages, log=_quiet, headline=headline)
    assert [s.name for s in first.stages] == list(STAGES)
    assert all(s.status == "ran" for s in first.stages)
    root = first.paths.root
    for produced in ("adapter_model.safetensors", "adapter_config.json", "training_info.json", "loss.png",
                     "eval/metrics.json", "eval/generations_base.jsonl", "eval/generations_finetuned.jsonl",
                     "report/report.html", "report/report.md", "dataset/instructions.jsonl", "run_config.yaml"):
        assert (root / produced).exists(), produced
    state = json.loads((root / "pipeline_state.json").read_text())
    assert all(state[name]["status"] == "done" for name in STAGES)
    assert first.headline, "the summary has before/after numbers"

    second = run_pipeline(config, make_stages, log=_quiet)
    assert [s.status for s in second.stages] == ["skipped"] * len(STAGES)

    # A new report language rebuilds the report only: no model runs again.
    english = load_config(_write_config(tmp_path, tiny_model_dir), ["eval.report_lang=en"])
    assert {s.name for s in run_pipeline(english, make_stages, log=_quiet).stages if s.status == "ran"} == {"report"}
    assert (root / "report" / "report.md").read_text(encoding="utf-8").startswith("# finqlora run pipe: ")
    assert "## Summary" in (root / "report" / "report.md").read_text(encoding="utf-8")

    # Changing an eval setting reruns the evaluations and the report, not the build or training.
    changed = load_config(_write_config(tmp_path, tiny_model_dir), ["eval.max_new_tokens=5"])
    third = run_pipeline(changed, make_stages, log=_quiet)
    ran = {s.name for s in third.stages if s.status == "ran"}
    assert ran == {"eval_base", "eval_finetuned", "report"}

    # A touched output (the dataset) is noticed: build reruns, and since the rebuilt file is
    # byte-identical (same seed, same database), training does not.
    dataset = root / "dataset" / "instructions.jsonl"
    dataset.write_text(dataset.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    fourth = run_pipeline(changed, make_stages, log=_quiet)
    statuses = {s.name: s.status for s in fourth.stages}
    assert statuses["build"] == "ran" and statuses["train"] == "skipped"


@pytest.mark.slow
def test_interrupted_training_resumes(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGINT during training leaves a checkpoint; the rerun resumes from it."""
    from transformers import TrainerCallback

    import finqlora.train.training as training

    class InterruptAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - transformers' signature
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    real_train = training.train
    monkeypatch.setattr(training, "train", lambda cfg, **kw: real_train(cfg, callbacks=[InterruptAtStep()], **kw))
    config = load_config(_write_config(tmp_path, tiny_model_dir, max_steps=8, eval_steps=4))
    with pytest.raises(FinqloraError, match="interrupted"):
        run_pipeline(config, make_stages, log=_quiet)
    root = Path(config.train.output_dir)
    assert list(root.glob("checkpoint-*")), "the interrupted run saved a checkpoint"
    assert json.loads((root / "pipeline_state.json").read_text())["train"]["status"] == "started"

    monkeypatch.setattr(training, "train", real_train)
    lines: list[str] = []
    result = run_pipeline(config, make_stages, log=lines.append)
    train_outcome = next(s for s in result.stages if s.name == "train")
    assert train_outcome.status == "ran" and train_outcome.summary["resumed"] is True
    assert train_outcome.summary["steps"] == 8
    assert any("resuming" in line for line in lines)


def test_unknown_stage_and_conflicting_flags(tmp_path: Path) -> None:
    config = load_config(None, [f"train.output_dir={tmp_path / 'r'}"])
    with pytest.raises(FinqloraError, match="unknown stage 'evaluate'") as info:
        run_pipeline(config, make_stages, only="evaluate", log=_quiet)
    assert "eval_base" in (info.value.hint or "")
    with pytest.raises(FinqloraError, match="cannot be combined"):
        run_pipeline(config, make_stages, start="build", only="train", log=_quiet)


def test_database_that_fails_check_stops_the_run(tmp_path: Path) -> None:
    bad = tmp_path / "finance_analysis.db"
    with sqlite3.connect(bad) as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    config = load_config(None, [f"data.db={bad}", f"train.output_dir={tmp_path / 'r'}"])
    with pytest.raises(FinqloraError, match="cannot feed the pipeline") as info:
        run_pipeline(config, make_stages, log=_quiet)
    assert "db check" in (info.value.hint or "")
    state = json.loads((tmp_path / "r" / "pipeline_state.json").read_text())
    assert state["check"]["status"] == "started" and "build" not in state


def test_missing_database_file_is_named(tmp_path: Path) -> None:
    config = load_config(None, [f"data.db={tmp_path / 'nope.db'}", f"train.output_dir={tmp_path / 'r'}"])
    with pytest.raises(FinqloraError, match="nope.db"):
        run_pipeline(config, make_stages, log=_quiet)


def test_malformed_config_names_key_and_allowed_values(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  compute_dtype: fp8\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match="train.compute_dtype") as info:
        load_config(path)
    assert "bf16" in str(info.value)
    path.write_text("name: x\ntrain:\n  learning_rat: 1e-4\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match="unknown key 'train.learning_rat'") as info:
        load_config(path)
    assert "learning_rate" in (info.value.hint or "")
    with pytest.raises(FinqloraError, match="not found"):
        load_config(tmp_path / "missing.yaml")



def _recording_stages(calls: list[str]):
    """Two stages of the test's own: the engine runs whatever it is given."""
    from finqlora.pipeline.engine import Stage

    def factory(config, paths):  # noqa: ANN001, ANN202 - the engine's StagesFactory
        out = paths.root / "first.txt"

        def first(_resume: bool) -> dict:
            calls.append("first")
            out.write_text("x", encoding="utf-8")
            return {}

        def second(_resume: bool) -> dict:
            calls.append("second")
            return {}

        return [Stage("first", lambda: {"v": 1}, first, lambda: [out]), Stage("second", lambda: {"v": 2}, second, lambda: [])]

    return factory


def test_engine_runs_the_stages_it_is_given(tmp_path: Path) -> None:
    calls: list[str] = []
    config = load_config(None, [f"train.output_dir={tmp_path / 'r'}"])
    result = run_pipeline(config, _recording_stages(calls), log=_quiet)
    assert calls == ["first", "second"] and [s.status for s in result.stages] == ["ran", "ran"]
    run_pipeline(config, _recording_stages(calls), log=_quiet)
    assert calls == ["first", "second"], "an up-to-date rerun skips both"
    with pytest.raises(FinqloraError, match="unknown stage 'train'") as info:
        run_pipeline(config, _recording_stages(calls), only="train", log=_quiet)
    assert "first, second" in (info.value.hint or "")


def test_make_stages_follows_the_engine_order(tmp_path: Path) -> None:
    from finqlora.pipeline.engine import RunPaths

    config = load_config(None, [f"train.output_dir={tmp_path / 'r'}"])
    assert [s.name for s in make_stages(config, RunPaths(tmp_path / "r"))] == list(STAGES)


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from finqlora.core.lock import RunFolderLock
lock = RunFolderLock(Path(sys.argv[1]), command="finqlora run --config other.yaml")
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock_in_child(root: Path):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(root)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "locked"
    return child


def test_item4_second_run_on_one_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """Issue 18 item 4: two `finqlora run`s on one run folder -> the second stops at once, naming the first."""
    from typer.testing import CliRunner

    from finqlora.cli import app

    root = tmp_path / "runs" / "pipe"
    child = _hold_lock_in_child(root)
    try:
        calls: list[str] = []
        config = load_config(None, [f"train.output_dir={root}"])
        with pytest.raises(FinqloraError, match=rf"in use by pid {child.pid} on .* since 20\d\d-") as info:
            run_pipeline(config, _recording_stages(calls), log=_quiet)
        assert "other.yaml" in str(info.value) and f"kill {child.pid}" in (info.value.hint or "")
        assert calls == [] and not (root / "pipeline_state.json").exists(), "the second run touched nothing"
        # The same through the CLI: error line, hint, exit status 2, no traceback.
        result = CliRunner().invoke(app, ["run", "--config", str(_write_config(tmp_path, tmp_path / "no-model")), "--only", "database"])
        assert result.exit_code != 0 and isinstance(result.exception, FinqloraError)
        assert f"pid {child.pid}" in str(result.exception)
    finally:
        child.kill()
        child.wait()


def test_item4_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    """A run killed with SIGKILL leaves its lock file behind; the next run takes the lock and runs."""
    from finqlora.core.lock import read_holder

    root = tmp_path / "r"
    child = _hold_lock_in_child(root)
    child.kill()
    child.wait()
    assert read_holder(root)["pid"] == child.pid, "the dead run's details are still on disk"
    calls: list[str] = []
    config = load_config(None, [f"train.output_dir={root}"])
    run_pipeline(config, _recording_stages(calls), log=_quiet)
    assert calls == ["first", "second"]
    assert read_holder(root)["pid"] == os.getpid()


def test_item6_run_config_that_is_a_binary_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18 item 6: `finqlora run --config` on a binary file -> error + hint, exit 2, no traceback."""
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(FinqloraError, match="not a text file") as info:
        load_config(binary)
    assert "YAML run config" in (info.value.hint or "")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: x\x00\x00\n")
    with pytest.raises(FinqloraError, match="NUL bytes"):
        load_config(nul)
    from finqlora.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["run", "--config", str(binary)])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert "error:" in stderr and "hint:" in stderr and "Traceback" not in stderr
