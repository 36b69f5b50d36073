"""The Trainer callbacks of a finqlora run: run control, training_log.jsonl, the progress bar and the live loss.png."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finqlora.core.hardware import trim_heap
from finqlora.core.fileio import atomic_write_text
from finqlora.train.checkpoints import check_free_space, now_utc
from finqlora.train.distributed import any_rank
from finqlora.train.stopping import StopRequest


class RunControl(TrainerCallback):
    """Signals, final validation, non-finite loss and the disk check before saves."""

    def __init__(self, stop: StopRequest, output_dir: Path, needed_bytes: int) -> None:
        self.stop = stop
        self.output_dir = output_dir
        self.needed_bytes = needed_bytes
        self.nonfinite: dict[str, Any] | None = None
        self.last_eval_step = -1
        self.last_save_step = -1

    def on_step_end(self, args, state, control, **kwargs):
        # All processes must stop at the same step, or the next gradient all-reduce hangs.
        if any_rank(self.stop.signal_name is not None):
            self.stop.signal_name = self.stop.signal_name or "SIGTERM"  # a peer process got the signal
            control.should_save = True
            control.should_training_stop = True
        if control.should_save and args.should_save:
            check_free_space(self.output_dir, self.needed_bytes)
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        self.last_eval_step = state.global_step

    def on_save(self, args, state, control, **kwargs):
        self.last_save_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        # Trainer calls this also when a run stops early (max_steps, a signal, early stopping):
        # each epoch end and the last step get a val loss and a checkpoint, once.
        if self.stop.signal_name is not None or self.nonfinite is not None:
            # Already checkpointed at the step (signal), or weights are broken (non-finite):
            # overrule the epoch-end eval/save that Trainer's default flow just asked for.
            control.should_evaluate = control.should_save = False
            return control
        control.should_evaluate = state.global_step != self.last_eval_step
        control.should_save = state.global_step != self.last_save_step
        if control.should_save and args.should_save:
            check_free_space(self.output_dir, self.needed_bytes)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in ("loss", "grad_norm", "eval_loss"):
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value) and self.nonfinite is None:
                self.nonfinite = {"step": state.global_step, "key": key, "value": str(value)}
                control.should_training_stop = True
                control.should_save = False
        return control

class ReleaseFreedMemory(TrainerCallback):
    """Give the heap's free pages back after every step and evaluation (core/hardware.trim_heap: on the
    CPU, activations of varying size otherwise fragment glibc's heap and resident memory grows)."""

    def on_step_end(self, args, state, control, **kwargs):
        trim_heap()

    def on_evaluate(self, args, state, control, **kwargs):
        trim_heap()


class JsonlLog(TrainerCallback):
    """training_log.jsonl: one line per logged step (loss, lr, grad norm, tokens/s) and per validation."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / "training_log.jsonl"
        self.last_time: float | None = None
        self.last_tokens = 0
        self.epoch_started: float | None = None
        self.epoch_first_step = 0
        self.epoch_times: list[dict[str, Any]] = []
        self.train_started = time.perf_counter()
        self.tokens_trained = 0
        self.seconds_trained = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        # On resume keep the log up to the checkpoint's step; drop lines of the lost steps.
        kept = []
        if self.path.exists() and state.global_step > 0:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", 0) <= state.global_step:
                        kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_started = time.perf_counter()
        self.epoch_first_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.epoch_started is not None:
            self.epoch_times.append(
                {
                    "epoch": round(state.epoch or 0.0, 4),
                    "seconds": round(time.perf_counter() - self.epoch_started, 3),
                    "steps": state.global_step - self.epoch_first_step,
                }
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        now = time.perf_counter()
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            tokens = state.num_input_tokens_seen - self.last_tokens
            seconds = now - (self.last_time or now)
            self.tokens_trained += tokens
            self.seconds_trained += seconds
            row.update(
                loss=logs["loss"],
                learning_rate=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                tokens=tokens,
                tokens_per_s=round(tokens / seconds, 2) if seconds > 0 else None,
            )
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        elif "eval_loss" in logs:
            row["eval_loss"] = logs["eval_loss"]
            # Validation time is not training time: restart the tokens/s clock.
            self.last_time = now
        else:
            return
        row["time"] = now_utc()
        if args.should_save:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens_trained / self.seconds_trained if self.seconds_trained > 0 else None

class RichProgress(TrainerCallback):
    """A rich progress bar: step, loss, val loss, tokens/s, ETA."""

    def __init__(self, log: JsonlLog, enabled: bool) -> None:
        self.log = log
        self.enabled = enabled
        self.progress = None
        self.task = None
        self.last_loss = float("nan")
        self.last_val = float("nan")
        self.lines = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not (self.enabled and args.should_save):
            return
        from rich.console import Console

        if not Console().is_interactive:
            # A pipe (a notebook cell reading the command's output, a log file; TTY_INTERACTIVE=0):
            # rich would draw the bar once, at the end, so each logged step is a line of its own.
            self.lines = True
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, loss="-", val="-", tps="-"
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.lines and logs:
            self._print_line(state, logs)
        if self.progress is None or not logs:
            return
        fields = {}
        if "loss" in logs:
            fields["loss"] = f"{logs['loss']:.4f}"
        if "eval_loss" in logs:
            fields["val"] = f"{logs['eval_loss']:.4f}"
        tps = self.log.tokens_per_second
        if tps:
            fields["tps"] = f"{tps:,.0f}"
        self.progress.update(self.task, **fields)

    def _print_line(self, state, logs) -> None:
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, label in (("loss", "loss"), ("eval_loss", "val loss"), ("learning_rate", "lr"), ("grad_norm", "grad norm")):
            if isinstance(logs.get(key), (int, float)):
                parts.append(f"{label} {logs[key]:.4g}")
        tps = self.log.tokens_per_second
        if tps and "loss" in logs:
            parts.append(f"{tps:,.0f} tok/s")
        if len(parts) > 1:
            print("  ".join(parts), flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class LiveLossPlot(TrainerCallback):
    """loss.png redrawn during training, so the curve can be watched (a notebook shows the file).

    Drawn at every validation and every `every` logged training steps: a chart costs ~0.1-0.3 s
    of CPU, nothing next to a 7B step, and at most one in `every` small CPU steps. The final chart,
    with the best step marked, is written when training ends (finqlora.train.outcome).
    """

    def __init__(self, output_dir: Path, title: str, every: int = 10) -> None:
        self.path = output_dir / "loss.png"
        self.title = title
        self.every = every
        self.logged = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not args.should_save or not ("loss" in logs or "eval_loss" in logs):
            return
        self.logged += "loss" in logs
        if "eval_loss" in logs or (self.logged - 1) % self.every == 0:  # the first step, then every `every`
            from finqlora.core.loss_plot import plot_losses

            train = [(e["step"], float(e["loss"])) for e in state.log_history if "loss" in e]
            val = [(e["step"], float(e["eval_loss"])) for e in state.log_history if "eval_loss" in e]
            try:
                plot_losses(train, val, self.path, title=self.title)
            except OSError as exc:  # a full disk fails the next checkpoint save with a clear message
                print(f"loss.png not updated: {exc}", file=sys.stderr, flush=True)
