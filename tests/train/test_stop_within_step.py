"""Issue 18 item 7: SIGTERM stops within the step (not after it), and resume stays exact.

A real SIGTERM is sent from inside the forward pass of step 3 (a hook on the last block): the
run must abandon step 3, checkpoint step 2, exit, and resume to the same adapter as a run that
was never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.train.test_training import tiny_config, write_dataset
from transformers import TrainerCallback

from finqlora.train.checkpoints import checkpoint_is_complete, find_latest_checkpoint
from finqlora.train.training import train


class SigtermInsideStep(TrainerCallback):
    """Sends SIGTERM to this process from the last block's forward during step `step` (1-based)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.sent_at: float | None = None
        self.state = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = state
        last_block = [m for name, m in model.named_modules() if name.endswith("layers.1")][0]
        last_block.register_forward_pre_hook(self._maybe_signal)

    def _maybe_signal(self, module, inputs):
        if self.sent_at is None and module.training and self.state.global_step == self.step - 1:
            self.sent_at = time.perf_counter()
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_item7_sigterm_stops_within_the_step_and_resume_is_exact(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 24, 4, 0)  # 24 / (batch 2 x accumulation 2) = 6 steps
    common = dict(lora_dropout=0.1, warmup_ratio=0.2, batch_size=2, gradient_accumulation_steps=2)
    straight = train(tiny_config(tiny_model_dir, data, tmp_path / "a", **common), progress=False)
    assert straight.status == "completed" and straight.global_step == 6

    sender = SigtermInsideStep(step=3)
    first = train(tiny_config(tiny_model_dir, data, tmp_path / "b", **common), callbacks=[sender], progress=False)
    assert sender.sent_at is not None
    # Step 3 was abandoned mid-forward: the last complete step (2) is the checkpoint.
    assert first.status == "interrupted" and first.info["interrupted_by"] == "SIGTERM"
    assert first.global_step == 2 and first.info["interrupted_checkpoint"].endswith("checkpoint-2")
    assert checkpoint_is_complete(tmp_path / "b" / "checkpoint-2")
    assert not (tmp_path / "b" / "checkpoint-3").exists()

    resumed = train(tiny_config(tiny_model_dir, data, tmp_path / "b", resume_from_checkpoint="auto", **common), progress=False)
    assert resumed.status == "completed" and resumed.global_step == 6
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert [p["loss"] for p in resumed.info["train_losses"]] == pytest.approx(
        [p["loss"] for p in straight.info["train_losses"]], rel=1e-5
    )


@pytest.mark.slow
def test_item7_sigterm_before_the_first_step_ends_saves_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 8, 2, 0)
    result = train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=4), callbacks=[SigtermInsideStep(1)],
                   progress=False)
    assert result.status == "interrupted" and result.global_step == 0
    assert result.info["interrupted_checkpoint"] is None and not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.slow
def test_item7_sigterm_to_the_cli_exits_within_a_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Steps of 16 micro-batches each: a real SIGTERM early in step 2 must not wait for its end."""
    data = write_dataset(tmp_path / "d.jsonl", 16, 4, 0)
    out = tmp_path / "out"
    command = [
        sys.executable, "-c", "from finqlora.cli import main; main()",
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
        "--batch_size", "1", "--max_length", "96", "--set", "train.gradient_accumulation_steps=16",
        "--set", "train.num_epochs=3", "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    first_checkpoint = out / "checkpoint-1" / "finqlora_checkpoint.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and not first_checkpoint.exists():
        time.sleep(0.05)
    assert process.poll() is None and first_checkpoint.exists(), process.communicate()
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)  # step 2 (16 micro-batches) has just begun
    stdout, stderr = process.communicate(timeout=120)
    exit_seconds = time.monotonic() - sent
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received" in stderr and "--resume_from_checkpoint auto" in stderr
    info = json.loads((out / "training_info.json").read_text(encoding="utf-8"))
    # Step 2 was abandoned: the checkpoint is step 1's, and no step-2 checkpoint was written.
    assert info["status"] == "interrupted" and info["global_step"] == 1
    assert find_latest_checkpoint(out)[0] == out / "checkpoint-1" and not (out / "checkpoint-2").exists()
    assert exit_seconds < 60
