"""QLoRA / LoRA supervised fine-tuning: one recipe over transformers Trainer + peft.

`train()` reads as its steps: set up (finqlora.train.setup), fit with validation (the Trainer,
with finqlora.train.callbacks), then write what the run learned (finqlora.train.outcome):

1. read the instruction JSONL (finqlora.train.data: train on split "train", validate on split
   "val"; a file without splits holds out `val_fraction` of its records, chosen with the seed);
2. load the base model through `finqlora.models.loading.load_model(for_training=True)` -- 4-bit
   NF4 on CUDA (QLoRA), full precision on the CPU (plain LoRA);
3. wrap the model with LoRA adapters (peft); tokenize with
   `finqlora.core.chat_format.encode_for_training` (the inference chat template, prompt labels
   -100, the answer ends with the template's end-of-turn marker); patch the model for the speed
   profile (finqlora.train.profiles, finqlora.train.patches) and pick the collator and the packed
   micro-batches that fit it (finqlora.train.collate);
4. train with transformers' Trainer (finqlora.train.trainer): cosine schedule
   with warmup, validation each epoch (and every `eval_steps`), the best checkpoint kept, optional
   early stopping, exact resume (Trainer restores optimizer, scheduler, RNG and data position);
5. write the adapter, tokenizer + chat template, training_info.json, training_log.jsonl, loss.png.

Robustness: Ctrl-C / SIGTERM stop within the current step, checkpoint the last complete step and
return with status "interrupted" (finqlora.train.stopping); every checkpoint gets a completion
marker with the SHA-256 of each file, written last, and every resume verifies it
(finqlora.train.checkpoints); non-finite loss stops the run with advice; CUDA OOM becomes a
`FinqloraError` that says what to lower; free disk space is checked before every save.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finqlora.core.config import RunConfig, TrainConfig
from finqlora.core.errors import FinqloraError
from finqlora.core.lock import RunFolderLock
from finqlora.train.callbacks import JsonlLog, LiveLossPlot, RichProgress, RunControl
from finqlora.train.checkpoints import check_free_space, now_utc, resolve_resume, save_bytes_needed, training_fingerprint
from finqlora.train.data import load_splits
from finqlora.train.distributed import is_main_process
from finqlora.train.outcome import RunFacts, TrainResult, loss_points, nonfinite_error, oom_error, run_info, write_outputs
from finqlora.train.profiles import get_profile
from finqlora.train.setup import (
    attach_lora,
    build_trainer,
    load_base,
    prepare_model_and_data,
    resolve_plan,
    training_arguments,
)
from finqlora.train.stopping import StepAbandoned, StopRequest, install_block_stop_hooks, signals_handled


def train(
    config: TrainConfig | RunConfig,
    *,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> TrainResult:
    """Fine-tune `config.model` on `config.dataset` and write the outputs to `config.output_dir`.

    `callbacks` are extra `transformers.TrainerCallback`s (run before finqlora's own). Returns
    with status "interrupted" after SIGINT/SIGTERM (the last complete step is checkpointed);
    raises `FinqloraError` for problems the user can fix.
    """
    run = config if isinstance(config, RunConfig) else RunConfig(train=config)
    _check_config(run.train)
    output_dir = Path(run.train.output_dir or Path("runs") / run.name)
    # One writer per run folder: a `finqlora run` or another `finqlora train` on this folder is
    # refused here. Under torchrun the main process holds it for the group.
    with RunFolderLock(output_dir) if is_main_process() else contextlib.nullcontext():
        return _train(run, output_dir, callbacks, progress)


def _train(run: RunConfig, output_dir: Path, callbacks: Sequence[Any], progress: bool) -> TrainResult:
    cfg = run.train
    facts, model, tokenizer = _set_up(run, output_dir)

    needed_bytes = save_bytes_needed(facts.trainable, tokenizer)
    check_free_space(output_dir, needed_bytes)
    stop = StopRequest()
    control_cb, log_cb = RunControl(stop, output_dir, needed_bytes), JsonlLog(output_dir)
    progress_cb = RichProgress(log_cb, enabled=progress)
    args = training_arguments(cfg, facts.plan, facts.data, output_dir, resuming=facts.resume_from is not None)
    # Extra callbacks run first, so one that raises a signal at step N is seen at that same step.
    trainer_callbacks = [*callbacks, control_cb, log_cb, progress_cb, LiveLossPlot(output_dir, f"{run.name}: loss")]
    if cfg.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        trainer_callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold))
    trainer = build_trainer(model, tokenizer, args, facts.data, trainer_callbacks, stop, facts.fingerprint)

    _fit(trainer, facts, stop, progress_cb, output_dir, needed_bytes)
    if control_cb.nonfinite is not None:
        facts.status = "failed: non-finite loss"
    info = run_info(facts, args, trainer.state, log_cb, control_cb.nonfinite)
    # With several processes (torchrun / accelerate launch) only rank 0 writes the outputs.
    if args.should_save:
        write_outputs(trainer, tokenizer, run, info, output_dir, needed_bytes)
    # Keep the group together until rank 0 has written: a launcher that sees one process exit
    # may stop the others.
    from finqlora.train.distributed import barrier

    barrier()
    if control_cb.nonfinite is not None:
        raise nonfinite_error(control_cb.nonfinite, facts.plan, cfg)
    train_points, _ = loss_points(trainer.state)
    return TrainResult(
        output_dir=output_dir,
        status=facts.status,
        global_step=trainer.state.global_step,
        best_step=trainer.state.best_global_step,
        best_val_loss=trainer.state.best_metric,
        final_train_loss=train_points[-1][1] if train_points else None,
        info=info,
    )


def _check_config(cfg: TrainConfig) -> None:
    if cfg.dataset is None:
        raise FinqloraError("no training data given", hint="pass --data PATH.jsonl or set train.dataset in the config")
    if cfg.early_stopping_patience is not None and not cfg.load_best_at_end:
        raise FinqloraError("train.early_stopping_patience needs train.load_best_at_end: true")


def _set_up(run: RunConfig, output_dir: Path) -> tuple[RunFacts, Any, Any]:
    """Plan, data, verified resume point, base model + LoRA, encoded data: everything before the first step."""
    from transformers import set_seed

    cfg = run.train
    profile = get_profile(cfg.profile)
    plan = resolve_plan(cfg, profile)
    splits = load_splits(cfg.dataset, val_fraction=cfg.val_fraction, seed=cfg.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = training_fingerprint(cfg, splits.sha256)
    resume_from = resolve_resume(cfg, output_dir, fingerprint)  # refused before the model loads
    started_at = now_utc()
    t0 = time.perf_counter()

    set_seed(cfg.seed)
    model, tokenizer, base_identity = load_base(cfg, plan)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions carry label -100 and mask 0
    model = attach_lora(model, cfg, plan, profile)
    trainable, total = model.get_nb_trainable_parameters()
    model, data = prepare_model_and_data(model, tokenizer, splits, cfg, profile)
    facts = RunFacts(run, plan, profile, splits, data, base_identity, trainable, total, resume_from, started_at,
                     load_seconds=time.perf_counter() - t0, fingerprint=fingerprint)
    return facts, model, tokenizer


def _fit(trainer: Any, facts: RunFacts, stop: StopRequest, progress_cb: RichProgress, output_dir: Path,
         needed_bytes: int) -> None:
    """Train (with validation) until done or stopped; a stop inside a step checkpoints the last complete one."""
    import torch

    from finqlora.train.recompute import memory_sizing_of

    resume_from = facts.resume_from
    # Compiled profiles compile each layer's forward, not its module call: these hooks stay eager.
    hooks = install_block_stop_hooks(trainer.model, stop) if trainer.abandon_within_steps else []
    started = time.perf_counter()
    try:
        with signals_handled(stop):
            try:
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            except StepAbandoned:
                check_free_space(output_dir, needed_bytes)
                facts.interrupted_checkpoint = trainer.save_last_complete_step()
            else:
                if stop.signal_name is not None:
                    facts.interrupted_checkpoint = trainer.checkpoint_folder()
    except torch.OutOfMemoryError:
        raise oom_error(facts.run.train, facts.plan, facts.profile) from None
    finally:
        for hook in hooks:
            hook.remove()
        progress_cb.close()
    facts.train_seconds = time.perf_counter() - started
    sizing = memory_sizing_of(trainer.model)
    facts.checkpointing_sizing = sizing.summary() if sizing is not None else None
    if stop.signal_name is not None:
        facts.status, facts.interrupted_by = "interrupted", stop.signal_name
