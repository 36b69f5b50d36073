"""Resolve a base model, load it right for the hardware, and attach an adapter safely.

`--model` accepts a Hugging Face hub id, a local transformers folder, a `.gguf` file, or a
built-in offline alias (`builtin:qwen2.5-coder-0.5b-instruct`, `builtin:smollm2-135m-instruct`).
Everything ends up as a local folder loaded with `use_safetensors=True`.

Hardware defaults: CUDA loads 4-bit NF4 with double quantization and a bf16 compute dtype
(fp16 on GPUs without bf16, e.g. T4); the CPU loads float32 without quantization. `device`,
`dtype` and `load_in_4bit` override both.

`load_model` never caches: every call loads fresh weights. That matters for training:
bitsandbytes 4-bit layers on the CPU stop passing gradients once a no-grad forward (e.g.
`generate`) has repacked them, so a model loaded for inference must never be handed to a
trainer -- call `load_model(..., for_training=True)` instead, which also leaves the model in
train mode with the KV cache off.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finqlora.models.builtin import CAST_DTYPES, MARKER_FILE, cast_folder, get_builtin, is_builtin_spec, prepare_builtin, prepare_gguf_file, read_marker
from finqlora.core.chat_format import ensure_chat_template, stop_token_ids
from finqlora.core.errors import FinqloraError

DEFAULT_BASE_MODEL = "deepseek-ai/deepseek-llm-7b-chat"
OFFLINE_HINT = (
    "pass a local model folder (--model /path/to/model) or a built-in offline model "
    "(--model builtin:qwen2.5-coder-0.5b-instruct; see `finqlora models list`)"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+\Z")  # \Z: `$` would pass "org/name\n"
# Files fetched for a hub model: configs, tokenizer and safetensors weights -- never pickles.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip

Kind = Literal["builtin", "local", "gguf", "hub"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a `--model` value points to.

    `path` is a local folder for from_pretrained; `base_id` is the model's stable identity
    (recorded in adapters as `base_model_name_or_path`, so an adapter trained on
    `builtin:qwen2.5-coder-0.5b-instruct` names that, not a cache path of one machine).
    """

    spec: str
    kind: Kind
    path: str
    base_id: str


def _base_id_for_folder(folder: Path) -> str:
    marker = read_marker(folder)
    if marker and (marker.get("spec") or marker.get("gguf")):
        return str(marker.get("spec") or marker["gguf"])  # a converted built-in or .gguf file
    # A Hugging Face cache snapshot: .../models--org--name/snapshots/<rev>
    parts = folder.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return part[len("models--") :].replace("--", "/", 1)
    return str(folder.resolve())


def canonical_base_id(name: str) -> str:
    """The identity a recorded base name refers to (builtin spec, hub id or absolute path)."""
    name = name.strip()
    if is_builtin_spec(name):
        return get_builtin(name).spec
    path = Path(name).expanduser()
    if path.is_dir():
        return _base_id_for_folder(path)
    return name


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _resolve_hub(repo_id: str, *, trust_remote_code: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = _HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=_hub_offline())
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if _hub_offline() else "the Hugging Face hub cannot be reached"
        raise FinqloraError(
            f"cannot get model '{repo_id}': {reason} and it is not in the local Hugging Face cache",
            hint=OFFLINE_HINT,
        ) from None
    except GatedRepoError:
        raise FinqloraError(
            f"'{repo_id}' is a gated model on the Hugging Face hub",
            hint="accept its license on huggingface.co and run `huggingface-cli login`, or " + OFFLINE_HINT,
        ) from None
    except RepositoryNotFoundError:
        raise FinqloraError(f"no model '{repo_id}' on the Hugging Face hub", hint="check the id, or " + OFFLINE_HINT) from None
    except (HfHubHTTPError, OSError) as exc:
        raise FinqloraError(f"downloading '{repo_id}' failed: {exc}", hint=OFFLINE_HINT) from None


def resolve_model(spec: str, *, trust_remote_code: bool = False, progress: bool = True) -> ResolvedModel:
    """Turn a `--model` value into a local folder (converting or downloading once if needed)."""
    spec = (spec or "").strip()
    if not spec:
        raise FinqloraError("no model given", hint=OFFLINE_HINT)
    if is_builtin_spec(spec):
        builtin = get_builtin(spec)
        return ResolvedModel(spec, "builtin", str(prepare_builtin(builtin, progress=progress)), builtin.spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise FinqloraError(
                f"{path} is a file, not a model folder or a .gguf file",
                hint="pass the folder that holds config.json and the *.safetensors weights",
            )
        folder = prepare_gguf_file(path, progress=progress)
        return ResolvedModel(spec, "gguf", str(folder), str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            if (path / "adapter_config.json").is_file():
                raise FinqloraError(
                    f"{path} is a LoRA adapter, not a base model",
                    hint="pass it as --adapter and give its base model as --model "
                    f"(see base_model_name_or_path in {path / 'adapter_config.json'})",
                )
            raise FinqloraError(f"{path} has no config.json, so it is not a transformers model folder", hint=OFFLINE_HINT)
        return ResolvedModel(spec, "local", str(path.resolve()), _base_id_for_folder(path))
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return ResolvedModel(spec, "hub", _resolve_hub(spec, trust_remote_code=trust_remote_code), spec)
    raise FinqloraError(f"model folder or file not found: {spec}", hint="check the path, or " + OFFLINE_HINT)


def pick_device(device: str = "auto") -> str:
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FinqloraError(
            f"--device {device} was asked for, but this PyTorch build sees no CUDA GPU",
            hint="use --device cpu, or install a CUDA build of torch (see scripts/setup.sh, FINQLORA_TORCH)",
        )
    if device not in {"cpu", "mps"} and not re.fullmatch(r"cuda(:\d+)?", device):
        raise FinqloraError(f"unknown device '{device}'", hint="use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(dtype: Any, device: str):
    """float32 on the CPU; bf16 on GPUs that support it, else fp16 (T4)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = (dtype or "auto").strip().lower()
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise FinqloraError(f"unknown dtype '{dtype}'", hint="use auto, float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[dtype])


def _tokenizer_source(resolved: ResolvedModel, adapter: str | os.PathLike[str] | None) -> str:
    # The adapter stores the tokenizer and chat template used in training: they win.
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return str(adapter)
    return resolved.path


def load_tokenizer(
    spec: str | ResolvedModel,
    *,
    adapter: str | os.PathLike[str] | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    padding_side: str = "left",
):
    """The model's tokenizer (the adapter's when it has one), with a chat template and a pad token.

    A tokenizer without a pad token pads with its EOS (padding is masked out anyway).
    `chat_template="chatml"` (or a Jinja string) installs a fallback when the tokenizer has none.
    """
    from transformers import AutoTokenizer

    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(resolved, adapter), trust_remote_code=trust_remote_code)
    ensure_chat_template(tokenizer, chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    dtype: Any
    resolved: ResolvedModel
    adapter: Path | None = None
    load_in_4bit: bool = False
    for_training: bool = False
    stop_ids: list[int] = field(default_factory=list)

    @contextmanager
    def base_only(self) -> Iterator[None]:
        """Inside this block the adapter is switched off (base answers from the same weights)."""
        context = self.model.disable_adapter() if self.adapter is not None else nullcontext()
        with context:
            yield


def _bitsandbytes_config(compute_dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FinqloraError(
            "4-bit loading needs bitsandbytes, which is not installed",
            hint="pip install 'bitsandbytes>=0.45' (or pip install -e '.[gpu]'), or pass --no-load-in-4bit",
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _contiguous_head_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook on the lm_head: hand it a contiguous copy of the hidden states.

    With `logits_to_keep=1` (choice scoring, generate's and the server's prefill) a batch's head
    input is the strided view `hidden[:, -1:, :]`. torch.matmul only folds such a view into one
    matrix product when the weight requires grad; a frozen head (every adapter load: PEFT freezes
    the base) goes through bmm instead, which copies the whole weight once per batch row -- for
    Qwen's 151,936 x 896 bf16 head 272 MB a row, +4.3 GB RSS and 16 s at batch 16 on the CPU
    (0.06 s with this copy of 16 x 896 values; torch 2.13).
    """
    return (args[0].contiguous(), *args[1:])


def load_model(
    spec: str | ResolvedModel,
    *,
    adapter: str | os.PathLike[str] | None = None,
    device: str = "auto",
    dtype: Any = "auto",
    load_in_4bit: bool | None = None,
    for_training: bool = False,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    allow_pickle_adapter: bool = False,
    ignore_base_mismatch: bool = False,
    progress: bool = True,
) -> LoadedModel:
    """Load a base model (plus an optional LoRA adapter) for inference or training.

    Always loads fresh weights (see the module docstring for why training needs that).
    """
    from transformers import AutoModelForCausalLM

    # Cheap checks first, so a typo fails before a download or conversion.
    adapter_dir = check_adapter_folder(adapter, allow_pickle_adapter) if adapter is not None else None
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if load_in_4bit is None:
        load_in_4bit = device.startswith("cuda")
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec, trust_remote_code=trust_remote_code, progress=progress)
    weights_folder = resolved.path
    dtype_name = str(torch_dtype).removeprefix("torch.")
    if resolved.kind in ("builtin", "gguf") and not load_in_4bit and dtype_name in CAST_DTYPES:
        # Our float32 conversion, wanted in half precision: load a copy cast once on disk (a fraction of the peak memory).
        weights_folder = str(cast_folder(Path(resolved.path), dtype_name))

    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if load_in_4bit:
        kwargs["quantization_config"] = _bitsandbytes_config(torch_dtype)
        kwargs["device_map"] = {"": device}
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(weights_folder, **kwargs)
    except OSError as exc:
        if "safetensors" in str(exc).lower() or "no file named" in str(exc).lower():
            raise FinqloraError(
                f"{resolved.spec} has no safetensors weights (finqlora does not load pickle .bin/.pt model files)",
                hint="convert it once with transformers (model.save_pretrained(dir, safe_serialization=True)) "
                "in an environment you trust, or use a model that ships *.safetensors",
            ) from None
        raise
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_head_input)
    # PEFT records this as the adapter's base_model_name_or_path: keep it machine-independent.
    model.name_or_path = resolved.base_id
    model.config.name_or_path = resolved.base_id

    tokenizer = load_tokenizer(
        resolved,
        adapter=adapter_dir,
        chat_template=chat_template,
        trust_remote_code=trust_remote_code,
        padding_side="right" if for_training else "left",
    )
    if adapter_dir is not None:
        check_adapter_matches_base(model, adapter_dir, resolved, ignore_base_mismatch=ignore_base_mismatch)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=for_training)
    if for_training:
        model.config.use_cache = False
        model.train()
    else:
        model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=torch_dtype,
        resolved=resolved,
        adapter=adapter_dir,
        load_in_4bit=bool(load_in_4bit),
        for_training=for_training,
        stop_ids=stop_token_ids(tokenizer),
    )


def check_adapter_folder(adapter: str | os.PathLike[str], allow_pickle: bool) -> Path:
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise FinqloraError(f"adapter folder not found: {folder}", hint="pass the --output-dir of `finqlora train`")
    if not (folder / "adapter_config.json").is_file():
        checkpoints = sorted(folder.glob("checkpoint-*/adapter_config.json"))
        hint = (
            f"it has checkpoints; pass one of them, e.g. --adapter {checkpoints[-1].parent}"
            if checkpoints
            else "pass the --output-dir of `finqlora train` (it holds adapter_config.json and adapter_model.safetensors)"
        )
        raise FinqloraError(f"{folder} is not a LoRA adapter folder (no adapter_config.json)", hint=hint)
    if (folder / "adapter_model.safetensors").is_file():
        return folder.resolve()
    if (folder / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise FinqloraError(
                f"{folder / 'adapter_model.bin'} is a pickle file, which can run arbitrary code when loaded; "
                "finqlora loads adapters from safetensors only",
                hint="re-save the adapter as adapter_model.safetensors, or pass --allow-pickle-adapter "
                "if you trust where it came from",
            )
        _check_pickle_adapter(folder / "adapter_model.bin")
        return folder.resolve()
    raise FinqloraError(
        f"{folder} has adapter_config.json but no adapter_model.safetensors",
        hint="the training run may not have finished; use one of its checkpoint-* folders",
    )


def _check_pickle_adapter(path: Path) -> None:
    """Unpickle `path` with torch's weights-only loader (no code runs); a refusal is a FinqloraError.

    A malicious pickle names a callable (e.g. os.system) for the unpickler to run; the weights-only
    loader refuses every global that is not a tensor type, with an UnpicklingError we turn into
    an error line instead of a traceback.
    """
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise FinqloraError(
            f"{path}: refused to load this pickle adapter: it holds more than tensors, or is damaged ({first_line})",
            hint="nothing from it was run; only use adapters you trust, and prefer adapter_model.safetensors "
            "(re-save the adapter with safe_serialization=True where it was trained)",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FinqloraError(
            f"{path}: not a LoRA adapter state dict (expected a mapping of tensor names to tensors)",
            hint="re-save the adapter as adapter_model.safetensors",
        )


def _adapter_tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    import torch

    # Only reached with allow_pickle_adapter; weights_only still refuses arbitrary objects.
    state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    return {key: tuple(value.shape) for key, value in state.items()}


def _module_shape(module: Any) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can wrap; None for anything else."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
        return int(module.num_embeddings), int(module.embedding_dim)
    return None


def check_adapter_matches_base(model: Any, adapter_dir: Path, resolved: ResolvedModel, *, ignore_base_mismatch: bool = False) -> None:
    """Refuse an adapter trained on another base: by recorded name, then by module shapes."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path") or ""
    needs = f"--model {recorded}" if recorded else "the base model it was trained on"
    if recorded and not ignore_base_mismatch and canonical_base_id(recorded) != resolved.base_id:
        raise FinqloraError(
            f"adapter {adapter_dir} was trained on base '{recorded}', but the model given is '{resolved.base_id}'",
            hint=f"use {needs}; if it is the same model in another place, pass --ignore-base-mismatch",
        )
    modules = dict(model.named_modules())
    problems: list[str] = []
    for key, shape in sorted(_adapter_tensor_shapes(adapter_dir).items()):
        name = key.removeprefix("base_model.model.")
        if ".lora_" not in name:
            continue  # modules_to_save copies and the like: PEFT checks those itself
        module_name, rest = name.split(".lora_", 1)
        module = modules.get(module_name)
        if module is None:
            problems.append(f"the base has no module {module_name}")
            continue
        dims = _module_shape(module)
        if dims is None or len(shape) != 2:
            continue
        in_dim, out_dim = dims
        if rest.startswith("A.") and shape[1] != in_dim:
            problems.append(f"{module_name}: adapter expects input size {shape[1]}, base has {in_dim}")
        elif rest.startswith("B.") and shape[0] != out_dim:
            problems.append(f"{module_name}: adapter expects output size {shape[0]}, base has {out_dim}")
        elif rest.startswith("embedding_A") and shape[1] != in_dim:
            problems.append(f"{module_name}: adapter expects vocabulary {shape[1]}, base has {in_dim}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise FinqloraError(
            f"adapter {adapter_dir} does not fit '{resolved.base_id}': " + "; ".join(problems[:3]) + more,
            hint=f"it was trained on another base; use {needs}",
        )


def adapter_base_model(adapter: str | os.PathLike[str]) -> str | None:
    """The base recorded in an adapter folder (what `--model` defaults to with `--adapter`)."""
    path = Path(adapter).expanduser() / "adapter_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path") or None
    except (OSError, ValueError):
        return None


def describe_model(resolved: ResolvedModel) -> dict[str, Any]:
    """Facts about a resolved model without loading its weights (for `finqlora models info`)."""
    folder = Path(resolved.path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    weights = sorted(folder.glob("*.safetensors"))
    info: dict[str, Any] = {
        "spec": resolved.spec,
        "kind": resolved.kind,
        "base_id": resolved.base_id,
        "path": str(folder),
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "weights_bytes": sum(p.stat().st_size for p in weights),
        "safetensors_files": len(weights),
    }
    marker = read_marker(folder) if (folder / MARKER_FILE).exists() else None
    if marker:
        info["converted_from"] = marker.get("source_file")
        info["source_sha256"] = marker.get("source_sha256")
    return info
