"""What a run leaves behind: TrainResult, training_info.json, the outputs, and errors with advice."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finqlora.core.config import RunConfig, TrainConfig, dump_config
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_text
from finqlora.core.profiles import SpeedProfile
from finqlora.core.versions import library_versions
from finqlora.train.checkpoints import check_free_space, now_utc
from finqlora.train.profiles import profile_as_dict
from finqlora.train.setup import Plan


@dataclass
class TrainResult:
    output_dir: Path
    status: str  # "completed" | "interrupted"
    global_step: int
    best_step: int | None
    best_val_loss: float | None
    final_train_loss: float | None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def adapter_path(self) -> Path:
        return self.output_dir / "adapter_model.safetensors"


@dataclass
class RunFacts:
    """What training_info.json reports beyond the Trainer's state, gathered while the run was set up and fitted."""

    run: RunConfig
    plan: Plan
    profile: SpeedProfile
    splits: Any  # finqlora.train.data.DatasetSplits
    data: Any  # finqlora.train.setup.PreparedData
    base_identity: dict[str, Any]
    trainable: int
    total: int
    resume_from: Path | None
    started_at: str
    load_seconds: float
    train_seconds: float = 0.0
    status: str = "completed"
    interrupted_by: str | None = None
    interrupted_checkpoint: Path | None = None
    # Memory-sized checkpointing (fast profiles on CUDA): how many layers kept their activations.
    checkpointing_sizing: dict[str, Any] | None = None
    # What every checkpoint of this run records (finqlora.train.checkpoints.training_fingerprint).
    fingerprint: dict[str, Any] = field(default_factory=dict)


def loss_points(state: Any) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train (step, loss), val (step, loss)) from the Trainer's log history."""
    train_points = [(e["step"], float(e["loss"])) for e in state.log_history if "loss" in e]
    val_points = [(e["step"], float(e["eval_loss"])) for e in state.log_history if "eval_loss" in e]
    return train_points, val_points


def run_info(facts: RunFacts, args: Any, state: Any, log_cb: Any, nonfinite: Any) -> dict[str, Any]:
    """training_info.json: the config, the resolved plan, data, base model, timing, losses and the best step."""
    run, cfg, plan, splits, data = facts.run, facts.run.train, facts.plan, facts.splits, facts.data
    train_points, val_points = loss_points(state)
    best_step = state.best_global_step
    info = {
        "finqlora_training_info_version": 1,
        "name": run.name,
        "status": facts.status,
        "interrupted_by": facts.interrupted_by,
        "started_at": facts.started_at,
        "finished_at": now_utc(),
        "config": run.model_dump(mode="json"),
        "hyperparameters": {
            **cfg.model_dump(mode="json"),
            "effective_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * max(args.world_size, 1),
            "resolved_device": plan.device,
            "resolved_compute_dtype": plan.dtype_name,
            "resolved_load_in_4bit": plan.load_in_4bit,
            "resolved_gradient_checkpointing": plan.gradient_checkpointing,
            "resolved_optim": plan.optim,
            "speed_profile": profile_as_dict(facts.profile),
            "packed_micro_batches": data.packing,
            "world_size": args.world_size,
        },
        "base_model": facts.base_identity,
        "dataset": {
            "path": str(splits.path.resolve()),
            "sha256": splits.sha256,
            "records": splits.total_records,
            "train_records": len(splits.train),
            "val_records": len(splits.val),
            "val_records_used": data.val_records_used,
            "test_records_ignored": splits.test_records,
            "val_source": splits.val_source,
            "train_tokens": {"prompt": data.train_stats.prompt_tokens, "answer": data.train_stats.answer_tokens,
                             "max_per_sample": data.train_stats.max_tokens},
            "trimmed_to_max_length": {"train": data.train_stats.trimmed, "val": data.val_stats.trimmed},
        },
        "parameters": {"trainable": int(facts.trainable), "total": int(facts.total),
                       "trainable_percent": round(100 * facts.trainable / facts.total, 4)},
        "libraries": library_versions(),
        "device": device_description(plan.device),
        "resumed_from": str(facts.resume_from) if facts.resume_from else None,
        "timing": {
            "load_and_tokenize_seconds": round(facts.load_seconds, 2),
            "train_seconds": round(facts.train_seconds, 2),
            # CPU time of this process (all threads): on a busy shared machine, CPU seconds / cores
            # estimates the wall time the run would take alone.
            "process_cpu_seconds": round(process_cpu_seconds(), 1),
            "epochs": log_cb.epoch_times,
        },
        "throughput": {
            "tokens_per_second": round(log_cb.tokens_per_second, 2) if log_cb.tokens_per_second else None,
            "non_padding_tokens_seen": int(state.num_input_tokens_seen),
        },
        "memory": peak_memory(plan.device),
        "memory_sized_checkpointing": facts.checkpointing_sizing,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "epochs_completed": round(state.epoch or 0.0, 4),
        "train_losses": [{"step": s, "loss": v} for s, v in train_points],
        "val_losses": [{"step": s, "loss": v} for s, v in val_points],
        "best_step": best_step,
        "best_val_loss": state.best_metric,
        "best_checkpoint": state.best_model_checkpoint,
        "adapter_is": "best checkpoint by val loss" if cfg.load_best_at_end and best_step else "last step",
        "nonfinite": nonfinite,
    }
    if facts.status == "interrupted":
        # The checkpoint a resume continues from (None: stopped before the first step ended).
        info["interrupted_checkpoint"] = str(facts.interrupted_checkpoint) if facts.interrupted_checkpoint else None
    return info


def write_outputs(trainer: Any, tokenizer: Any, run: RunConfig, info: dict[str, Any], output_dir: Path,
                  needed_bytes: int) -> None:
    """The adapter and tokenizer (completed runs), run_config.yaml, loss.png and training_info.json (rank 0 only)."""
    from finqlora.core.loss_plot import plot_losses

    cfg = run.train
    if info["status"] == "completed":
        check_free_space(output_dir, needed_bytes)
        trainer.model.save_pretrained(output_dir, safe_serialization=True)
        if cfg.save_adapter_bin:
            trainer.model.save_pretrained(output_dir / "_bin", safe_serialization=False)
            os.replace(output_dir / "_bin" / "adapter_model.bin", output_dir / "adapter_model.bin")
            shutil.rmtree(output_dir / "_bin", ignore_errors=True)
        tokenizer.save_pretrained(output_dir)
        info["outputs"] = sorted(p.name for p in output_dir.iterdir() if not p.name.startswith("."))
    atomic_write_text(output_dir / "run_config.yaml", dump_config(run))
    train_points, val_points = loss_points(trainer.state)
    plot_losses(train_points, val_points, output_dir / "loss.png", title=f"{run.name}: loss", best_step=info["best_step"])
    info["outputs"] = sorted({*info.get("outputs", []), "loss.png", "run_config.yaml", "training_info.json", "training_log.jsonl"})
    atomic_write_json(output_dir / "training_info.json", info)


def device_description(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible)"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_memory(device: str) -> dict[str, float]:
    import torch

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    memory = {"peak_process_rss_gib": round(rss_kib / 2**20, 3)}
    if device == "cuda":
        memory["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        memory["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return memory


def oom_error(cfg: TrainConfig, plan: Plan, profile: SpeedProfile | None = None) -> FinqloraError:
    advice = []
    if profile is not None and profile.memory_sized_checkpointing:
        # The sizing reads free memory as each micro-batch starts; it cannot see a later claim.
        advice.append(f"profile {profile.name} fills the GPU memory it finds free: run it alone on the GPU")
    advice.append(f"lower train.batch_size (now {cfg.batch_size}) and raise train.gradient_accumulation_steps to keep the effective batch")
    advice.append(f"lower train.max_length (now {cfg.max_length})")
    if not plan.gradient_checkpointing:
        advice.append("turn on train.gradient_checkpointing: true")
    if not plan.load_in_4bit:
        advice.append("turn on train.load_in_4bit: true (QLoRA)")
    if cfg.profile != "t4":
        advice.append("or use train.profile: t4 (the 16 GB recipe)")
    return FinqloraError(
        "the GPU ran out of memory during training",
        hint="; ".join(advice) + ". Resume keeps your progress: --resume_from_checkpoint auto",
    )


def nonfinite_error(event: Mapping[str, Any], plan: Plan, cfg: TrainConfig) -> FinqloraError:
    advice = [f"lower train.learning_rate (now {cfg.learning_rate:g})", f"keep train.max_grad_norm small (now {cfg.max_grad_norm:g})"]
    if plan.dtype_name == "fp16":
        advice.insert(0, "fp16 overflows easily: use compute_dtype: bf16 on GPUs that support it (A100/H100/RTX 30+) or fp32")
    return FinqloraError(
        f"training stopped: {event['key']} became {event['value']} at step {event['step']}",
        hint="; ".join(advice) + ". The last complete checkpoint is kept; resume after changing the config.",
    )
