"""A LLaMA-Factory training YAML as a finqlora run config (`finqlora config from-llamafactory`).

LLaMA-Factory's keys are its own (`lora_rank`, `cutoff_len`) and Hugging Face's
TrainingArguments' (`per_device_train_batch_size`, `num_train_epochs`). Each one with an
equivalent becomes our key; a key LLaMA-Factory users leave out gets LLaMA-Factory's (or the
TrainingArguments') default written out, so the run trains as LLaMA-Factory would have. What
has no equivalent is listed, never dropped silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finqlora.core.errors import FinqloraError

# LLaMA-Factory key -> our key (values converted by _convert where the meaning needs it).
DIRECT = {
    "model_name_or_path": "train.model",
    "trust_remote_code": "train.trust_remote_code",
    "lora_rank": "train.lora_r",
    "lora_alpha": "train.lora_alpha",
    "lora_dropout": "train.lora_dropout",
    "cutoff_len": "train.max_length",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "learning_rate": "train.learning_rate",
    "num_train_epochs": "train.num_epochs",
    "max_steps": "train.max_steps",
    "lr_scheduler_type": "train.lr_scheduler",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "optim": "train.optim",
    "output_dir": "train.output_dir",
    "logging_steps": "train.logging_steps",
    "eval_steps": "train.eval_steps",
    "save_total_limit": "train.keep_checkpoints",
    "load_best_model_at_end": "train.load_best_at_end",
    "early_stopping_steps": "train.early_stopping_patience",
    "val_size": "train.val_fraction",
    "seed": "train.seed",
    "resume_from_checkpoint": "train.resume_from_checkpoint",
}
# What LLaMA-Factory (or TrainingArguments) does when the key is left out, where ours differs.
LLAMAFACTORY_DEFAULTS = {
    "lora_rank": 8,
    "lora_dropout": 0.0,
    "lora_target": "all",
    "cutoff_len": 2048,
    "per_device_train_batch_size": 8,
    "learning_rate": 5e-5,
    "num_train_epochs": 3.0,
    "lr_scheduler_type": "linear",
    "warmup_ratio": 0.0,
    "seed": 42,
}
# Keys that only steer LLaMA-Factory's own bookkeeping, with the same effect here by design.
SAME_HERE = {
    "do_train": "training is what `finqlora train` does",
    "overwrite_output_dir": "finqlora resumes or refuses; it never mixes runs in one folder",
    "plot_loss": "loss.png is always written",
    "overwrite_cache": "finqlora does not cache tokenized data",
    "preprocessing_num_workers": "tokenizing runs in one process",
    "dataloader_num_workers": "batches are built in the training process",
    "ddp_timeout": "see docs/multi-gpu.md",
    "save_only_model": "checkpoints keep optimizer state for exact resume",
}


def _targets(value: Any) -> str | list[str]:
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    return "all-linear" if names == ["all"] else names


def from_llamafactory(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(our run config as a mapping, [what has no equivalent, one line each])."""
    if not isinstance(raw, dict):
        raise FinqloraError("a LLaMA-Factory config is a YAML mapping (model_name_or_path:, stage:, ...)")
    given = {**LLAMAFACTORY_DEFAULTS, **raw}
    if "lora_alpha" not in raw:
        given["lora_alpha"] = 2 * int(given["lora_rank"])  # LLaMA-Factory: lora_alpha defaults to lora_rank * 2
    out: dict[str, dict[str, Any]] = {"data": {}, "train": {}, "eval": {}}
    missing: list[str] = []
    for key, value in given.items():
        if key in DIRECT:
            section, name = DIRECT[key].split(".")
            out[section][name] = value
        elif key in SAME_HERE:
            continue
        elif not _special(key, value, given, out, missing):
            missing.append(f"{key}: {value!r} (no equivalent)")
    out["name"] = Path(str(given.get("output_dir") or "llamafactory-run")).name or "llamafactory-run"  # type: ignore[assignment]
    return {k: v for k, v in out.items() if v}, missing


def _special(key: str, value: Any, given: dict[str, Any], out: dict[str, dict[str, Any]], missing: list[str]) -> bool:
    """Keys whose value changes meaning on the way; False = no equivalent."""
    train = out["train"]
    if key == "stage":
        if value != "sft":
            missing.append(f"stage: {value!r} (finqlora does supervised fine-tuning only)")
        return True
    if key == "finetuning_type":
        if value != "lora":
            missing.append(f"finetuning_type: {value!r} (finqlora trains LoRA adapters only)")
        return True
    if key == "lora_target":
        train["target_modules"] = _targets(value)
        return True
    if key == "quantization_bit":
        if value in (4, "4"):
            train["load_in_4bit"] = True
        elif value is not None:
            missing.append(f"quantization_bit: {value!r} (finqlora quantizes to 4-bit NF4 only)")
        return True
    if key in ("bf16", "fp16", "pure_bf16"):
        if value:
            train["compute_dtype"] = "fp16" if key == "fp16" else "bf16"
        return True
    if key == "template":
        missing.append(f"template: {value!r} (finqlora uses the tokenizer's own chat template; "
                       "train.chat_template: chatml for models without one)")
        return True
    if key == "dataset_dir":
        return True  # read with `dataset`
    if key == "dataset":
        names = [n.strip() for n in str(value).split(",") if n.strip()]
        folder = given.get("dataset_dir", "data")
        train["dataset"] = f"{folder}/dataset_info.json:{names[0]}"
        if len(names) > 1:
            missing.append(f"dataset: {', '.join(names[1:])} (one dataset per run; merge the files, or build one with `finqlora build`)")
        return True
    if key == "save_steps":
        if "eval_steps" not in given:
            train["eval_steps"] = value  # finqlora checkpoints where it validates
        return True
    if key == "disable_gradient_checkpointing":
        train["gradient_checkpointing"] = not value
        return True
    return False
