"""finqlora's Trainer: verified checkpoints, and a stop within a step that saves the last complete one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Trainer

from finqlora.train.checkpoints import checkpoint_is_complete, write_checkpoint_marker
from finqlora.train.distributed import barrier
from finqlora.train.stopping import StopRequest, capture_rng_state, restore_rng_state


class FinqloraTrainer(Trainer):
    """transformers' Trainer whose checkpoints end with a completion marker and whose steps can be abandoned.

    `stop` is the run's StopRequest; `abandon_within_steps` is False under several processes
    (all ranks must stop at the same step boundary there, see finqlora.train.stopping);
    `fingerprint` (finqlora.train.checkpoints.training_fingerprint) goes into every checkpoint's marker.
    """

    def __init__(self, *args: Any, stop: StopRequest, abandon_within_steps: bool, fingerprint: dict[str, Any],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop
        self.abandon_within_steps = abandon_within_steps
        self.fingerprint = fingerprint
        self.rng_after_last_step: dict[str, Any] | None = None

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        if self.state.global_step >= self.state.max_steps:
            # Resumed from the checkpoint of the last step (a run killed after saving it, before
            # writing its outputs): transformers would train one step past max_steps when that
            # step is not at an epoch's end. Nothing is left to train; go on to the final steps
            # (the best checkpoint loaded, the outputs written).
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        # Called before each step, after the previous one has logged, evaluated and saved: the
        # generators are exactly as a checkpoint of that step records them.
        self.rng_after_last_step = capture_rng_state()
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        with self.stop.abandonable(self.abandon_within_steps):
            self.stop.abandon_step_if_asked()
            loss = super().training_step(model, inputs, num_items_in_batch)
            # Between micro-batches: skip the rest of the accumulation and the optimizer step.
            self.stop.abandon_step_if_asked()
        return loss

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        # Other processes write their own rng_state_<rank>.pth into the folder: the marker
        # (which lists the files) must come after every process is done.
        barrier()
        if self.args.should_save:
            write_checkpoint_marker(self.checkpoint_folder(), self.state.global_step, self.fingerprint)

    def checkpoint_folder(self) -> Path:
        return Path(self._get_output_dir(trial=None)) / f"checkpoint-{self.state.global_step}"

    def save_last_complete_step(self) -> Path | None:
        """After StepAbandoned: checkpoint the state the last complete step left (None before step 1)."""
        if self.state.global_step == 0:
            return None  # nothing trained yet: a fresh start is the same
        folder = self.checkpoint_folder()
        if checkpoint_is_complete(folder):
            return folder  # that step was saved on schedule
        if self.rng_after_last_step is not None:
            restore_rng_state(self.rng_after_last_step)
        self.model.zero_grad(set_to_none=True)  # the abandoned step's partial gradients
        self._save_checkpoint(self.model, trial=None)
        return folder
