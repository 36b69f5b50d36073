"""Run configuration: one YAML file names everything a run needs.

A run config has a `name` and three sections that the pipeline stages read:

- `data`  (`DataConfig`)  -- how `finqlora build` makes the instruction dataset;
- `train` (`TrainConfig`) -- how `finqlora train` fine-tunes (QLoRA on a GPU, LoRA on the CPU);
- `eval`  (`EvalConfig`)  -- how `finqlora eval` compares the base and the fine-tuned model.

Every field has a default, so `name: x` alone is a valid file. Unknown keys and bad values are
refused with the file, the dotted key, what was given and what is allowed. `--set key=value`
overrides any field (`train.learning_rate=1e-4`, or just `learning_rate=1e-4` when the key
name belongs to one section only); values are parsed as YAML, so `3`, `1e-4`, `true`,
`null` and `[q_proj, v_proj]` mean what they look like.
"""

from __future__ import annotations

import difflib
import math
import reprlib
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finqlora.core.errors import FinqloraError
from finqlora.core.safe_input import YAMLLimitError, yaml_load
from finqlora.core.profiles import PROFILE_NAMES

# Defaults that several stages share, declared once (the schema's fields and the options of
# generation, serving and chat read them from here).
MAX_NEW_TOKENS = 256
# Shortest train.max_length: below it a record's prompt template alone does not fit, so the
# dataset builder and training refuse it with this one bound.
MIN_MAX_LENGTH = 64
# Names users know from Hugging Face, LLaMA-Factory or other tools, for did-you-mean hints
# (`--set train.lr=...` -> learning_rate). They are not accepted as keys: one name per setting.
KEY_SYNONYMS: dict[str, str] = {
    "lr": "learning_rate", "epochs": "num_epochs", "num_train_epochs": "num_epochs", "lora_rank": "lora_r", "r": "lora_r",
    "cutoff_len": "max_length", "per_device_train_batch_size": "batch_size", "lr_scheduler_type": "lr_scheduler",
    "optimizer": "optim", "per_device_eval_batch_size": "eval_batch_size", "model_name_or_path": "model",
    "lora_target": "target_modules", "max_prompts": "max_samples", "max_items": "limit", "output_format": "format",
}


# Keys renamed to the names `finqlora eval` and its Python options use; the old names keep
# working for one more release (in files and in --set) with a FutureWarning.
RENAMED_KEYS: dict[str, dict[str, str]] = {"eval": {"max_prompts": "max_samples"}, "eval.benchmarks[]": {"max_items": "limit"}}


def _renamed(section: str, renames: dict[str, str], value: Any) -> Any:
    """Old key names keep working for one more release, with a FutureWarning naming the new key."""
    if not isinstance(value, dict):
        return value
    value = dict(value)
    for old, new in renames.items():
        if old in value:
            warnings.warn(f"{section}.{old} is deprecated: write {section}.{new}", FutureWarning, stacklevel=2)
            if new in value:
                raise ValueError(f"both {old} (deprecated) and {new} are set; keep {new}")
            value[new] = value.pop(old)
    return value


def _shares(value: Any) -> Any:
    """'60,20,20' (or '0.6/0.2/0.2', or a list) -> three shares; other values go to validation as given."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").replace("/", ",").split(",") if p]
        try:
            value = tuple(float(p) for p in parts)
        except ValueError:
            raise ValueError(f"expects three comma-separated numbers such as 60,20,20, got {value!r}") from None
    if isinstance(value, list | tuple) and len(value) != 3:
        raise ValueError(f"expects three numbers such as 60,20,20, got {len(value)}")
    return value


def _check_shares(parts: tuple[float, ...]) -> tuple[float, ...]:
    if any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise ValueError(f"needs three non-negative numbers with a positive sum such as 60,20,20, got {list(parts)}")
    return parts


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default. No float
    # setting has a meaning at inf or nan (`learning_rate: .inf` would train on NaNs).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AddDatasetConfig(_Section):
    """One public data set mixed into the build (`finqlora build --add-dataset`)."""

    path: str = Field(..., min_length=1, description="file or folder of the public set, in its published format")
    format: Literal["finfe", "finfe-choice", "cfbenchmark", "fpb", "disc", "alpaca", "sharegpt"] = Field(..., description="the set's format (docs/dataset.md)")
    samples: int | None = Field(None, ge=1, description="seeded sample of this many rows (null = all)")


class DataConfig(_Section):
    """Dataset build (`finqlora build`, and the pipeline's build stage): every option of the builder."""

    db: str = Field("sample", description="path to a finqlora.store.db store, or 'sample' for the built-in synthetic sample DB")
    output: str = Field(
        "data/qlora/instructions.jsonl",
        description="dataset file of `finqlora build` (JSONL; card and stats beside it); `finqlora run` writes into the run folder",
    )
    templates_only: bool = Field(False, description="ignore the database and build from the built-in instruction templates only")
    num_samples: int = Field(300, ge=1, description="number of instruction records to build")
    mix: tuple[float, float, float] = Field((60.0, 20.0, 20.0), description="shares of news_impact, market_analysis, report_qa (e.g. 60,20,20)")
    split: tuple[float, float, float] = Field((80.0, 10.0, 10.0), description="shares of train, val, test, by event time (e.g. 80,10,10)")
    seed: int = Field(0, description="sampling and split seed (same seed + same DB = same dataset)")
    format: Literal["alpaca", "messages", "sharegpt"] = Field(
        "alpaca",
        description="record layout: alpaca (instruction/input/output), messages (OpenAI chat) or sharegpt (conversations); "
        "a LLaMA-Factory dataset_info.json is written beside the file",
    )
    tokenizer: str | None = Field(
        None, description="tokenizer that measures lengths for trimming (null = train.model's; 'chars' = a character estimate)"
    )
    primary_window: int = Field(15, ge=1, description="post-event window (minutes) whose return sets the direction label")
    primary_ticker: str | None = Field(
        None, description="ticker whose direction is the main label (null = XAUUSD if present, else the one with most returns)"
    )
    threshold_k: float = Field(0.5, gt=0, description="direction threshold = k x robust volatility of the ticker at the window")
    dedup_threshold: float = Field(0.7, gt=0, le=1, description="3-gram Jaccard similarity at which two news texts are near-duplicates")
    embargo_min: int = Field(120, ge=0, description="leave out events this many minutes after a split boundary")
    tz: str | None = Field(None, description="zone of a user database's time column written without one (e.g. Asia/Shanghai)")
    add: list[AddDatasetConfig] = Field(default_factory=list, description="public data sets mixed in (records of type public_data)")
    decontaminate: list[str] = Field(
        default_factory=list,
        description="evaluation files whose items no record may duplicate (eval.benchmarks are added automatically)",
    )
    teacher: str | None = Field(
        None, description="teacher for richer news-impact analyses: deepseek, kimi, openai, local, or an OpenAI-compatible URL"
    )
    teacher_model: str | None = Field(None, description="the teacher's model (null = the provider's, e.g. deepseek-chat)")
    teacher_cache: str | None = Field(None, description="teacher answer cache (null = <output>.teacher_cache.jsonl)")
    teacher_concurrency: int = Field(4, ge=1, le=64, description="teacher requests in flight at once")
    teacher_max_tokens: int = Field(800, ge=16, description="longest teacher answer, in tokens")

    @field_validator("mix", "split", mode="before")
    @classmethod
    def _shares_text(cls, value: Any) -> Any:
        return _shares(value)

    @field_validator("mix", "split")
    @classmethod
    def _positive_shares(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        return _check_shares(value)  # type: ignore[return-value]

    @field_validator("split")
    @classmethod
    def _train_share(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if value[0] <= 0:
            raise ValueError("the train share must be positive, e.g. 80,10,10")
        return value


class TrainConfig(_Section):
    """Fine-tuning (`finqlora train`). Defaults are the standard QLoRA recipe."""

    model: str = Field(
        "builtin:qwen2.5-coder-0.5b-instruct",
        description="base model: hub id, local folder, .gguf file or builtin:<name>",
    )
    dataset: str | None = Field(None, description="instruction JSONL (records with split train/val/test); CLI --data")
    output_dir: str | None = Field(None, description="output folder (default: runs/<name>); CLI --output-dir")
    resume_from_checkpoint: str | None = Field(
        None, description="'auto' (latest complete checkpoint in output_dir) or a checkpoint-N folder"
    )
    profile: str = Field("default", description="speed profile: " + ", ".join(PROFILE_NAMES) + " (docs/performance.md)")

    # Hardware and precision.
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu")
    load_in_4bit: bool | None = Field(None, description="4-bit NF4 base (QLoRA); null = on with CUDA, off on CPU")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, fp16 on older GPUs (T4), fp32 on CPU"
    )
    gradient_checkpointing: bool | None = Field(None, description="null = on with CUDA, off on CPU")

    # LoRA.
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' (every linear layer of the blocks, not lm_head) or a list of names"
    )
    lora_layers: int | None = Field(
        None,
        ge=1,
        description="LoRA only in the last N transformer blocks (null = all); backpropagation then stops at the "
        "lowest adapted block, which roughly halves CPU training time with N = a quarter of the blocks",
    )

    # Schedule.
    num_epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimizer steps; -1 = run num_epochs")
    batch_size: int = Field(4, ge=1, description="per-device batch size")
    gradient_accumulation_steps: int = Field(1, ge=1)
    eval_batch_size: int | None = Field(None, ge=1, description="null = batch_size")
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="fraction of steps spent warming up")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: Literal["auto", "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused",
                   "adafactor"] = Field(
        "auto", description="auto = the speed profile's choice, else paged_adamw_8bit on CUDA, adamw_torch on CPU"
    )
    max_length: int = Field(512, ge=MIN_MAX_LENGTH, description="tokens per sample; longer prompts are cut in the middle")
    seed: int = 0

    # Validation, checkpoints, logging.
    val_fraction: float = Field(
        0.1, gt=0.0, lt=0.5, description="held out for validation when the dataset has no 'split' field"
    )
    max_val_samples: int | None = Field(
        None, ge=1, description="validate on the first N val records only (a cheaper estimate on slow machines); null = all"
    )
    eval_on_start: bool = Field(False, description="also measure the val loss before the first step (a baseline)")
    eval_steps: int | None = Field(
        None, ge=1, description="also validate (and checkpoint) every N steps; validation always runs each epoch"
    )
    keep_checkpoints: int = Field(
        2, ge=2, description="checkpoint-N folders kept (plus the best); >= 2 so a crash mid-save leaves a complete one"
    )
    load_best_at_end: bool = Field(True, description="the saved adapter is the checkpoint with the lowest val loss")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after N validations without improvement")
    early_stopping_threshold: float = Field(0.0, ge=0.0)
    logging_steps: int = Field(1, ge=1)
    report_to: Literal["auto", "none", "tensorboard", "swanlab", "wandb"] | list[Literal["tensorboard", "swanlab", "wandb"]] = Field(
        "auto",
        description="experiment trackers that get the logged losses (TrainingArguments.report_to): 'auto' = "
        "tensorboard when the tensorboard (or tensorboardX) package is installed, else none; or tensorboard, "
        "swanlab, wandb, none, or a list of trackers; event files go to <output_dir>/runs/",
    )
    save_adapter_bin: bool = Field(False, description="also write adapter_model.bin (for tools that need it)")
    chat_template: str | None = Field(None, description="'chatml' fallback for models without a chat template")
    trust_remote_code: bool = False

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            raise ValueError("must be 'all-linear' or a list of module names such as [q_proj, v_proj]")
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module")
        return value

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str) -> str:
        # Checked here so a misspelled profile fails at load, not when training starts hours later.
        key = value.strip().lower()
        if key not in PROFILE_NAMES:
            close = difflib.get_close_matches(key, PROFILE_NAMES, n=1)
            guess = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown speed profile; {guess}known: {', '.join(PROFILE_NAMES)}")
        return key

    @field_validator("resume_from_checkpoint")
    @classmethod
    def _resume(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            return None
        return value


BENCHMARK_FORMATS = ("finfe", "cfbenchmark", "fpb", "jsonl", "fineval", "ceval", "cflue")  # finqlora.evaluate.benchmarks reads these


def split_benchmark_string(entry: str) -> dict[str, str]:
    """`FORMAT:PATH` -> {"format", "path"} (ValueError naming the allowed formats otherwise)."""
    fmt, colon, path = entry.partition(":")
    if not colon or fmt not in BENCHMARK_FORMATS or not path:
        raise ValueError(
            f"benchmark {entry!r} is not FORMAT:PATH with FORMAT one of {', '.join(BENCHMARK_FORMATS)} "
            "(or write a mapping with path and format)"
        )
    return {"format": fmt, "path": path}


class BenchmarkConfig(_Section):
    """One external benchmark of `eval.benchmarks` (docs/evaluation.md).

    Written as a mapping `{path, format, label_map, split, limit}` or as the string
    `FORMAT:PATH` (e.g. `finfe:../shared/data/benchmarks/finfe/train_list.json`).
    """

    path: str = Field(..., min_length=1, description="benchmark file or folder")
    format: Literal[BENCHMARK_FORMATS] = Field(..., description="its published format")  # type: ignore[valid-type]
    label_map: str | None = Field(None, description='raw label -> class, e.g. "0=利空,1=中性,2=利好" (default: the format\'s own)')
    split: str | None = Field(None, description="split of a CFBenchmark datasets folder")
    limit: int | None = Field(None, ge=1, description="score a seeded random sample of this many rows (null = all)")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, value: Any) -> Any:
        return _renamed("eval.benchmarks[]", RENAMED_KEYS["eval.benchmarks[]"], value)


SUITE_NAMES = ("finance-zh",)  # finqlora.evaluate.suite defines their sets


class SuiteConfig(_Section):
    """`eval.suite`: a named suite of public sets (docs/evaluation.md), each at a local copy or `hf:ID`."""

    name: Literal[SUITE_NAMES] = Field("finance-zh", description="the suite (finqlora.evaluate.suite.SUITES)")  # type: ignore[valid-type]
    sets: dict[str, str] = Field(..., min_length=1, description="set name -> local path in its published format, or hf:DATASET_ID[@SPLIT]")
    max_items: int | None = Field(None, ge=1, description="score a seeded random sample of this many items per set (null = all)")


class EvalConfig(_Section):
    """Before/after evaluation (`finqlora eval`), read by the pipeline."""

    max_samples: int = Field(50, ge=1, description="test-split prompts evaluated (a seeded sample, stratified by record type)")
    split: str = Field("test", min_length=1, description="which split of the dataset is evaluated (all records if the file has no splits)")
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1, description="generation length limit (same for both models)")
    batch_size: int = Field(8, ge=1)
    choice_batch_size: int = Field(16, ge=1, description="closed-option items scored together (choice scoring)")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    benchmarks: list[BenchmarkConfig] = Field(default_factory=list, description="external benchmarks scored in the eval stages")
    suite: SuiteConfig | None = Field(None, description="a suite of public finance sets scored by choice in the eval stages (null = none)")
    scoring: Literal["choice", "generate", "both"] = Field(
        "both", description="closed-option tasks: option log-likelihood (choice), parsed answers (generate), or both"
    )
    showcase_samples: int = Field(
        2, ge=0, description="under scoring=choice: closed-label items per task also generated, as example answers and for the repetition rate"
    )
    repetition_penalty: float = Field(
        1.1, gt=0, description="generation: divides the logits of tokens already in the answer (1.0 = off); curbs loops"
    )
    no_repeat_ngram_size: int = Field(
        6, ge=0, description="generation: no n-gram of this many tokens may occur twice in an answer (0 = off)"
    )
    report_lang: Literal["zh", "en"] = Field("zh", description="language of report.html / report.md (`finqlora report --lang`)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling (only with temperature > 0)")
    seed: int = Field(0, description="seed of the prompt sample, the bootstrap and the report's examples")
    perplexity: bool = Field(True, description="perplexity of the reference answers")
    forgetting: bool = Field(True, description="perplexity on the shipped general-domain text (forgetting)")
    merge_adapter: bool = Field(True, description="merge the adapter into unquantized weights for the fine-tuned work (base speed, same logits)")
    bootstrap_resamples: int = Field(1000, ge=100, description="bootstrap resamples for the confidence intervals")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, value: Any) -> Any:
        return _renamed("eval", RENAMED_KEYS["eval"], value)

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _benchmark_strings(cls, value: Any) -> Any:
        """`FORMAT:PATH` strings become mappings; the mapping form passes through."""
        if not isinstance(value, list):
            return value
        return [split_benchmark_string(entry) if isinstance(entry, str) else entry for entry in value]


class ServeConfig(_Section):
    """The OpenAI-compatible server (`finqlora serve`); the model is train.model, loaded as train.load_in_4bit and train.chat_template say."""

    adapters: list[str] = Field(default_factory=list, description="NAME=PATH of each LoRA adapter served (clients select it with model=NAME)")
    base_name: str = Field("base", min_length=1, description="the `model` name that selects the plain base model")
    host: str = Field("127.0.0.1", description="interface to bind; keep the default unless the API must be reachable from other machines")
    port: int = Field(8000, ge=1, le=65535)
    engine: Literal["native", "vllm"] = Field("native", description="native (this process, dynamic batching) or vllm (exec vLLM's OpenAI server)")
    max_batch_size: int = Field(8, ge=1, description="requests decoded together in one batch")
    max_queue: int = Field(64, ge=1, description="requests allowed to wait; more are answered 429 with Retry-After")
    batch_window_ms: float = Field(10.0, ge=0, description="how long the oldest request waits for others to batch with")
    max_prompt_tokens: int = Field(2048, ge=1, description="longest prompt accepted (longer: 400 context_length_exceeded)")
    max_tokens: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(MAX_NEW_TOKENS, ge=1, description="max_tokens when a request does not set it")
    request_timeout: float = Field(300.0, ge=1, description="seconds a request may take (queue + generation) before a 504")
    max_prompt_chars: int | None = Field(None, ge=1, description="longest prompt text in characters, checked before tokenizing (null = 16 x max_prompt_tokens)")
    max_body_bytes: int = Field(1024 * 1024, ge=1, description="largest request body accepted (larger: 413, before any parsing)")
    body_timeout: float = Field(30.0, ge=0.1, description="seconds a request's body may take to arrive (later: 408)")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (null = torch's choice)")


class RunConfig(_Section):
    """One run: dataset build, training and evaluation, repeatable from this file alone."""

    name: str = Field("finqlora-run", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _default_output_dir(self) -> RunConfig:
        if self.train.output_dir is None:
            self.train.output_dir = str(Path("runs") / self.name)
        return self


SECTIONS: dict[str, type[_Section]] = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "serve": ServeConfig}


def _allowed_values(section: type[_Section], key: str) -> str | None:
    """Human-readable allowed values of a field with a fixed choice, else None."""
    field = section.model_fields.get(key)
    if field is None:
        return None
    for arg in (field.annotation, *typing.get_args(field.annotation)):
        if typing.get_origin(arg) is Literal:
            return ", ".join(repr(v) for v in typing.get_args(arg))
    return None


def _unknown_key_hint(section_name: str | None, key: str) -> str:
    fields = list(SECTIONS[section_name].model_fields) if section_name else ["name", *SECTIONS]
    candidates = fields if section_name else fields + [f"{n}.{k}" for n, s in SECTIONS.items() for k in s.model_fields]
    synonym = KEY_SYNONYMS.get(key)
    known = [c for c in candidates if synonym and c.split(".")[-1] == synonym]
    close = known[:1] or difflib.get_close_matches(key, candidates, n=1) or difflib.get_close_matches(
        key, [c.split(".")[-1] for c in candidates], n=1
    )
    where = f"section '{section_name}'" if section_name else "the top level"
    guess = f"did you mean '{close[0]}'? " if close else ""
    return f"{guess}keys allowed in {where}: {', '.join(fields)}"


# Quotes a bad value briefly: the value may be long (or, from YAML aliases, very large).
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 80, 80, 6, 6, 3
_short_repr = _SHORT.repr


def _validation_error(exc: ValidationError, origin: str) -> FinqloraError:
    lines, hint = validation_problems(exc)
    return FinqloraError(f"invalid config {origin}: " + "; ".join(lines), hint=hint or "see docs/training.md for every key")


def validation_problems(exc: ValidationError) -> tuple[list[str], str | None]:
    """One line per problem of a failed validation, and a hint (did-you-mean, or the key's description)."""
    lines = []
    hint = None
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        dotted = ".".join(loc)
        section_name = loc[0] if len(loc) > 1 and loc[0] in SECTIONS else None
        key = loc[-1] if loc else ""
        if err["type"] == "extra_forbidden":
            key_hint = _unknown_key_hint(section_name, key)
            guess = key_hint.partition("? ")[0] + "?" if key_hint.startswith("did you mean") else ""
            lines.append(f"unknown key '{dotted}'" + (f" ({guess})" if guess else ""))
            hint = hint or key_hint
            continue
        allowed = _allowed_values(SECTIONS[section_name], key) if section_name else None
        got = err.get("input")
        message = f"'{dotted}': {err['msg']} (got {_short_repr(got)})"
        if allowed and err["type"] != "literal_error":  # pydantic already lists a Literal's values
            message += f"; allowed: {allowed}"
        lines.append(message)
        field = SECTIONS[section_name].model_fields.get(key) if section_name else None
        if field is not None and field.description and hint is None:
            hint = f"{dotted}: {field.description}"
    return lines, hint


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001); a bare key is found in the section that has it."""
    if "=" not in text:
        raise FinqloraError(f"--set {text!r} is not key=value", hint="example: --set train.learning_rate=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise FinqloraError(f"--set {_short_repr(text)}: the value is not valid YAML ({exc})") from None
    parts = key.split(".")
    if len(parts) == 1 and parts[0] != "name":
        owners = [name for name, section in SECTIONS.items() if parts[0] in section.model_fields]
        if len(owners) != 1:
            what = f"is in several sections ({', '.join(owners)})" if owners else "is not a known key"
            raise FinqloraError(
                f"--set {key}: '{key}' {what}",
                hint="write the section too, e.g. --set train.seed=1; " + _unknown_key_hint(None, key),
            )
        parts = [owners[0], parts[0]]
    if len(parts) > 2 or (len(parts) == 2 and parts[0] not in SECTIONS):
        raise FinqloraError(f"--set {key}: unknown section", hint=f"sections: {', '.join(SECTIONS)}")
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides to a raw (not yet validated) config mapping."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        parts, value = parse_override(text)
        new = RENAMED_KEYS.get(parts[0], {}).get(parts[-1]) if len(parts) == 2 else None
        if new is not None:  # --set of an old name overrides the file's value under the new name
            warnings.warn(f"{parts[0]}.{parts[1]} is deprecated: write {parts[0]}.{new}", FutureWarning, stacklevel=2)
            parts = [parts[0], new]
        if len(parts) == 1:
            merged[parts[0]] = value
        else:
            section = merged.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise FinqloraError(f"config section '{parts[0]}' is not a mapping", hint="fix the YAML file")
            section[parts[1]] = value
    return merged


def config_from_mapping(raw: dict[str, Any], *, origin: str = "(in memory)") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc, origin) from None


# A run config is a page of YAML; anything far larger is the wrong file (a database, a model).
MAX_CONFIG_BYTES = 1_000_000


def _read_config_text(file: Path) -> str:
    """The config file's text, or a FinqloraError saying why it is not a YAML config (binary, huge)."""
    not_yaml = "pass a YAML run config (`finqlora config init FILE` writes one)"
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise FinqloraError(f"{file}: {size:,} bytes is not a run config (a YAML config is a few KB)", hint=not_yaml)
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FinqloraError(f"{file}: not a text file (byte {exc.start} is not UTF-8)", hint=not_yaml) from None
    if "\x00" in text:
        raise FinqloraError(f"{file}: not a text file (it contains NUL bytes)", hint=not_yaml)
    return text


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping (not validated); errors name the file and say why."""
    file = Path(path)
    if not file.is_file():
        configs = sorted(p.name for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        raise FinqloraError(
            f"config file not found: {file}",
            hint=f"configs in ./configs: {', '.join(configs)}" if configs else
            "write one with every key at its default: `finqlora config init FILE` (then edit it)",
        )
    try:
        loaded = yaml_load(_read_config_text(file))
    except YAMLLimitError as exc:
        raise FinqloraError(f"{file}: {exc}", hint="a run config is a small mapping: write its values out") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise FinqloraError(f"{file}: not valid YAML{where}", hint=str(exc)) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise FinqloraError(f"{file}: the top level must be a mapping (name:, data:, train:, eval:)")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, values: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when `path` is None), apply `--set` overrides, then typed `values`.

    `values` maps dotted keys (`data.num_samples`) to Python values, as a command's flags give
    them; they are validated with the rest, so a flag is checked exactly like its key.
    """
    raw: dict[str, Any] = {}
    origin = "(defaults)"
    if path is not None:
        origin = str(path)
        raw = read_config_mapping(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
        origin += " with --set " + " ".join(overrides)
    if values:
        raw = _assign(raw, values)
        origin += " with the command's options"
    return config_from_mapping(raw, origin=origin)


def _assign(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Typed values for dotted keys set into a raw config mapping (validated afterwards with the rest)."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in values.items():
        section, name = key.split(".")
        if not isinstance(merged.setdefault(section, {}), dict):
            raise FinqloraError(f"config section '{section}' is not a mapping", hint="fix the YAML file")
        merged[section][name] = value
    return merged


def dump_config(config: RunConfig) -> str:
    """The config as YAML (what a run records so it can be repeated)."""
    return yaml.safe_dump(config.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
