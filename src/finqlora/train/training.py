"""QLoRA / LoRA supervised fine-tuning: one recipe over transformers Trainer + peft.

The recipe, in order:

1. read the instruction JSONL (train on split "train", validate on split "val"; a file without
   splits holds out `val_fraction` of its records, chosen with the run's seed);
2. load the base model through `finqlora.models.loading.load_model(for_training=True)` -- 4-bit NF4 on
   CUDA (QLoRA), full precision on the CPU (plain LoRA: bitsandbytes' CPU 4-bit layers silently
   stop passing gradients after a no-grad forward, so 4-bit training on the CPU is refused);
3. tokenize with `finqlora.core.chat_format.encode_for_training` (the inference chat template, prompt
   labels -100, the answer ends with the template's end-of-turn marker);
4. wrap the model with LoRA adapters (peft) and train with transformers' Trainer: cosine schedule
   with warmup, validation each epoch (and every `eval_steps`), the best checkpoint kept, optional
   early stopping, exact resume (Trainer restores optimizer, scheduler, RNG and data position);
5. write the adapter, tokenizer + chat template, training_info.json, training_log.jsonl, loss.png.

Robustness: Ctrl-C / SIGTERM finish the current step, save a checkpoint and return with
status "interrupted"; every checkpoint gets a completion marker written last, so `auto` resume
skips a half-written one; non-finite loss stops the run with advice; CUDA OOM becomes a
`FinqloraError` that says what to lower; free disk space is checked before every save.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from finqlora.core.config import RunConfig, TrainConfig, dump_config
from finqlora.train.distributed import is_main_process
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_text, sha256_file

CHECKPOINT_MARKER = "finqlora_checkpoint.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_LIBRARIES = ("finqlora", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "safetensors")


# ----------------------------------------------------------------------------- data


@dataclass
class DatasetSplits:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    path: Path
    sha256: str
    total_records: int
    test_records: int
    val_source: str  # "split field" or "held out <fraction> of train"


def read_instruction_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; errors name the file and line."""
    file = Path(path)
    if not file.is_file():
        raise FinqloraError(
            f"dataset not found: {file}",
            hint="build one with `finqlora build --output data/qlora/instructions.jsonl`, or pass --data PATH",
        )
    rows: list[tuple[int, dict[str, Any]]] = []
    with file.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FinqloraError(
                    f"{file}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})",
                    hint="each line must be one JSON object (JSONL); fix or delete that line",
                ) from None
            if not isinstance(record, dict):
                raise FinqloraError(f"{file}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if "messages" not in record and "instruction" not in record:
                raise FinqloraError(
                    f"{file}:{lineno}: record has neither 'instruction' nor 'messages'",
                    hint="records need instruction/input/output (Alpaca) or messages (OpenAI chat) fields",
                )
            answer = _answer_text(record)
            if not answer.strip():
                raise FinqloraError(
                    f"{file}:{lineno}: record {record.get('id', '')!s} has an empty answer ('output' or last assistant message)",
                    hint="training learns the answer; remove records without one",
                )
            split = record.get("split")
            if split is not None and split not in ("train", "val", "test"):
                raise FinqloraError(
                    f"{file}:{lineno}: field 'split' is {split!r}", hint="allowed: 'train', 'val', 'test' (or leave it out)"
                )
            rows.append((lineno, record))
    if not rows:
        raise FinqloraError(f"{file} has no records", hint="build a dataset first with `finqlora build`")
    return rows


def _answer_text(record: Mapping[str, Any]) -> str:
    if "messages" in record:
        messages = record["messages"] or []
        return str(messages[-1].get("content", "")) if messages and messages[-1].get("role") == "assistant" else ""
    return str(record.get("output") or "")


def load_splits(path: str | Path, *, val_fraction: float, seed: int) -> DatasetSplits:
    """Train and validation records of an instruction JSONL (see the module docstring)."""
    rows = read_instruction_jsonl(path)
    records = [record for _, record in rows]
    has_split = any("split" in record for record in records)
    test_records = sum(1 for r in records if r.get("split") == "test")
    if has_split:
        train = [r for r in records if r.get("split") == "train"]
        val = [r for r in records if r.get("split") == "val"]
        val_source = "split field"
        if not train:
            raise FinqloraError(
                f"{path}: no record has split 'train'", hint="rebuild the dataset or remove the split fields"
            )
        if not val:
            train, val = _hold_out(train, val_fraction, seed)
            val_source = f"no 'val' records: held out {val_fraction:g} of train (seed {seed})"
    else:
        train, val = _hold_out(records, val_fraction, seed)
        val_source = f"no split field: held out {val_fraction:g} of the records (seed {seed})"
    if not train:
        raise FinqloraError(f"{path}: too few records to train ({len(records)})", hint="build a larger dataset")
    return DatasetSplits(train, val, Path(path), sha256_file(path), len(records), test_records, val_source)


def _hold_out(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    if len(records) < 2:
        raise FinqloraError("need at least 2 training records to hold one out for validation")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(records) * fraction)), len(records) - 1)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


class EncodedDataset:
    """Tokenized examples (input_ids + labels) as a map-style dataset for the Trainer."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


@dataclass
class EncodingStats:
    examples: int = 0
    trimmed: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0
    max_tokens: int = 0


def encode_records(tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int) -> tuple[EncodedDataset, EncodingStats]:
    from finqlora.core.chat_format import encode_for_training

    stats = EncodingStats()
    examples = []
    for record in records:
        encoded = encode_for_training(tokenizer, record, max_length)
        examples.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
        stats.examples += 1
        stats.trimmed += int(encoded.trimmed)
        stats.prompt_tokens += encoded.prompt_tokens
        stats.answer_tokens += encoded.answer_tokens
        stats.max_tokens = max(stats.max_tokens, len(encoded.input_ids))
    return EncodedDataset(examples), stats


def padding_collator(pad_token_id: int):
    """Right-pad a batch: pad ids in input_ids, -100 in labels, 0 in attention_mask."""
    import torch

    def collate(features: list[dict[str, list[int]]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids, labels, attention = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            input_ids.append(f["input_ids"] + [pad_token_id] * pad)
            labels.append(f["labels"] + [-100] * pad)
            attention.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
        }

    return collate


def _packed(data: EncodedDataset, token_budget: int, seed: int) -> EncodedDataset:
    from finqlora.train.speedups import pack_by_token_budget

    packs = pack_by_token_budget([len(e["input_ids"]) for e in data.examples], token_budget, seed=seed)
    return EncodedDataset([{"pack": [data.examples[i] for i in pack]} for pack in packs])


def speedups_profile_dict(profile: Any) -> dict[str, Any]:
    from finqlora.train.speedups import profile_as_dict

    return profile_as_dict(profile)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_is_complete(folder: Path) -> bool:
    """A checkpoint counts once its marker exists and every file it lists has its recorded size."""
    marker = folder / CHECKPOINT_MARKER
    try:
        listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in listed.items())


def write_checkpoint_marker(folder: Path, step: int) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKPOINT_MARKER}
    atomic_write_json(folder / CHECKPOINT_MARKER, {"step": step, "files": files, "written_at": _now()})


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[Path]]:
    """(latest complete checkpoint or None, incomplete checkpoint folders newer than it)."""
    incomplete: list[Path] = []
    for _, folder in reversed(list_checkpoints(Path(output_dir))):
        if checkpoint_is_complete(folder):
            return folder, incomplete
        incomplete.append(folder)
    return None, incomplete


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse to start a save that cannot fit (a half-written checkpoint helps nobody)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise FinqloraError(
            f"not enough free disk space in {probe}: {free / 2**20:.0f} MiB free, a checkpoint needs about "
            f"{needed_bytes / 2**20:.0f} MiB",
            hint="free some space, point --output-dir at a larger disk, or lower train.keep_checkpoints",
        )


# ----------------------------------------------------------------------------- results


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


# ----------------------------------------------------------------------------- model


@dataclass
class _Plan:
    """What the config resolves to on this machine."""

    device: str
    dtype_name: str  # "bf16" | "fp16" | "fp32"
    load_in_4bit: bool
    gradient_checkpointing: bool
    optim: str


def resolve_plan(cfg: TrainConfig, profile: Any | None = None) -> _Plan:
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
    return _Plan(device, dtype_name, load_in_4bit, gc, optim)


def _load_base(cfg: TrainConfig, plan: _Plan) -> tuple[Any, Any, dict[str, Any]]:
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
    return loaded.model, loaded.tokenizer, _model_identity(loaded.resolved, describe_model(loaded.resolved))


def _model_identity(resolved: Any, described: Mapping[str, Any]) -> dict[str, Any]:
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


def _attach_lora(model: Any, cfg: TrainConfig, plan: _Plan, profile: Any | None) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    upcast = getattr(profile, "upcast_frozen_to_fp32", True)
    if plan.load_in_4bit and upcast:
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


def _speed_profile(cfg: TrainConfig) -> Any | None:
    """The speed engineer's profile, when finqlora.train.speedups exists in this checkout."""
    if importlib.util.find_spec("finqlora.train.speedups") is None:
        if cfg.profile != "default":
            raise FinqloraError(f"train.profile {cfg.profile!r} needs finqlora.train.speedups, which is not installed")
        return None
    from finqlora.train import speedups

    return speedups.get_profile(cfg.profile)


# ----------------------------------------------------------------------------- callbacks


class _StopRequest:
    """Set by SIGINT/SIGTERM; the training loop checks it after every step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name} received: finishing this step, saving a checkpoint, then exiting "
            "(press Ctrl-C again to stop at once without saving)",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def _signals_handled(stop: _StopRequest) -> Iterator[None]:
    previous = {}
    can_install = threading_main()
    if can_install:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _make_callbacks(cfg: TrainConfig, output_dir: Path, stop: _StopRequest, needed_bytes: int, progress: bool):
    from transformers import TrainerCallback

    from finqlora.train.distributed import any_rank

    class RunControl(TrainerCallback):
        """Signals, final validation, non-finite loss and the disk check before saves."""

        def __init__(self) -> None:
            self.nonfinite: dict[str, Any] | None = None
            self.last_eval_step = -1
            self.last_save_step = -1

        def on_step_end(self, args, state, control, **kwargs):
            # All processes must stop at the same step, or the next gradient all-reduce hangs.
            if any_rank(stop.signal_name is not None):
                stop.signal_name = stop.signal_name or "SIGTERM"  # a peer process got the signal
                control.should_save = True
                control.should_training_stop = True
            if control.should_save and args.should_save:
                check_free_space(output_dir, needed_bytes)
            return control

        def on_evaluate(self, args, state, control, **kwargs):
            self.last_eval_step = state.global_step

        def on_save(self, args, state, control, **kwargs):
            self.last_save_step = state.global_step

        def on_epoch_end(self, args, state, control, **kwargs):
            # Trainer calls this also when a run stops early (max_steps, a signal, early stopping):
            # each epoch end and the last step get a val loss and a checkpoint, once.
            if stop.signal_name is not None or self.nonfinite is not None:
                # Already checkpointed at the step (signal), or weights are broken (non-finite):
                # overrule the epoch-end eval/save that Trainer's default flow just asked for.
                control.should_evaluate = control.should_save = False
                return control
            control.should_evaluate = state.global_step != self.last_eval_step
            control.should_save = state.global_step != self.last_save_step
            if control.should_save and args.should_save:
                check_free_space(output_dir, needed_bytes)
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

    class JsonlLog(TrainerCallback):
        """training_log.jsonl: one line per logged step (loss, lr, grad norm, tokens/s) and per validation."""

        def __init__(self) -> None:
            self.path = output_dir / "training_log.jsonl"
            self.last_time: float | None = None
            self.last_tokens = 0
            self.epoch_started: float | None = None
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
            row["time"] = _now()
            if args.should_save:
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")

        @property
        def tokens_per_second(self) -> float | None:
            return self.tokens_trained / self.seconds_trained if self.seconds_trained > 0 else None

    class RichProgress(TrainerCallback):
        """A rich progress bar: step, loss, val loss, tokens/s, ETA."""

        def __init__(self, log: JsonlLog) -> None:
            self.log = log
            self.progress = None
            self.task = None
            self.last_loss = float("nan")
            self.last_val = float("nan")

        def on_train_begin(self, args, state, control, **kwargs):
            if not (progress and args.should_save):
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

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self) -> None:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    control = RunControl()
    log = JsonlLog()
    bar = RichProgress(log)
    return control, log, bar


def _trainer_class():
    from transformers import Trainer

    from finqlora.train.distributed import barrier

    class CheckpointMarkingTrainer(Trainer):
        """Trainer whose checkpoints end with a completion marker (see `checkpoint_is_complete`)."""

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            # Other processes write their own rng_state_<rank>.pth into the folder: the marker
            # (which lists the files) must come after every process is done.
            barrier()
            if self.args.should_save:
                folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
                write_checkpoint_marker(folder, self.state.global_step)

    return CheckpointMarkingTrainer


# ----------------------------------------------------------------------------- the run


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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


def _process_cpu_seconds() -> float:
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


def _oom_error(cfg: TrainConfig, plan: _Plan) -> FinqloraError:
    advice = [f"lower train.batch_size (now {cfg.batch_size}) and raise train.gradient_accumulation_steps to keep the effective batch"]
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


def _nonfinite_error(event: Mapping[str, Any], plan: _Plan, cfg: TrainConfig) -> FinqloraError:
    advice = [f"lower train.learning_rate (now {cfg.learning_rate:g})", f"keep train.max_grad_norm small (now {cfg.max_grad_norm:g})"]
    if plan.dtype_name == "fp16":
        advice.insert(0, "fp16 overflows easily: use compute_dtype: bf16 on GPUs that support it (A100/H100/RTX 30+) or fp32")
    return FinqloraError(
        f"training stopped: {event['key']} became {event['value']} at step {event['step']}",
        hint="; ".join(advice) + ". The last complete checkpoint is kept; resume after changing the config.",
    )


def _resolve_resume(cfg: TrainConfig, output_dir: Path) -> Path | None:
    spec = cfg.resume_from_checkpoint
    if spec is None:
        return None
    if spec == "auto":
        latest, incomplete = find_latest_checkpoint(output_dir)
        for folder in incomplete if is_main_process() else ():  # one process cleans up, not all
            # A checkpoint without its completion marker was interrupted mid-save: unusable.
            print(f"skipping incomplete checkpoint {folder} (no completion marker); removing it", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
        if latest is None:
            print(f"no complete checkpoint in {output_dir}: starting from scratch", file=sys.stderr)
        return latest
    folder = Path(spec)
    if not (folder / "trainer_state.json").is_file():
        raise FinqloraError(
            f"{folder} is not a training checkpoint (no trainer_state.json)",
            hint="pass a checkpoint-N folder of an earlier run, or 'auto' for the latest complete one",
        )
    if (folder / CHECKPOINT_MARKER).exists() and not checkpoint_is_complete(folder):
        raise FinqloraError(f"{folder} is incomplete (a file is missing or truncated)", hint="use --resume_from_checkpoint auto")
    return folder


def train(
    config: TrainConfig | RunConfig,
    *,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> TrainResult:
    """Fine-tune `config.model` on `config.dataset` and write the outputs to `config.output_dir`.

    `callbacks` are extra `transformers.TrainerCallback`s (run before finqlora's own). Returns
    with status "interrupted" after SIGINT/SIGTERM (a checkpoint is saved); raises
    `FinqloraError` for problems the user can fix.
    """
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback, TrainingArguments, set_seed

    run = config if isinstance(config, RunConfig) else RunConfig(train=config)
    cfg = run.train
    if cfg.dataset is None:
        raise FinqloraError("no training data given", hint="pass --data PATH.jsonl or set train.dataset in the config")
    if cfg.early_stopping_patience is not None and not cfg.load_best_at_end:
        raise FinqloraError("train.early_stopping_patience needs train.load_best_at_end: true")
    output_dir = Path(cfg.output_dir or Path("runs") / run.name)
    profile = _speed_profile(cfg)
    plan = resolve_plan(cfg, profile)
    splits = load_splits(cfg.dataset, val_fraction=cfg.val_fraction, seed=cfg.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = _resolve_resume(cfg, output_dir)
    started_at = _now()
    t0 = time.perf_counter()

    set_seed(cfg.seed)
    model, tokenizer, base_identity = _load_base(cfg, plan)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions carry label -100 and mask 0
    model = _attach_lora(model, cfg, plan, profile)
    trainable, total = model.get_nb_trainable_parameters()
    train_data, train_stats = encode_records(tokenizer, splits.train, cfg.max_length)
    val_records = splits.val[: cfg.max_val_samples] if cfg.max_val_samples else splits.val
    val_data, val_stats = encode_records(tokenizer, val_records, cfg.max_length)
    batch_size, eval_batch_size = cfg.batch_size, cfg.eval_batch_size or cfg.batch_size
    packing = bool(getattr(profile, "packing", False))
    if profile is not None:
        from finqlora.train import speedups

        model = speedups.apply_model_speedups(model, profile)
        collator = speedups.make_data_collator(tokenizer, profile,
                                               attn_implementation=speedups.attention_implementation(model))
        if packing:
            # One micro-batch = one pack of samples up to the token budget of batch_size x max_length.
            # Packs are made once (seeded), so a resumed run sees the same micro-batches.
            train_data = _packed(train_data, speedups.tokens_per_micro_batch(profile, batch_size, cfg.max_length), cfg.seed)
            val_data = _packed(val_data, speedups.tokens_per_micro_batch(profile, eval_batch_size, cfg.max_length), cfg.seed)
            batch_size = eval_batch_size = 1
    else:
        collator = padding_collator(tokenizer.pad_token_id)
    load_seconds = time.perf_counter() - t0

    # Adapter + two AdamW moments in fp32, plus room for the tokenizer and states.
    needed_bytes = trainable * 4 * 3 + 64 * 2**20
    check_free_space(output_dir, needed_bytes)
    stop = _StopRequest()
    control_cb, log_cb, progress_cb = _make_callbacks(cfg, output_dir, stop, needed_bytes, progress)
    step_strategy = cfg.eval_steps is not None
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size,
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
        eval_on_start=cfg.eval_on_start and resume_from is None,
        save_steps=cfg.eval_steps or 500,
        save_total_limit=cfg.keep_checkpoints,
        load_best_model_at_end=cfg.load_best_at_end,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach our check, not be averaged away
        # Packed micro-batches hold no padding (and no attention_mask to count it by).
        include_num_input_tokens_seen="all" if packing else "non_padding",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # DDP (torchrun / accelerate launch): every LoRA weight takes part in every forward, so
        # skip DDP's per-step search for unused parameters.
        ddp_find_unused_parameters=False,
    )
    # Extra callbacks run first, so one that raises a signal at step N is seen at that same step.
    trainer_callbacks = [*callbacks, control_cb, log_cb, progress_cb]
    if cfg.early_stopping_patience is not None:
        trainer_callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold))
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=trainer_callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # our progress bar and training_log.jsonl replace its prints
    train_started = time.perf_counter()
    try:
        with _signals_handled(stop):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError:
        raise _oom_error(cfg, plan) from None
    finally:
        progress_cb.close()
    train_seconds = time.perf_counter() - train_started

    state = trainer.state
    train_points = [(e["step"], float(e["loss"])) for e in state.log_history if "loss" in e]
    val_points = [(e["step"], float(e["eval_loss"])) for e in state.log_history if "eval_loss" in e]
    best_step = state.best_global_step
    status = "interrupted" if stop.signal_name else "completed"
    if control_cb.nonfinite is not None:
        status = "failed: non-finite loss"

    info = {
        "finqlora_training_info_version": 1,
        "name": run.name,
        "status": status,
        "interrupted_by": stop.signal_name,
        "started_at": started_at,
        "finished_at": _now(),
        "config": run.model_dump(mode="json"),
        "hyperparameters": {
            **cfg.model_dump(mode="json"),
            "effective_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * max(args.world_size, 1),
            "resolved_device": plan.device,
            "resolved_compute_dtype": plan.dtype_name,
            "resolved_load_in_4bit": plan.load_in_4bit,
            "resolved_gradient_checkpointing": plan.gradient_checkpointing,
            "resolved_optim": plan.optim,
            "speed_profile": speedups_profile_dict(profile) if profile is not None else {"name": cfg.profile},
            "packed_micro_batches": packing,
            "world_size": args.world_size,
        },
        "base_model": base_identity,
        "dataset": {
            "path": str(splits.path.resolve()),
            "sha256": splits.sha256,
            "records": splits.total_records,
            "train_records": len(splits.train),
            "val_records": len(splits.val),
            "val_records_used": len(val_records),
            "test_records_ignored": splits.test_records,
            "val_source": splits.val_source,
            "train_tokens": {"prompt": train_stats.prompt_tokens, "answer": train_stats.answer_tokens, "max_per_sample": train_stats.max_tokens},
            "trimmed_to_max_length": {"train": train_stats.trimmed, "val": val_stats.trimmed},
        },
        "parameters": {"trainable": int(trainable), "total": int(total), "trainable_percent": round(100 * trainable / total, 4)},
        "libraries": library_versions(),
        "device": device_description(plan.device),
        "resumed_from": str(resume_from) if resume_from else None,
        "timing": {
            "load_and_tokenize_seconds": round(load_seconds, 2),
            "train_seconds": round(train_seconds, 2),
            # CPU time of this process (all threads): on a busy shared machine, CPU seconds / cores
            # estimates the wall time the run would take alone.
            "process_cpu_seconds": round(_process_cpu_seconds(), 1),
            "epochs": log_cb.epoch_times,
        },
        "throughput": {
            "tokens_per_second": round(log_cb.tokens_per_second, 2) if log_cb.tokens_per_second else None,
            "non_padding_tokens_seen": int(state.num_input_tokens_seen),
        },
        "memory": peak_memory(plan.device),
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "epochs_completed": round(state.epoch or 0.0, 4),
        "train_losses": [{"step": s, "loss": v} for s, v in train_points],
        "val_losses": [{"step": s, "loss": v} for s, v in val_points],
        "best_step": best_step,
        "best_val_loss": state.best_metric,
        "best_checkpoint": state.best_model_checkpoint,
        "adapter_is": "best checkpoint by val loss" if cfg.load_best_at_end and best_step else "last step",
        "nonfinite": control_cb.nonfinite,
    }

    # With several processes (torchrun / accelerate launch) only rank 0 writes the outputs.
    if status == "completed" and args.should_save:
        check_free_space(output_dir, needed_bytes)
        trainer.model.save_pretrained(output_dir, safe_serialization=True)
        if cfg.save_adapter_bin:
            trainer.model.save_pretrained(output_dir / "_bin", safe_serialization=False)
            os.replace(output_dir / "_bin" / "adapter_model.bin", output_dir / "adapter_model.bin")
            shutil.rmtree(output_dir / "_bin", ignore_errors=True)
        tokenizer.save_pretrained(output_dir)
        info["outputs"] = sorted(p.name for p in output_dir.iterdir() if not p.name.startswith("."))
    if args.should_save:
        atomic_write_text(output_dir / "run_config.yaml", dump_config(run))
        from finqlora.core.loss_plot import plot_losses

        plot_losses(train_points, val_points, output_dir / "loss.png", title=f"{run.name}: loss", best_step=best_step)
        info["outputs"] = sorted({*info.get("outputs", []), "loss.png", "run_config.yaml", "training_info.json", "training_log.jsonl"})
        atomic_write_json(output_dir / "training_info.json", info)
    # Keep the group together until rank 0 has written: a launcher that sees one process exit
    # may stop the others.
    from finqlora.train.distributed import barrier

    barrier()

    if control_cb.nonfinite is not None:
        raise _nonfinite_error(control_cb.nonfinite, plan, cfg)
    return TrainResult(
        output_dir=output_dir,
        status=status,
        global_step=state.global_step,
        best_step=best_step,
        best_val_loss=state.best_metric,
        final_train_loss=train_points[-1][1] if train_points else None,
        info=info,
    )
