"""Setting a run up: the plan for this machine, the base model with LoRA, the data and the Trainer.

An explicit config value wins, then the speed profile's choice (finqlora.train.profiles), then
the hardware default. On CUDA the base is 4-bit NF4 (QLoRA); on the CPU full precision (plain
LoRA: bitsandbytes' CPU 4-bit layers silently stop passing gradients after a no-grad forward, so
4-bit training on the CPU is refused).

The training path, in the order `finqlora.train.training.train` takes it: `resolve_plan`,
`load_base` and `attach_lora` here; then `prepare_model_and_data`: the records encoded
(finqlora.train.data), the model patched for the profile (finqlora.train.patches), the collator
that fits the patched model's attention and the packed micro-batches (finqlora.train.collate);
then `training_arguments` and `build_trainer` (finqlora.train.trainer).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finqlora.core.config import TrainConfig
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import sha256_file
from finqlora.core.profiles import SpeedProfile
from finqlora.train.collate import make_data_collator, packed, tokens_per_micro_batch
from finqlora.train.data import DatasetSplits, EncodedDataset, EncodingStats, encode_records
from finqlora.train.patches import apply_model_speedups, attention_implementation


@dataclass
class Plan:
    """What the config resolves to on this machine."""

    device: str
    dtype_name: str  # "bf16" | "fp16" | "fp32"
    load_in_4bit: bool
    gradient_checkpointing: bool
    optim: str


def resolve_plan(cfg: TrainConfig, profile: SpeedProfile | None = None) -> Plan:
    """Device, precision, 4-bit, checkpointing and optimizer for this run on this machine.

    An explicit config value wins, then the speed profile's choice, then the hardware default.
    """
    import torch

    def pick(explicit: Any, profile_field: str, unset: Any = None) -> Any:
        if explicit != unset:
            return explicit
        return getattr(profile, profile_field, None) if profile is not None else None

    cuda = torch.cuda.is_available()
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    if device == "cuda" and not cuda:
        raise FinqloraError("train.device is 'cuda' but no CUDA GPU is visible", hint="use device: auto or cpu")
    load_in_4bit = pick(cfg.load_in_4bit, "load_in_4bit")
    if load_in_4bit is None:
        load_in_4bit = device == "cuda"
    if load_in_4bit and device == "cpu":
        raise FinqloraError(
            "4-bit (QLoRA) training on the CPU is refused: bitsandbytes' CPU 4-bit layers stop passing "
            "gradients after any no-grad forward, so the adapter would silently not learn",
            hint="set train.load_in_4bit: false (plain LoRA, e.g. configs/demo-cpu.yaml) or train on a CUDA GPU",
        )
    dtype_name = pick(cfg.compute_dtype, "compute_dtype", unset="auto")
    if dtype_name is not None:
        pass
    elif device == "cuda":
        dtype_name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        dtype_name = "fp32"
    if device == "cpu" and dtype_name == "fp16":
        raise FinqloraError("fp16 training needs a GPU", hint="use compute_dtype: fp32 (or bf16) on the CPU")
    optim = pick(cfg.optim, "optimizer", unset="auto") or ("paged_adamw_8bit" if device == "cuda" else "adamw_torch")
    if device == "cpu" and ("8bit" in optim or optim.startswith("paged")):
        raise FinqloraError(
            f"optimizer {optim} needs a CUDA GPU (bitsandbytes)", hint="use train.optim: adamw_torch (or auto) on the CPU"
        )
    gc = pick(cfg.gradient_checkpointing, "gradient_checkpointing")
    if gc is None:
        gc = device == "cuda"
    return Plan(device, dtype_name, load_in_4bit, gc, optim)


def load_base(cfg: TrainConfig, plan: Plan) -> tuple[Any, Any, dict[str, Any]]:
    """Base model + tokenizer, loaded fresh for training (never a model that served inference)."""
    from finqlora.train.distributed import process_device
    from finqlora.models.loading import describe_model, load_model

    loaded = load_model(
        cfg.model,
        # Under torchrun / accelerate launch each process puts its whole base on its own GPU.
        device=process_device(plan.device),
        dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[plan.dtype_name],
        load_in_4bit=plan.load_in_4bit,
        for_training=True,
        trust_remote_code=cfg.trust_remote_code,
        chat_template=cfg.chat_template,
    )
    return loaded.model, loaded.tokenizer, model_identity(loaded.resolved, describe_model(loaded.resolved))


def model_identity(resolved: Any, described: Mapping[str, Any]) -> dict[str, Any]:
    """Spec, base id, path and a revision or checksum, so a run names the exact base weights."""
    identity: dict[str, Any] = {
        "spec": resolved.spec,
        "kind": resolved.kind,
        "base_id": resolved.base_id,
        "path": str(resolved.path),
        "architecture": described.get("architecture"),
    }
    path = Path(resolved.path)
    snapshot = re.search(r"snapshots/([0-9a-f]{40})", str(path))
    if snapshot:
        identity["revision"] = snapshot.group(1)
    if described.get("source_sha256"):
        # A built-in or a .gguf file: converted once from a file whose checksum is pinned.
        identity["source_file"] = described.get("converted_from")
        identity["source_sha256"] = described["source_sha256"]
    elif not snapshot and path.is_dir():
        # A local folder: fingerprint its weight files (hash of each file's sha256, in name order).
        digest = hashlib.sha256()
        weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
        for weight in weights:
            digest.update(f"{weight.name}:{sha256_file(weight)}\n".encode())
        identity["weights_sha256"] = digest.hexdigest()
    return identity


def attach_lora(model: Any, cfg: TrainConfig, plan: Plan, profile: SpeedProfile) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if plan.load_in_4bit and profile.upcast_frozen_to_fp32:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=plan.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif plan.gradient_checkpointing:
        # Frozen embeddings would give checkpointed blocks inputs without grad; LoRA needs them.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    target_modules, layers_to_transform = lora_targets(model, cfg.target_modules, cfg.lora_layers)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules,
        layers_to_transform=layers_to_transform,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def lora_targets(model: Any, target_modules: str | list[str], lora_layers: int | None) -> tuple[Any, list[int] | None]:
    """peft's (target_modules, layers_to_transform) for LoRA on the last `lora_layers` blocks (None: all)."""
    if lora_layers is None:
        return target_modules, None
    n_blocks = int(model.config.get_text_config().num_hidden_layers)
    if lora_layers > n_blocks:
        raise FinqloraError(
            f"train.lora_layers is {lora_layers} but the model has {n_blocks} transformer blocks",
            hint=f"use a number from 1 to {n_blocks}, or null for all blocks",
        )
    # peft takes a block selection only with explicit module names.
    names = block_linear_names(model) if target_modules == "all-linear" else target_modules
    return names, list(range(n_blocks - lora_layers, n_blocks))


def block_linear_names(model: Any) -> list[str]:
    """Short names of the linear layers inside the transformer blocks (what 'all-linear' means)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit"
        if is_linear and ".layers." in f".{full_name}":
            names.add(full_name.rsplit(".", 1)[-1])
    if not names:
        raise FinqloraError("found no linear layers inside the model's blocks", hint="set train.target_modules explicitly")
    return sorted(names)


@dataclass
class PreparedData:
    """The encoded train and validation sets, the collator and the per-device batch sizes."""

    train: EncodedDataset
    val: EncodedDataset
    train_stats: EncodingStats
    val_stats: EncodingStats
    val_records_used: int
    collator: Any
    batch_size: int
    eval_batch_size: int
    packing: bool


def prepare_model_and_data(model: Any, tokenizer: Any, splits: DatasetSplits, cfg: TrainConfig,
                           profile: SpeedProfile) -> tuple[Any, PreparedData]:
    """Tokenize both splits, patch the model for the profile, and pick the collator (packing or padding)."""
    train_data, train_stats = encode_records(tokenizer, splits.train, cfg.max_length)
    val_records = splits.val[: cfg.max_val_samples] if cfg.max_val_samples else splits.val
    val_data, val_stats = encode_records(tokenizer, val_records, cfg.max_length)
    batch_size, eval_batch_size = cfg.batch_size, cfg.eval_batch_size or cfg.batch_size
    model = apply_model_speedups(model, profile)
    collator = make_data_collator(tokenizer, profile, attn_implementation=attention_implementation(model))
    if profile.packing:
        # One micro-batch = one pack of samples up to the token budget of batch_size x max_length.
        # Packs are made once (seeded), so a resumed run sees the same micro-batches.
        train_data = packed(train_data, tokens_per_micro_batch(profile, batch_size, cfg.max_length), cfg.seed)
        val_data = packed(val_data, tokens_per_micro_batch(profile, eval_batch_size, cfg.max_length), cfg.seed)
        batch_size = eval_batch_size = 1
    prepared = PreparedData(train_data, val_data, train_stats, val_stats, len(val_records), collator, batch_size,
                            eval_batch_size, profile.packing)
    return model, prepared


# The package each tracker of train.report_to needs (what transformers' integration imports).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "swanlab": "swanlab", "wandb": "wandb"}


def report_targets(report_to: str | list[str]) -> list[str]:
    """TrainingArguments.report_to for `train.report_to`: 'auto' = tensorboard when installed, else none.

    An explicitly named tracker that is not installed is an error here, before the model loads,
    rather than a traceback from transformers at the first step.
    """
    from transformers.integrations import is_tensorboard_available

    if report_to == "auto":
        return ["tensorboard"] if is_tensorboard_available() else []
    targets = [] if report_to == "none" else [report_to] if isinstance(report_to, str) else list(report_to)
    for target in targets:
        installed = is_tensorboard_available() if target == "tensorboard" else importlib.util.find_spec(target) is not None
        if not installed:
            raise FinqloraError(
                f"train.report_to names {target}, but the {TRACKER_PACKAGES[target]} package is not installed",
                hint=f"pip install {TRACKER_PACKAGES[target]}, or set train.report_to: none",
            )
    return targets


def training_arguments(cfg: TrainConfig, plan: Plan, data: PreparedData, output_dir: Path, *, resuming: bool) -> Any:
    """transformers' TrainingArguments for this run."""
    from transformers import TrainingArguments

    step_strategy = cfg.eval_steps is not None
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=data.batch_size,
        per_device_eval_batch_size=data.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=plan.optim,
        bf16=plan.dtype_name == "bf16",
        fp16=plan.dtype_name == "fp16",
        use_cpu=plan.device == "cpu",
        eval_strategy="steps" if step_strategy else "epoch",
        save_strategy="steps" if step_strategy else "epoch",
        eval_steps=cfg.eval_steps,
        eval_on_start=cfg.eval_on_start and not resuming,
        save_steps=cfg.eval_steps or 500,
        save_total_limit=cfg.keep_checkpoints,
        load_best_model_at_end=cfg.load_best_at_end,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach our check, not be averaged away
        # Packed micro-batches hold no padding (and no attention_mask to count it by).
        include_num_input_tokens_seen="all" if data.packing else "non_padding",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_targets(cfg.report_to) or "none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # DDP (torchrun / accelerate launch): every LoRA weight takes part in every forward, so
        # skip DDP's per-step search for unused parameters.
        ddp_find_unused_parameters=False,
    )


def build_trainer(model: Any, tokenizer: Any, args: Any, data: PreparedData, callbacks: Sequence[Any], stop: Any,
                  fingerprint: dict[str, Any]) -> Any:
    """The FinqloraTrainer of this run, with `callbacks` in order and without transformers' printer.

    `fingerprint` is recorded in every checkpoint's marker (finqlora.train.checkpoints).
    """
    from transformers import PrinterCallback

    from finqlora.train.distributed import is_distributed
    from finqlora.train.trainer import FinqloraTrainer

    trainer = FinqloraTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.val,
        data_collator=data.collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        stop=stop,
        # All ranks must stop at the same step boundary (finqlora.train.stopping).
        abandon_within_steps=not is_distributed(),
        fingerprint=fingerprint,
    )
    trainer.remove_callback(PrinterCallback)  # our progress bar and training_log.jsonl replace its prints
    return trainer
