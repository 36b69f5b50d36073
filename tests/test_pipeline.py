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
        "eval": {"max_prompts": 3, "max_new_tokens": 6, "batch_size": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _quiet(_line: str) -> None:
    pass


@pytest.mark.slow
def test_full_run_then_rerun_skips_everything(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = load_config(_write_config(tmp_path, tiny_model_dir))
    first = run_pipeline(config, log=_quiet)
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

    second = run_pipeline(config, log=_quiet)
    assert [s.status for s in second.stages] == ["skipped"] * len(STAGES)

    # Changing an eval setting reruns the evaluations and the report, not the build or training.
    changed = load_config(_write_config(tmp_path, tiny_model_dir), ["eval.max_new_tokens=5"])
    third = run_pipeline(changed, log=_quiet)
    ran = {s.name for s in third.stages if s.status == "ran"}
    assert ran == {"eval_base", "eval_finetuned", "report"}

    # A touched output (the dataset) is noticed: build reruns, and since the rebuilt file is
    # byte-identical (same seed, same database), training does not.
    dataset = root / "dataset" / "instructions.jsonl"
    dataset.write_text(dataset.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    fourth = run_pipeline(changed, log=_quiet)
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
        run_pipeline(config, log=_quiet)
    root = Path(config.train.output_dir)
    assert list(root.glob("checkpoint-*")), "the interrupted run saved a checkpoint"
    assert json.loads((root / "pipeline_state.json").read_text())["train"]["status"] == "started"

    monkeypatch.setattr(training, "train", real_train)
    lines: list[str] = []
    result = run_pipeline(config, log=lines.append)
    train_outcome = next(s for s in result.stages if s.name == "train")
    assert train_outcome.status == "ran" and train_outcome.summary["resumed"] is True
    assert train_outcome.summary["steps"] == 8
    assert any("resuming" in line for line in lines)


def test_unknown_stage_and_conflicting_flags(tmp_path: Path) -> None:
    config = load_config(None, [f"train.output_dir={tmp_path / 'r'}"])
    with pytest.raises(FinqloraError, match="unknown stage 'evaluate'") as info:
        run_pipeline(config, only="evaluate", log=_quiet)
    assert "eval_base" in (info.value.hint or "")
    with pytest.raises(FinqloraError, match="cannot be combined"):
        run_pipeline(config, start="build", only="train", log=_quiet)


def test_database_that_fails_check_stops_the_run(tmp_path: Path) -> None:
    bad = tmp_path / "finance_analysis.db"
    with sqlite3.connect(bad) as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    config = load_config(None, [f"data.db={bad}", f"train.output_dir={tmp_path / 'r'}"])
    with pytest.raises(FinqloraError, match="cannot feed the pipeline") as info:
        run_pipeline(config, log=_quiet)
    assert "db check" in (info.value.hint or "")
    state = json.loads((tmp_path / "r" / "pipeline_state.json").read_text())
    assert state["check"]["status"] == "started" and "build" not in state


def test_missing_database_file_is_named(tmp_path: Path) -> None:
    config = load_config(None, [f"data.db={tmp_path / 'nope.db'}", f"train.output_dir={tmp_path / 'r'}"])
    with pytest.raises(FinqloraError, match="nope.db"):
        run_pipeline(config, log=_quiet)


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

