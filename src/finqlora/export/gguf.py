"""Export a (merged) Hugging Face model folder to GGUF for llama.cpp and Ollama.

Written with the `gguf` package's GGUFWriter, following llama.cpp's convert_hf_to_gguf.py:

- tensor names from `gguf.get_tensor_name_map` (`model.layers.0.self_attn.q_proj.weight` ->
  `blk.0.attn_q.weight`); a tied `lm_head` is not written (llama.cpp reuses `token_embd`);
- llama only: Q and K projections are permuted from Hugging Face's rotate-half layout to
  the interleaved layout llama.cpp's RoPE expects (`LlamaModel.permute`); qwen2 is not
  permuted (llama.cpp runs it in NEOX RoPE mode);
- 1-D tensors, norms and biases stay float32; other weights become f16, or q8_0 through
  `gguf.quants` (a tensor whose rows are not a multiple of 32 falls back to f16, as in
  llama.cpp);
- byte-level BPE tokenizers: `tokenizer.ggml.*` tokens/types/merges, special token ids,
  add_bos/add_eos, the pre-tokenizer name, and the chat template (`tokenizer.chat_template`).

Tensors are streamed: the header is planned from the safetensors headers, then each tensor is
converted and written on its own, so memory stays near the size of the largest tensor.

Beside `model.gguf` an Ollama `Modelfile` is written: `FROM`, the chat template translated to
Ollama's Go template (ChatML templates, checked against the Jinja template on a probe
conversation), the default system prompt, and the end-of-turn stop strings.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from finqlora.core.errors import FinqloraError
from finqlora.core.safe_input import read_json_file
from finqlora.export.adapter import usual_permissions
from finqlora.core.fileio import atomic_write_text, umask_mode

OUTTYPES = ("f16", "q8_0", "f32")
# Hugging Face architecture class -> llama.cpp architecture name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
# Names llama.cpp gives the pre-tokenizer (tokenizer.ggml.pre), recognized from tokenizer.json.
KNOWN_PRE_TOKENIZERS = ("qwen2", "llama-bpe", "smollm", "gpt-2", "deepseek-llm", "deepseek-coder")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SKIPPED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)
_PROBE = ("FINQLORA_SYS", "FINQLORA_USER_1", "FINQLORA_ANSWER", "FINQLORA_USER_2")


@dataclass(frozen=True)
class GgufExportResult:
    gguf_path: Path
    modelfile_path: Path
    architecture: str
    outtype: str
    tensor_count: int
    bytes_written: int
    seconds: float
    ollama_template: bool  # False: the Modelfile relies on the template embedded in the GGUF


# --------------------------------------------------------------------------------------------
# Model folder
# --------------------------------------------------------------------------------------------


def _read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise FinqloraError(
            f"model folder {model_dir} does not exist",
            hint="export a merged model first: finqlora export merge --model BASE --adapter RUN --output DIR",
        )
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        if (model_dir / "adapter_config.json").is_file():
            raise FinqloraError(
                f"{model_dir} is a LoRA adapter, not a full model; GGUF needs the merged weights",
                hint=f"merge it first: finqlora export merge --model BASE --adapter {model_dir} --output merged/",
            )
        raise FinqloraError(
            f"{model_dir} has no config.json, so it is not a Hugging Face model folder",
            hint="pass the folder written by `finqlora export merge` (config.json + *.safetensors + tokenizer.json)",
        )
    config = read_json_file(config_path, what="model config", hint=_FOLDER_HINT)
    if not isinstance(config, dict):
        raise FinqloraError(f"{config_path} holds a JSON {type(config).__name__}, not an object of model settings", hint=_FOLDER_HINT)
    return config


def _check_model_shape(config: dict[str, Any], model_dir: Path) -> None:
    """The numbers the writer reads are positive integers of sane size (a clear error, not a
    KeyError or an int() traceback)."""
    try:
        _ModelShape.model_validate(config)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise FinqloraError(f"{model_dir / 'config.json'}: field {where!r}: {first['msg']}", hint=_FOLDER_HINT) from None


_FOLDER_HINT = "pass the folder written by `finqlora export merge`, or copy it again (the file is damaged or was edited by hand)"
_COUNT = Field(ge=1, le=1 << 24)  # layers, heads, widths, vocabulary: positive, and far below what int() or numpy mind


class _ModelShape(BaseModel):
    """The config.json numbers the GGUF writer reads; transformers writes them all as integers."""

    model_config = ConfigDict(extra="allow")

    num_hidden_layers: Annotated[StrictInt, _COUNT]
    num_attention_heads: Annotated[StrictInt, _COUNT]
    num_key_value_heads: Annotated[StrictInt, _COUNT] | None = None
    hidden_size: Annotated[StrictInt, _COUNT]
    intermediate_size: Annotated[StrictInt, _COUNT]
    vocab_size: Annotated[StrictInt, _COUNT]
    head_dim: Annotated[StrictInt, _COUNT] | None = None
    max_position_embeddings: Annotated[StrictInt, Field(ge=1, le=1 << 40)] = 4096
    rms_norm_eps: Annotated[StrictFloat | StrictInt, Field(gt=0, lt=1)] = 1e-6


def gguf_architecture(config: dict[str, Any], model_dir: Path) -> str:
    """The llama.cpp architecture for this config, or a clear error for unsupported ones."""
    architectures = config.get("architectures") or []
    name = architectures[0] if architectures else config.get("model_type", "unknown")
    if name not in SUPPORTED_ARCHITECTURES:
        raise FinqloraError(
            f"{model_dir}: architecture {name} cannot be exported to GGUF by finqlora "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            hint="for other architectures use llama.cpp's convert_hf_to_gguf.py on the merged folder",
        )
    if config.get("quantization_config"):
        raise FinqloraError(
            f"{model_dir} holds quantized weights ({config['quantization_config'].get('quant_method', '?')})",
            hint="export the full-precision merged model (finqlora export merge writes one)",
        )
    if config.get("hidden_act", "silu") != "silu":
        raise FinqloraError(f"{model_dir}: hidden_act={config.get('hidden_act')} is not what llama.cpp's {name} runs (silu)")
    return SUPPORTED_ARCHITECTURES[name]


def _rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope theta, scaling dict) from transformers 4.x (`rope_theta`/`rope_scaling`) or 5.x (`rope_parameters`)."""
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    theta = float(config.get("rope_theta", params.get("rope_theta", 10000.0)))
    return theta, params


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_file(index, what="weight index", hint=_FOLDER_HINT)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise FinqloraError(f"{index} has no `weight_map` of tensor names to shard files", hint=_FOLDER_HINT)
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FinqloraError(f"{model_dir}: shard(s) {', '.join(missing)} listed in the index are missing", hint="copy the complete folder")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = (model_dir / "pytorch_model.bin").is_file()
        raise FinqloraError(
            f"{model_dir} has no .safetensors weights" + (" (only pytorch_model.bin, a pickle)" if pickled else ""),
            hint="finqlora reads safetensors only; re-save with model.save_pretrained(dir) (safetensors is the default)",
        )
    return files


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def permute_for_llama_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotate-half Q/K rows -> llama.cpp's interleaved pairs (per head)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _target_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> Any:
    import gguf

    types = gguf.GGMLQuantizationType
    # As llama.cpp: 1-D tensors, norms and non-weights (biases) are always float32.
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return types.F32
    if outtype == "f32":
        return types.F32
    if outtype == "q8_0":
        block_size = gguf.GGML_QUANT_SIZES[types.Q8_0][0]
        return types.Q8_0 if shape[-1] % block_size == 0 else types.F16
    return types.F16


@dataclass(frozen=True)
class _TensorPlan:
    hf_name: str
    gguf_name: str
    file: Path
    shape: tuple[int, ...]
    qtype: Any
    permute_heads: int | None  # llama Q/K: number of heads to permute with


def _plan_tensors(model_dir: Path, config: dict[str, Any], arch: str, outtype: str) -> list[_TensorPlan]:
    import gguf
    from safetensors import safe_open

    arch_enum = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, int(config["num_hidden_layers"]))
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    tied = bool(config.get("tie_word_embeddings", False))
    plans: list[_TensorPlan] = []
    for file in _weight_files(model_dir):
        with safe_open(str(file), framework="pt") as handle:
            for hf_name in handle.keys():
                if hf_name.endswith(_SKIPPED_TENSOR_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
                    continue
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise FinqloraError(
                        f"{file.name}: tensor {hf_name} has no GGUF name for architecture {arch}",
                        hint="the folder does not look like a plain "
                        f"{arch} model; export the output of `finqlora export merge`",
                    )
                shape = tuple(handle.get_slice(hf_name).get_shape())
                heads = None
                if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    heads = n_head
                elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    heads = n_head_kv
                plans.append(_TensorPlan(hf_name, gguf_name, file, shape, _target_type(gguf_name, shape, outtype), heads))
    return plans


def _convert_tensor(array: np.ndarray, plan: _TensorPlan) -> np.ndarray:
    import gguf

    if plan.permute_heads is not None:
        array = permute_for_llama_rope(array, plan.permute_heads)
    types = gguf.GGMLQuantizationType
    if plan.qtype == types.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if plan.qtype == types.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), plan.qtype)


def _nbytes(plan: _TensorPlan) -> tuple[tuple[int, ...], Any, int]:
    """(shape as passed to the writer, numpy dtype, byte size) of a planned tensor."""
    import gguf

    types = gguf.GGMLQuantizationType
    if plan.qtype == types.F32:
        return plan.shape, np.dtype(np.float32), int(np.prod(plan.shape)) * 4
    if plan.qtype == types.F16:
        return plan.shape, np.dtype(np.float16), int(np.prod(plan.shape)) * 2
    byte_shape = gguf.quant_shape_to_byte_shape(plan.shape, plan.qtype)
    return tuple(byte_shape), np.dtype(np.uint8), int(np.prod(byte_shape))


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for the way this tokenizer splits text before BPE, or None if unknown.

    llama.cpp recognizes a pre-tokenizer by hashing its output on a probe text; here the
    tokenizer.json definition is read instead, which needs no probe text and no network.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    splits = [str((step.get("pattern") or {}).get("Regex", "")) for step in steps if step.get("type") == "Split"]
    byte_level_regex = any(step.get("type") == "ByteLevel" and step.get("use_regex", True) for step in steps)
    digits = any(step.get("type") == "Digits" and step.get("individual_digits") for step in steps)
    if splits == [_QWEN2_SPLIT]:
        return "qwen2"
    if splits == [_LLAMA3_SPLIT]:
        return "llama-bpe"
    if any("一-龥" in split for split in splits):
        # DeepSeek's tokenizers split CJK runs with their own regex list; the LLM one spells out
        # Latin letter ranges, the coder one uses \p{L}.
        return "deepseek-llm" if any("A-Za-z" in split for split in splits) else "deepseek-coder"
    if not splits and byte_level_regex and kinds.count("ByteLevel") == 1:
        return "smollm" if digits else ("gpt-2" if len(kinds) == 1 else None)
    return None


def _token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and their llama.cpp types, as convert_hf_to_gguf.py's get_vocab_base()."""
    import gguf

    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            info = added_decoder.get(index)
            looks_special = (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))
            if (info is not None and info.special) or looks_special:
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _add_tokenizer(writer: Any, model_dir: Path, vocab_size: int, pre_tokenizer: str | None) -> Any:
    import gguf
    from transformers import AutoTokenizer

    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        hint = "export a folder written by finqlora export merge (it saves the tokenizer)"
        if (model_dir / "tokenizer.model").is_file():
            hint = "SentencePiece tokenizers are not supported by finqlora's GGUF export; use llama.cpp's convert_hf_to_gguf.py"
        raise FinqloraError(f"{model_dir} has no tokenizer.json (a byte-level BPE tokenizer is needed)", hint=hint)
    definition = read_json_file(tokenizer_json, what="tokenizer definition", hint=_FOLDER_HINT)
    if not isinstance(definition, dict):
        raise FinqloraError(f"{tokenizer_json} holds a JSON {type(definition).__name__}, not a tokenizer definition", hint=_FOLDER_HINT)
    if (definition.get("model") or {}).get("type") != "BPE":
        raise FinqloraError(
            f"{tokenizer_json}: tokenizer model {definition.get('model', {}).get('type')} is not byte-level BPE",
            hint="use llama.cpp's convert_hf_to_gguf.py for SentencePiece/Unigram tokenizers",
        )
    pre = pre_tokenizer or detect_pre_tokenizer(definition)
    if pre is None:
        raise FinqloraError(
            f"{tokenizer_json}: the pre-tokenizer is not one finqlora recognizes, so llama.cpp would split text differently",
            hint=f"name it with --pre-tokenizer (llama.cpp names such as {', '.join(KNOWN_PRE_TOKENIZERS)})",
        )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokens, types = _token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise FinqloraError(f"{tokenizer_json} has no BPE merges", hint="the tokenizer file is incomplete; re-save the tokenizer")
    # Whether BOS/EOS are added is taken from what the tokenizer really does on text, which is
    # what training and inference saw; tokenizer_config flags are often absent or stale.
    ids = tokenizer("finqlora")["input_ids"]
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id],
    }
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return tokenizer


# --------------------------------------------------------------------------------------------
# Ollama Modelfile
# --------------------------------------------------------------------------------------------

_CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def _chatml(messages: list[dict[str, str]]) -> str:
    """What `_CHATML_GO_TEMPLATE` renders for these messages (Ollama's .Messages loop)."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def ollama_modelfile(gguf_name: str, tokenizer: Any) -> tuple[str, bool]:
    """The Modelfile text and whether it carries an explicit TEMPLATE.

    The ChatML Go template is used only when it renders a probe conversation exactly like the
    model's own Jinja template; otherwise Ollama's detection of the template embedded in the
    GGUF (tokenizer.chat_template) is relied on, and the file says so.
    """
    from finqlora.core.chat_format import assistant_turn_suffix

    system, user1, answer, user2 = _PROBE
    conversation = [
        {"role": "system", "content": system},
        {"role": "user", "content": user1},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": user2},
    ]
    template_text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    chatml = template_text == _chatml(conversation)
    default_system = None
    if chatml:
        alone = tokenizer.apply_chat_template(conversation[1:2], tokenize=False, add_generation_prompt=True)
        prefix = "<|im_start|>system\n"
        if alone.startswith(prefix) and alone != _chatml(conversation[1:2]):
            default_system = alone[len(prefix) : alone.index("<|im_end|>")]
            if _chatml([{"role": "system", "content": default_system}, conversation[1]]) != alone:
                chatml, default_system = False, None
    stops = [s for s in dict.fromkeys([assistant_turn_suffix(tokenizer).strip(), tokenizer.eos_token]) if s]
    lines = [
        "# Ollama Modelfile written by finqlora (https://github.com/ollama/ollama/blob/main/docs/modelfile.md)",
        "#   ollama create finqlora -f Modelfile && ollama run finqlora",
        f"FROM ./{gguf_name}",
    ]
    if chatml:
        lines.append(f'TEMPLATE """{_CHATML_GO_TEMPLATE}"""')
        if default_system and '"""' not in default_system:
            lines.append(f'SYSTEM """{default_system}"""')
    else:
        lines.append(
            "# No TEMPLATE: this chat template is not ChatML, so Ollama uses the template embedded in the GGUF "
            "(tokenizer.chat_template)."
        )
    lines.extend(f'PARAMETER stop "{stop}"' for stop in stops if '"' not in stop)
    # Greedy decoding, as finqlora's evaluation and API default (GenerationSettings).
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n", chatml


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_gguf(
    model_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    outtype: str = "f16",
    pre_tokenizer: str | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> GgufExportResult:
    """Write `output` (.gguf) and an Ollama `Modelfile` beside it from a HF model folder."""
    import gguf
    import torch
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    from safetensors import safe_open

    started = time.perf_counter()
    if outtype not in OUTTYPES:
        raise FinqloraError(f"unknown --outtype {outtype!r}", hint=f"use one of: {', '.join(OUTTYPES)}")
    model_dir = Path(model_dir).expanduser()
    output = Path(output).expanduser()
    if output.suffix.lower() != ".gguf":
        raise FinqloraError(f"output {output} should end with .gguf", hint="e.g. --output model-q8_0.gguf")
    config = _read_config(model_dir)
    arch = gguf_architecture(config, model_dir)
    _check_model_shape(config, model_dir)
    theta, rope = _rope_settings(config)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear", "yarn"):
        raise FinqloraError(
            f"{model_dir}: RoPE scaling type {rope_type!r} is not supported by finqlora's GGUF export",
            hint="supported: none, linear, yarn; use llama.cpp's convert_hf_to_gguf.py for this model",
        )

    plans = _plan_tensors(model_dir, config, arch, outtype)
    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // n_head)
    vocab_size = int(config["vocab_size"])

    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_name or model_dir.resolve().name)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f32": gguf.LlamaFileType.ALL_F32}
    writer.add_file_type(file_types[outtype])
    if arch == "llama":
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    tokenizer = _add_tokenizer(writer, model_dir, vocab_size, pre_tokenizer)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for plan in plans:
        shape, dtype, nbytes = _nbytes(plan)
        raw = None if plan.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else plan.qtype
        writer.add_tensor_info(plan.gguf_name, shape, dtype, nbytes, raw_dtype=raw)

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    umask_mode(tmp_name)
    tmp = Path(tmp_name)
    total = sum(_nbytes(plan)[2] for plan in plans)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        columns = (TextColumn("[bold]GGUF {task.fields[name]}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task("write", total=total, name=outtype)
            # Plans are in file order, so each shard is opened once.
            for file in dict.fromkeys(plan.file for plan in plans):
                with safe_open(str(file), framework="pt") as handle:
                    for plan in (p for p in plans if p.file == file):
                        tensor = handle.get_tensor(plan.hf_name).to(torch.float32).numpy()
                        data = _convert_tensor(tensor, plan)
                        writer.write_tensor_data(data)
                        bar.update(task, advance=data.nbytes)
        writer.close()
        usual_permissions(tmp)
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise

    modelfile_text, has_template = ollama_modelfile(output.name, tokenizer)
    modelfile = output.parent / "Modelfile"
    atomic_write_text(modelfile, modelfile_text)
    usual_permissions(modelfile)
    return GgufExportResult(
        gguf_path=output,
        modelfile_path=modelfile,
        architecture=arch,
        outtype=outtype,
        tensor_count=len(plans),
        bytes_written=output.stat().st_size,
        seconds=time.perf_counter() - started,
        ollama_template=has_template,
    )
