"""The serving engine: one base model, its LoRA adapters, and the batcher that owns them.

`ServingEngine.load(...)` checks every adapter folder (name, `adapter_config.json`, the
safetensors header) before the base is loaded, so a broken adapter is a clear error in a
second, not a traceback after the model load. It then loads the base once (through
`finqlora.models.loading.load_model`), attaches every adapter with peft's multi-adapter
support, and starts the `finqlora.serve.batching.Batcher` worker. The request's `model` field
picks the adapter by its configured name, or the plain base by the base name; nothing else is
accepted, so a request can never make the server read a path.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from finqlora.core.chat_format import render_prompt, stop_token_ids
from finqlora.core.errors import FinqloraError
from finqlora.core.safe_input import read_json_file
from finqlora.serve.api_errors import APIError
from finqlora.serve.batching import Batcher, BatchLimits

# Adapter names appear in URLs and JSON; keep them plain so they can never be a path
# (\Z, not $, which also matches before a final newline).
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@dataclass
class ServingEngine:
    """A loaded base model with its adapters, served by one batcher."""

    batcher: Batcher
    tokenizer: Any
    base_name: str
    adapters: dict[str, str]  # name -> folder it was loaded from (for /v1/models)
    # Adapters may ship the chat template they were trained with; prompts for an adapter
    # are rendered with its own template (the vocabulary is the base's).
    prompt_tokenizers: dict[str | None, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    _stop_ids: dict[str | None, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls,
        model: str,
        adapters: Mapping[str, str | Path] | None = None,
        *,
        limits: BatchLimits | None = None,
        base_name: str = "base",
        device: str = "auto",
        dtype: str = "auto",
        load_in_4bit: bool | None = None,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        ignore_base_mismatch: bool = False,
    ) -> ServingEngine:
        from finqlora.models.loading import check_adapter_matches_base, load_model, load_tokenizer

        adapter_dirs = {name: check_adapter_dir(name, path) for name, path in (adapters or {}).items()}
        if base_name in adapter_dirs:
            raise FinqloraError(
                f"adapter name {base_name!r} is also the base model's name",
                hint="rename the adapter (--adapter NAME=PATH) or the base (--base-name)",
            )
        loaded = load_model(
            model,
            device=device,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            trust_remote_code=trust_remote_code,
            chat_template=chat_template,
        )
        for folder in adapter_dirs.values():
            check_adapter_matches_base(loaded.model, folder, loaded.resolved, ignore_base_mismatch=ignore_base_mismatch)
        peft_model = attach_adapters(loaded.model, adapter_dirs)
        peft_model.eval()
        prompt_tokenizers: dict[str | None, Any] = {None: loaded.tokenizer}
        for name, folder in adapter_dirs.items():
            # The adapter's own tokenizer files carry the chat template it was trained with.
            prompt_tokenizers[name] = load_tokenizer(loaded.resolved, adapter=folder, chat_template=chat_template)
        max_context = getattr(getattr(peft_model, "config", None), "max_position_embeddings", None)
        batcher = Batcher(peft_model, loaded.tokenizer, limits, max_context_tokens=max_context)
        return cls(
            batcher=batcher,
            tokenizer=loaded.tokenizer,
            base_name=base_name,
            adapters={name: str(folder) for name, folder in adapter_dirs.items()},
            prompt_tokenizers=prompt_tokenizers,
        )

    @property
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def adapter_for(self, model_name: str) -> str | None:
        """The adapter a request's `model` names (None = the base); anything else is a 404."""
        if model_name == self.base_name:
            return None
        if model_name in self.adapters:
            return model_name
        raise APIError(
            404,
            f"model {model_name!r} does not exist on this server; available: {', '.join(self.model_names)}",
            param="model",
            code="model_not_found",
        )

    def chat_prompt(self, adapter: str | None, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """The prompt's token ids (rendered with the adapter's chat template) and the ids that end
        an answer. CPU work proportional to the prompt: the server calls it off the event loop."""
        tokenizer = self.prompt_tokenizers.get(adapter, self.tokenizer)
        try:
            prompt = render_prompt(tokenizer, messages)
        except FinqloraError as exc:
            raise APIError(400, exc.message, param="messages") from exc
        except Exception as exc:  # the chat template rejected the conversation (e.g. role order)
            raise APIError(400, f"the model's chat template cannot render these messages: {exc}", param="messages") from exc
        if adapter not in self._stop_ids:  # the same for every request: render the template once
            self._stop_ids[adapter] = stop_token_ids(tokenizer)
        return tokenizer.encode(prompt, add_special_tokens=False), self._stop_ids[adapter]

    def text_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of raw text prompts (no chat template); call off the event loop."""
        return [self.tokenizer.encode(prompt) for prompt in prompts]

    def shutdown(self) -> None:
        self.batcher.shutdown()


class _AdapterConfigFields(BaseModel):
    """The parts of adapter_config.json that loading relies on (peft itself checks no types)."""

    model_config = ConfigDict(extra="allow", strict=True)

    peft_type: StrictStr
    r: StrictInt | None = Field(None, ge=1)
    lora_alpha: StrictInt | StrictFloat | None = None
    target_modules: list[StrictStr] | StrictStr | None = None
    base_model_name_or_path: StrictStr | None = None


# peft writes ~1 KB; a file a thousand times that size is not an adapter config.
MAX_ADAPTER_CONFIG_BYTES = 1 << 20


def _read_adapter_config(name: str, file: Path) -> Any:
    """The parsed adapter_config.json, bounded (size, nesting, digits; see `read_json_file`)."""
    try:
        return read_json_file(file, what="adapter config", hint=_CONFIG_HINT, max_bytes=MAX_ADAPTER_CONFIG_BYTES)
    except FinqloraError as exc:
        raise FinqloraError(f"adapter {name!r}: {exc.message}", hint=exc.hint) from None


def _check_adapter_config(name: str, file: Path) -> None:
    from peft import PeftType

    config = _read_adapter_config(name, file)
    if not isinstance(config, dict):
        raise FinqloraError(f"adapter {name!r}: {file} holds a JSON {type(config).__name__}, not an object", hint=_CONFIG_HINT)
    try:
        fields = _AdapterConfigFields.model_validate(config)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise FinqloraError(f"adapter {name!r}: {file}: field {where!r}: {first['msg']}", hint=_CONFIG_HINT) from exc
    if fields.peft_type not in PeftType.__members__:
        raise FinqloraError(f"adapter {name!r}: {file}: unknown peft_type {fields.peft_type!r}", hint=_CONFIG_HINT)
    if fields.peft_type == "LORA" and fields.r is None:
        raise FinqloraError(f"adapter {name!r}: {file}: a LoRA adapter needs the rank `r`", hint=_CONFIG_HINT)


_CONFIG_HINT = "the file is damaged or was edited by hand; copy it again from the training output (or re-save with peft's save_pretrained)"


def _check_adapter_weights(name: str, file: Path) -> None:
    """Open the safetensors header (a few KB): garbage, truncation or an empty file show here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise FinqloraError(
            f"adapter {name!r}: {file} is not a readable safetensors file ({exc})",
            hint="the file is damaged or incomplete (e.g. an interrupted copy); copy it again from the training output",
        ) from exc
    if not any(".lora_" in key for key in keys):
        raise FinqloraError(
            f"adapter {name!r}: {file} holds no LoRA weights ({len(keys)} tensors, none named *.lora_*)",
            hint="pass the folder written by `finqlora train --output-dir` (or one of its checkpoint-N folders)",
        )


# The small JSON files transformers reads with Python's parser when an adapter brings its own
# tokenizer (`finqlora train` saves it); tokenizer.json itself is parsed by the Rust library.
_TOKENIZER_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json")
MAX_TOKENIZER_JSON_BYTES = 16 << 20  # a tokenizer_config.json with a long chat template is ~10 KB


def _check_tokenizer_files(name: str, folder: Path) -> None:
    """Parse the adapter's tokenizer JSON files within bounds before the base model loads, so a
    damaged one is an error naming it, not a traceback from inside transformers."""
    hint = "copy the adapter folder again from the training output (or delete its tokenizer files to use the base model's)"
    for file_name in _TOKENIZER_JSON_FILES:
        if (folder / file_name).is_file():
            try:
                read_json_file(folder / file_name, what="tokenizer file", hint=hint, max_bytes=MAX_TOKENIZER_JSON_BYTES)
            except FinqloraError as exc:
                raise FinqloraError(f"adapter {name!r}: {exc.message}", hint=exc.hint) from None


def check_adapter_dir(name: str, path: str | Path) -> Path:
    """Validate an adapter's name, folder, config and weights' header before anything is loaded."""
    if not ADAPTER_NAME.match(name):
        raise FinqloraError(
            f"adapter name {name!r} is not allowed",
            hint="use letters, digits, '.', '_' or '-' (at most 64 characters), e.g. --adapter fin=runs/x",
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FinqloraError(f"adapter {name!r}: {folder} is not a folder", hint="pass the training output folder (it holds adapter_config.json)")
    if not (folder / "adapter_config.json").is_file():
        raise FinqloraError(
            f"adapter {name!r}: {folder} has no adapter_config.json",
            hint="pass the folder written by `finqlora train --output-dir` (or one of its checkpoint-N folders)",
        )
    if not (folder / "adapter_model.safetensors").is_file():
        found = "adapter_model.bin (a pickle, which can run code when loaded)" if (folder / "adapter_model.bin").exists() else "no weights"
        raise FinqloraError(
            f"adapter {name!r}: {folder} has no adapter_model.safetensors ({found})",
            hint="the server loads safetensors only; re-save the adapter with save_pretrained(safe_serialization=True)",
        )
    _check_adapter_config(name, folder / "adapter_config.json")
    _check_adapter_weights(name, folder / "adapter_model.safetensors")
    _check_tokenizer_files(name, folder)
    return folder.resolve()


def attach_adapters(model: Any, adapter_dirs: Mapping[str, Path]) -> Any:
    """Load every adapter onto the one base (peft multi-adapter); switching is then free."""
    if not adapter_dirs:
        return model
    from peft import PeftModel
    from safetensors import SafetensorError

    items = list(adapter_dirs.items())
    try:
        first_name, first_dir = items[0]
        peft_model = PeftModel.from_pretrained(model, str(first_dir), adapter_name=first_name, is_trainable=False)
        for name, folder in items[1:]:
            peft_model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise FinqloraError(
            f"could not attach the adapters to this base model: {exc}",
            hint="an adapter only fits the base it was trained on; check base_model_name_or_path in its adapter_config.json",
        ) from exc
    return peft_model
