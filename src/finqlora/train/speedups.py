"""Speed profiles: the levers that make LoRA/QLoRA training faster or leaner.

A profile is a named set of choices that `finqlora train --profile NAME` (TrainConfig.profile)
applies on top of the run config. The training code uses three calls:

    profile = get_profile(config.profile)
    apply_model_speedups(model, profile)          # after peft wraps the model
    collator = make_data_collator(tokenizer, profile, attn_implementation=attention_implementation(model))

and, when `profile.packing` is on, `pack_by_token_budget(...)` to group samples into
micro-batches of at most `tokens_per_micro_batch(profile, batch_size, max_length)` tokens.

The levers (docs/performance.md has the measured effect of each):

- padding-free packing: a micro-batch is one row holding several samples back to back, with
  `position_ids` restarting at 0 for each sample. transformers turns restarting position ids
  into a block-diagonal causal mask (sdpa/eager/flex) or varlen boundaries (flash attention),
  so no token attends across samples, and no compute is spent on padding;
- a token budget per micro-batch instead of a fixed number of samples, so short samples fill
  the same memory that a batch of long ones would, laid out in `pack_rows` rows of similar
  length (attention cost grows with the square of a row's length);
- answer-only logits: the lm_head and cross-entropy run only at positions that have a label
  (prompt tokens carry -100 and need no logits); the loss is the same number;
- Liger kernels on CUDA: fused linear + cross-entropy (the 102,400-entry vocabulary of
  deepseek-7b makes logits the largest activation), RMSNorm, SwiGLU and RoPE in Triton;
- flash / memory-efficient attention instead of cuDNN's, whose per-call CPU planning dominated
  steps on the H200 we measured (the steps there are CPU-bound);
- varlen attention on GPUs with flash attention (compute capability 8.0+): packed samples go
  through torch's `varlen_attn` with per-sample boundaries, so attention costs the sum of the
  squared sample lengths instead of a full masked square per row;
- bf16 autocast on CPUs with native bf16 matrix units (AMX / AVX512-BF16), with LoRA's updates
  added in fp32 (in bf16 they are rounded away early in training);
- gradient checkpointing only when memory needs it, 4-bit only when memory needs it;
- fused LoRA projections (`kernels.install_fused_lora`): one autograd function per adapted
  layer instead of peft's and bitsandbytes' Python layers, LoRA dropout kept; and
  checkpointing with the layer inputs offloaded to pinned CPU memory
  (`kernels.install_offloaded_checkpointing`). Both keep the run config's batches, for the
  small-batch steps that wait on the CPU.

Explicit values in a run config win over a profile's; a profile field of `None` means "the run
config decides" (the standard recipe), which is what the `default` profile does everywhere.
"""

from __future__ import annotations

import functools
import random
import types
from collections.abc import Callable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.hardware import cpu_has_fast_bf16


@dataclass(frozen=True)
class SpeedProfile:
    """One named set of speed/memory levers (None = leave the choice to the run config)."""

    name: str
    description: str
    # Padding-free micro-batches: samples concatenated in one row, position ids restart per sample.
    packing: bool = False
    # Tokens per packed micro-batch = budget_scale * batch_size * max_length (1 = same worst-case
    # memory as a padded batch of batch_size x max_length).
    budget_scale: int = 1
    # A micro-batch's samples are laid out in this many packed rows of similar length (attention
    # cost grows with the square of a row's length, so many tokens go in several rows).
    pack_rows: int = 1
    # lm_head + cross-entropy only where a label exists (the prompt needs no logits).
    answer_only_logits: bool = False
    # Liger-kernel Triton kernels (CUDA only): fused linear+CE, RMSNorm, SwiGLU, RoPE.
    liger: bool = False
    gradient_checkpointing: bool | None = None
    load_in_4bit: bool | None = None
    # "bf16" | "fp16" | "fp32"; None = the run config's compute_dtype (auto).
    compute_dtype: str | None = None
    # cuDNN's fused attention (PyTorch's first choice on Hopper) costs ~1.5 ms of CPU per call
    # to plan each new shape; packed rows change shape every step, so use flash/mem-efficient.
    avoid_cudnn_attention: bool = False
    # Packed samples attend through torch's varlen flash kernel (per-sample boundaries, one row
    # per micro-batch) instead of sdpa with a block-diagonal mask that still computes every
    # masked block. CUDA with compute capability 8.0+ only; elsewhere the masked path runs.
    varlen_attention: bool = False
    # prepare_model_for_kbit_training casts norms, embeddings and lm_head to fp32; with fused
    # kernels that is memory and time for no gain, so fast profiles keep them in compute dtype.
    upcast_frozen_to_fp32: bool = True
    # Over a bf16 base: each adapted layer's frozen output is cast to fp32 before LoRA's update
    # is added (in bf16 that small update is rounded to the base output's precision, 2^-8
    # relative), so the adapted blocks carry fp32 activations; the frozen products stay bf16.
    lora_update_in_fp32: bool = False
    # Each decoder layer compiled as one region (finqlora.train.compiled): adapted projections in
    # plain operations (NF4 dequantized in torch ops), norms, RoPE, SwiGLU, dropout and the LoRA add
    # fused by the compiler. Liger is then used for the fused linear cross-entropy only.
    compiled_layers: bool = False
    # CUDA memory in expandable segments (what Unsloth sets when imported): with a new sequence
    # length every step, reserved memory then stays close to what is allocated.
    expandable_segments: bool = False
    # A T4 (sm75) has no flash attention: T4 profiles use the memory-efficient kernel everywhere,
    # so a benchmark on a newer GPU runs what a T4 runs.
    avoid_flash_attention: bool = False
    # Each adapted projection in one autograd function (frozen weight dequantized in place, LoRA
    # product accumulated into the base output, dropout on the LoRA input kept): far less
    # per-call CPU work than peft + bitsandbytes, which is what a small-batch step waits for.
    fused_lora: bool = False
    # Gradient checkpointing keeps each decoder layer's input in pinned CPU memory, not on the GPU.
    offload_activations: bool = False
    # TrainingArguments.optim; None = the run config's (paged_adamw_8bit on CUDA).
    optimizer: str | None = None
    # Pad lengths to a multiple of this (tensor-core friendly shapes) in padded batches.
    pad_to_multiple_of: int | None = None
    # Right-padded batches go to the model without a padding mask: in a causal model no real token
    # attends to a pad that follows it, so the outputs at labelled positions are the same, and sdpa
    # can take flash attention instead of the masked memory-efficient kernel.
    drop_right_padding_mask: bool = False
    # The frozen input embedding table (0.78 GiB in a 7B model) stays in pinned host memory: a step
    # reads only its batch's rows (CUDA, frozen embeddings not tied to the head; kernels.HostEmbedding).
    offload_input_embeddings: bool = False
    # Compiled layers dequantize each NF4 weight again in the backward pass instead of keeping the
    # dense weights of a layer between its forward and backward passes (less memory, more work).
    recompute_dequantized_weights: bool = True
    # Compiled layers launch their kernels from generated C++ instead of Python (small-batch steps
    # wait on the CPU; costs a longer first compilation).
    compile_cpp_wrapper: bool = False
    # Gradient checkpointing on only as many decoder layers as free GPU memory requires, sized for
    # each micro-batch; the other layers keep their activations and skip the recomputation
    # (finqlora.train.recompute). CUDA only; with checkpointing off it does nothing.
    memory_sized_checkpointing: bool = False


PROFILES: dict[str, SpeedProfile] = {
    profile.name: profile
    for profile in (
        SpeedProfile(
            name="default",
            description="the standard recipe, unchanged: padded batches, settings from the run config",
        ),
        SpeedProfile(
            name="t4",
            description="16 GB GPUs (T4, fp16): 4-bit base, gradient checkpointing, micro-batches of 4 packed "
            "rows of batch_size x max_length tokens, answer-only logits, Liger kernels",
            packing=True,
            budget_scale=4,
            pack_rows=4,
            answer_only_logits=True,
            liger=True,
            gradient_checkpointing=True,
            load_in_4bit=True,
            compute_dtype="fp16",
            upcast_frozen_to_fp32=False,
            avoid_cudnn_attention=True,
        ),
        SpeedProfile(
            name="fast",
            description="GPUs with memory to spare (24 GB+): 4-bit base, micro-batches of 8 x batch_size x "
            "max_length packed tokens, varlen attention, answer-only logits, Liger kernels, gradient checkpointing "
            "on only as many layers as free memory requires",
            packing=True,
            budget_scale=8,
            pack_rows=8,
            answer_only_logits=True,
            liger=True,
            gradient_checkpointing=True,
            load_in_4bit=True,
            upcast_frozen_to_fp32=False,
            avoid_cudnn_attention=True,
            varlen_attention=True,
            memory_sized_checkpointing=True,
        ),
        SpeedProfile(
            name="fast-bf16",
            description="like fast, but the base stays in bf16 (no 4-bit quantization: ~14 GB for a 7B model "
            "instead of ~4 GB, no dequantization work); an explicit choice for large GPUs",
            packing=True,
            budget_scale=8,
            pack_rows=8,
            answer_only_logits=True,
            liger=True,
            gradient_checkpointing=True,
            load_in_4bit=False,
            compute_dtype="bf16",
            upcast_frozen_to_fp32=False,
            avoid_cudnn_attention=True,
            varlen_attention=True,
            memory_sized_checkpointing=True,
        ),
        SpeedProfile(
            name="fused",
            description="the run config's batches (same samples per step as the standard recipe): 4-bit base, "
            "fused LoRA projections (dropout kept), Liger kernels, answer-only fused cross-entropy, no fp32 upcast, "
            "checkpointing with layer inputs offloaded to CPU memory",
            answer_only_logits=True,
            liger=True,
            gradient_checkpointing=True,
            load_in_4bit=True,
            upcast_frozen_to_fp32=False,
            avoid_cudnn_attention=True,
            fused_lora=True,
            offload_activations=True,
        ),
        SpeedProfile(
            name="t4-fused",
            description="fused for 16 GB GPUs (T4, sm75): the same levers in fp16, only kernels that run on sm75 "
            "(no bf16, no flash varlen attention), the run config's batches",
            answer_only_logits=True,
            liger=True,
            gradient_checkpointing=True,
            load_in_4bit=True,
            compute_dtype="fp16",
            avoid_flash_attention=True,
            upcast_frozen_to_fp32=False,
            avoid_cudnn_attention=True,
            fused_lora=True,
            offload_activations=True,
        ),
        SpeedProfile(
            name="cpu",
            description="CPU LoRA (no 4-bit): packed micro-batches without padding, answer-only logits, and bf16 "
            "products where the CPU has native bf16 matrix units (AMX / AVX512-BF16; LoRA updates added in fp32), "
            "else fp32; no Triton kernels",
            packing=True,
            budget_scale=1,
            answer_only_logits=True,
            lora_update_in_fp32=True,
            liger=False,
            gradient_checkpointing=False,
            load_in_4bit=False,
            compute_dtype=None,  # set below from the CPU's abilities
            upcast_frozen_to_fp32=False,
        ),
    )
}


PROFILES["cpu"] = dataclasses.replace(PROFILES["cpu"], compute_dtype="bf16" if cpu_has_fast_bf16() else "fp32")
# The compiled profiles are the fused ones with the whole layer compiled instead of each projection fused.
PROFILES["compiled"] = dataclasses.replace(
    PROFILES["fused"],
    name="compiled",
    description="the run config's batches (same samples per step as the standard recipe): 4-bit base, "
    "each decoder layer compiled as one region (NF4 dequantization, LoRA with dropout, norms, RoPE and "
    "SwiGLU fused; C++ launcher), answer-only fused cross-entropy, no fp32 upcast, checkpointing with "
    "layer inputs offloaded to CPU memory, input embedding table in host memory, right-padded batches "
    "without a padding mask, fused AdamW",
    fused_lora=False,
    compiled_layers=True,
    expandable_segments=True,
    drop_right_padding_mask=True,
    offload_input_embeddings=True,
    # The 0.78 GiB the embedding table leaves free pays for keeping each layer's dense weights
    # between its forward and backward passes (+0.29 GiB at the peak in a 7B model).
    recompute_dequantized_weights=False,
    compile_cpp_wrapper=True,
    # LoRA's optimizer state is small (150 MB in fp32 for a 7B model at r=8); paged 8-bit AdamW
    # spends CPU time in one launch per tensor each step, the fused kernel in a few for all.
    optimizer="adamw_torch_fused",
)
# Packed micro-batches keep the GPU busy, so compiling pays in fused elementwise work, not in launches.
PROFILES["fast-compiled"] = dataclasses.replace(
    PROFILES["fast"],
    name="fast-compiled",
    description="fast with each decoder layer compiled as one region (NF4 dequantization, LoRA with dropout, "
    "norms, RoPE and SwiGLU fused); the first steps wait a minute or two for the compiler",
    compiled_layers=True,
)
PROFILES["t4-compiled"] = dataclasses.replace(
    PROFILES["compiled"],
    name="t4-compiled",
    description="compiled for 16 GB GPUs (T4, sm75): the same levers in fp16 with kernels that run on sm75 "
    "(no bf16, no flash attention), the run config's batches",
    compute_dtype="fp16",
    avoid_flash_attention=True,
)


def get_profile(name: str) -> SpeedProfile:
    """The profile called `name` (case-insensitive); a clear error lists the known ones."""
    key = (name or "").strip().lower()
    if key in PROFILES:
        return PROFILES[key]
    known = ", ".join(f"{p.name} ({p.description.split(':')[0]})" for p in PROFILES.values())
    raise FinqloraError(
        f"unknown speed profile {name!r}",
        hint=f"use one of: {known}; e.g. --set train.profile=t4",
    )


def profile_as_dict(profile: SpeedProfile) -> dict[str, Any]:
    """The profile's fields, for training_info.json."""
    return {f.name: getattr(profile, f.name) for f in fields(profile)}


def tokens_per_micro_batch(profile: SpeedProfile, batch_size: int, max_length: int) -> int:
    """Token budget of one packed micro-batch (same worst case as batch_size x max_length at scale 1)."""
    return int(profile.budget_scale) * int(batch_size) * int(max_length)


# ---------------------------------------------------------------------------------------------
# Data: packing and collators


def pack_by_token_budget(lengths: Sequence[int], token_budget: int, *, seed: int = 0) -> list[list[int]]:
    """Group sample indices into micro-batches of at most `token_budget` tokens.

    Samples are shuffled with `seed` (so the model sees a random mix, as with a plain random
    sampler) and then placed first-fit into open micro-batches, which fills them to ~95%+ when
    samples are short compared to the budget. The result depends only on (lengths, budget,
    seed): a resumed run gets the same micro-batches. Call it once per epoch with seed+epoch.
    """
    if token_budget < 1:
        raise FinqloraError(f"token budget must be positive, got {token_budget}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        index, length = too_long[0]
        raise FinqloraError(
            f"sample {index} has {length} tokens, more than the micro-batch token budget of {token_budget}",
            hint="samples are trimmed to max_length when tokenized; raise batch_size or max_length so that "
            "batch_size x max_length >= max_length, or trim the dataset",
        )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        need = int(lengths[index])
        for b, free in enumerate(room):
            if need <= free:
                bins[b].append(index)
                room[b] -= need
                break
        else:
            bins.append([index])
            room.append(token_budget - need)
    return bins


class PackedCollator:
    """Lays samples (or packs of samples) out in padding-free rows with per-sample positions.

    A feature is a sample `{"input_ids": [...], "labels": [...]}` or a pack `{"pack": [sample,
    ...]}` from `pack_by_token_budget`. With `rows=1` every sample of the micro-batch goes into
    one row; with `rows=k` they are spread over k rows of similar length (longest first into the
    shortest row), and shorter rows are topped up with a padding segment that is its own
    sequence and carries no labels. The flattening itself is transformers'
    `DataCollatorWithFlattening`: `position_ids` restart at 0 for each sample and the first label
    of each sample is -100, so no sample predicts the next one's first token. The batch also
    carries `use_cache=False`, without which the attention would not be confined to each sample.
    """

    def __init__(self, rows: int = 1, return_flash_attn_kwargs: bool = False) -> None:
        from transformers import DataCollatorWithFlattening

        self.rows = max(int(rows), 1)
        self._flatten = DataCollatorWithFlattening(
            return_position_ids=True, return_flash_attn_kwargs=return_flash_attn_kwargs and self.rows == 1
        )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        samples: list[dict[str, Any]] = []
        for feature in features:
            for sample in feature["pack"] if "pack" in feature else [feature]:
                samples.append({"input_ids": list(sample["input_ids"]), "labels": list(sample["labels"])})
        if not samples:
            raise FinqloraError("empty micro-batch", hint="the dataset has no samples for this step")
        if self.rows == 1 or len(samples) == 1:
            batch = self._flatten(samples, return_tensors="pt")
        else:
            batch = self._stack_rows([self._flatten(row, return_tensors="pt") for row in self._balance(samples)])
        # transformers detects packed samples from restarting position ids only when no KV cache
        # exists; a model that builds one (use_cache=True, the default of most configs outside
        # gradient checkpointing) would silently let samples attend to each other.
        batch["use_cache"] = False
        return batch

    def _balance(self, samples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        rows: list[list[dict[str, Any]]] = [[] for _ in range(min(self.rows, len(samples)))]
        sizes = [0] * len(rows)
        for sample in sorted(samples, key=lambda s: -len(s["input_ids"])):
            target = sizes.index(min(sizes))
            rows[target].append(sample)
            sizes[target] += len(sample["input_ids"])
        return rows

    @staticmethod
    def _stack_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(row["input_ids"].shape[1] for row in rows)
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            pad = width - row["input_ids"].shape[1]
            out["input_ids"].append(torch.nn.functional.pad(row["input_ids"], (0, pad), value=0))
            out["labels"].append(torch.nn.functional.pad(row["labels"], (0, pad), value=-100))
            # The padding is a sequence of its own (positions restart at 0), so no sample sees it.
            positions = torch.arange(pad, dtype=row["position_ids"].dtype).unsqueeze(0)
            out["position_ids"].append(torch.cat([row["position_ids"], positions], dim=1))
        return {key: torch.cat(value, dim=0) for key, value in out.items()}


def make_data_collator(tokenizer: Any, profile: SpeedProfile, *, attn_implementation: str | None = None) -> Callable:
    """The collator for `profile`: padding-free packing, or dynamic padding with -100 labels.

    Pass the model's `attention_implementation(model)`: varlen and flash attention take one
    packed row with sample boundaries (`cu_seq_lens_*`) instead of several masked rows.
    """
    if profile.packing:
        if attn_implementation == VARLEN_ATTENTION or "flash" in (attn_implementation or ""):
            return PackedCollator(rows=1, return_flash_attn_kwargs=True)
        return PackedCollator(rows=profile.pack_rows)
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        raise FinqloraError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad token, so batches cannot be padded",
            hint="set tokenizer.pad_token = tokenizer.eos_token before building the collator, or use a packing profile",
        )
    collate = DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,
        label_pad_token_id=-100,
        pad_to_multiple_of=profile.pad_to_multiple_of,
        return_tensors="pt",
    )
    return RightPaddingWithoutMask(collate) if profile.drop_right_padding_mask else collate


class RightPaddingWithoutMask:
    """Drops the attention mask of batches whose padding is all on the right, with unlabelled pads.

    A causal model's real tokens then see exactly what they saw with the mask (every pad comes
    after them), positions are the same (0, 1, ... per row either way), and the pads' own outputs
    carry no label. Without a mask, sdpa runs flash attention (causal) where the GPU has it, and
    transformers builds no 4-D mask. Any other batch keeps its mask.
    """

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.collate(features)
        if right_padded_without_labels(batch.get("attention_mask"), batch.get("labels")):
            del batch["attention_mask"]
        return batch


def right_padded_without_labels(mask: Any, labels: Any) -> bool:
    """Every row is real tokens then pads (mask 1...1 0...0) and no pad has a label."""
    if mask is None or labels is None or mask.dim() != 2 or labels.shape != mask.shape:
        return False
    starts_real = bool((mask[:, 0] == 1).all())
    never_returns = bool((mask[:, 1:] <= mask[:, :-1]).all())
    return starts_real and never_returns and bool((labels[mask == 0] == -100).all())


# ---------------------------------------------------------------------------------------------
# Model levers


def _causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_model_speedups(model: Any, profile: SpeedProfile) -> Any:
    """Apply the profile's model-side levers in place (call after peft wraps the model).

    Returns the model.
    """
    import torch

    lm = _causal_lm(model)
    device = next(lm.parameters()).device
    if profile.avoid_cudnn_attention and device.type == "cuda":
        # Process-wide: the training process is the only user of attention here.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if profile.expandable_segments and device.type == "cuda":
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    if profile.avoid_flash_attention and device.type == "cuda":
        torch.backends.cuda.enable_flash_sdp(False)
    if profile.liger:
        if device.type != "cuda":
            raise FinqloraError(
                f"speed profile {profile.name!r} uses Liger (Triton) kernels, which need a CUDA GPU; "
                f"this model is on {device.type}",
                hint="use --set train.profile=cpu on the CPU",
            )
        if not profile.compiled_layers:  # the compiler fuses norms, RoPE and SwiGLU itself
            _apply_liger(lm)
    if profile.lora_update_in_fp32 and next(lm.parameters()).dtype == torch.bfloat16:
        _add_lora_updates_in_fp32(lm)
    if profile.varlen_attention and packed_varlen_available(device):
        _install_varlen_attention(lm)
    if profile.answer_only_logits:
        _install_answer_only_loss(lm, fused=profile.liger)
    if profile.fused_lora:
        from finqlora.train.kernels import install_fused_lora

        install_fused_lora(lm)
    if profile.offload_activations:
        from finqlora.train.kernels import install_offloaded_checkpointing

        install_offloaded_checkpointing(lm, compiled_layers=profile.compiled_layers)
    if profile.offload_input_embeddings and device.type == "cuda":
        from finqlora.train.kernels import offload_input_embeddings

        offload_input_embeddings(lm)
    if profile.compiled_layers:
        from finqlora.train.compiled import compile_decoder_layers

        compile_decoder_layers(lm, recompute_weights=profile.recompute_dequantized_weights,
                               cpp_wrapper=profile.compile_cpp_wrapper)
    if profile.memory_sized_checkpointing and device.type == "cuda":
        from finqlora.train.recompute import install_memory_sized_checkpointing

        install_memory_sized_checkpointing(lm)
    return model


def _add_lora_updates_in_fp32(lm: Any) -> None:
    """Cast adapted layers' frozen outputs to fp32 (see the profile field); bf16 layers cast their
    inputs, so the model also runs outside autocast (evaluation, generation)."""
    import torch
    from peft.tuners.lora import LoraLayer

    modules = dict(lm.named_modules())
    for module in modules.values():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.bfloat16:
            module.register_forward_pre_hook(_input_to_weight_dtype)
    # Every linear beside an adapted one goes fp32 too (with LoRA on q and v only, k must match).
    parents = {name.rsplit(".", 1)[0] for name, module in modules.items() if isinstance(module, LoraLayer) and "." in name}
    for parent in parents:
        for child in modules[parent].children():
            base = child.get_base_layer() if isinstance(child, LoraLayer) else child
            if isinstance(base, torch.nn.Linear) and base.weight.dtype == torch.bfloat16:
                base.register_forward_hook(_output_to_fp32)


def _input_to_weight_dtype(module: Any, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


def _output_to_fp32(module: Any, inputs: Any, output: Any) -> Any:
    return output.float()


def attention_implementation(model: Any) -> str:
    """The attention implementation the (peft-wrapped) model runs, e.g. "sdpa" or VARLEN_ATTENTION."""
    return str(getattr(_causal_lm(model).config, "_attn_implementation", None) or "")


# ---------------------------------------------------------------------------------------------
# Varlen attention: packed samples through torch's flash kernel with per-sample boundaries

VARLEN_ATTENTION = "finqlora_varlen"


def packed_varlen_available(device: Any) -> bool:
    """Whether torch's varlen flash attention runs here (CUDA, compute capability 8.0+)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _install_varlen_attention(lm: Any) -> None:
    """Register the varlen attention (and its mask rule) with transformers and switch `lm` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_attention_mask)
    lm.set_attn_implementation(VARLEN_ATTENTION)


def _varlen_attention_mask(*args: Any, **kwargs: Any) -> Any:
    """No mask for unpadded (packed) input: varlen attention takes its boundaries from
    `cu_seq_lens_*`. Padded input (batched generation) gets sdpa's mask and the sdpa path."""
    if kwargs.get("attention_mask") is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _varlen_causal_kwargs() -> dict[str, Any]:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    # torch 2.10 takes is_causal; 2.11+ expresses causality as window_size=(-1, 0).
    if "window_size" in inspect.signature(varlen_attn).parameters:
        return {"window_size": (-1, 0)}
    return {"is_causal": True}


def varlen_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """A transformers attention function: causal attention confined to each packed sample.

    query/key/value are (batch, heads, tokens, head_dim). With `cu_seq_lens_q` (one packed row
    from the collator) torch's varlen flash kernel runs; without it (generation, padded batches)
    this is transformers' sdpa attention with the mask it was given.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_q = kwargs.get("cu_seq_lens_q")
    if cu_seq_q is None:
        position_ids = kwargs.get("position_ids")
        if attention_mask is None and query.shape[2] > 1 and position_ids is not None \
                and bool((position_ids[:, 1:] == 0).any()):
            raise FinqloraError(
                "packed samples reached varlen attention without their boundaries (cu_seq_lens_q); "
                "they would attend to each other",
                hint="build batches with speedups.make_data_collator(tokenizer, profile, "
                "attn_implementation=speedups.attention_implementation(model))",
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise FinqloraError(f"varlen attention takes one packed row per micro-batch, got {query.shape[0]}",
                            hint="use speedups.make_data_collator(..., attn_implementation=...) for packed batches")
    if dropout:
        raise FinqloraError("varlen attention does not implement attention dropout",
                            hint="set the model's attention_dropout to 0 or use a profile without varlen_attention")
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (t.transpose(1, 2)[0].contiguous() for t in (query, key, value))  # (tokens, heads, head_dim)
    if q.dtype not in (torch.float16, torch.bfloat16):
        # The flash kernel takes half precision only; fp32 activations (norms upcast by
        # prepare_model_for_kbit_training) run it in the autocast dtype, as sdpa would under autocast.
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat each key/value head
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    cu_seq_k = kwargs.get("cu_seq_lens_k", cu_seq_q)
    out = varlen_attn(q, k, v, cu_seq_q.to(torch.int32), cu_seq_k.to(torch.int32), int(kwargs["max_length_q"]),
                      int(kwargs.get("max_length_k", kwargs["max_length_q"])), scale=scaling, **_varlen_causal_kwargs())
    return out.to(query.dtype).unsqueeze(0), None


def _apply_liger(lm: Any) -> None:
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise FinqloraError(
            "this speed profile needs liger-kernel, which is not installed",
            hint="pip install liger-kernel (CUDA GPUs only), or choose the default profile",
        ) from exc
    # The fused linear+CE is done by our answer-only loss (same kernel, fewer rows), so Liger's
    # own forward patch is left off; its RMSNorm, SwiGLU and RoPE kernels are applied in place.
    _apply_liger_kernel_to_instance(model=lm, fused_linear_cross_entropy=False, cross_entropy=False)


def _install_answer_only_loss(lm: Any, *, fused: bool) -> None:
    """Replace the model's training forward with one that computes logits only where labels exist.

    In eval mode, or without labels, the original forward runs (full logits, e.g. for generate).
    """
    if getattr(lm, "_finqlora_answer_only", False):
        return
    inner = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if inner is None or head is None:
        raise FinqloraError(
            f"{type(lm).__name__} has no decoder/lm_head pair, so answer-only logits cannot be used",
            hint="use the default speed profile for this model",
        )
    original_forward = lm.forward

    def forward(self: Any, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if labels is None or not self.training or kwargs.get("return_dict") is False:
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        kwargs.pop("use_cache", None)
        outputs = inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, **kwargs)
        loss = answer_only_loss(outputs.last_hidden_state, head.weight, labels,
                                num_items_in_batch=num_items_in_batch, fused=fused,
                                logit_softcap=getattr(self.config, "final_logit_softcapping", None))
        return CausalLMOutputWithPast(loss=loss, logits=None)

    lm.forward = types.MethodType(forward, lm)
    lm._finqlora_answer_only = True


def answer_only_loss(hidden: Any, head_weight: Any, labels: Any, *, num_items_in_batch: Any = None,
                     fused: bool = False, logit_softcap: float | None = None) -> Any:
    """Causal-LM cross-entropy computed from hidden states at labelled positions only.

    Equals transformers' ForCausalLMLoss on full logits: position t predicts labels[t+1]; the
    sum over labelled tokens is divided by `num_items_in_batch` when given (gradient
    accumulation), else by the number of labelled tokens.
    """
    import torch
    import torch.nn.functional as F

    if logit_softcap:
        raise FinqloraError("answer-only logits do not support final-logit softcapping models",
                            hint="use the default speed profile for this model")
    shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    keep = shift_labels != -100
    rows = hidden[keep]
    targets = shift_labels[keep]
    if rows.shape[0] == 0:
        # Nothing to learn in this micro-batch: a zero that still connects to the graph.
        return hidden.sum() * 0.0
    if fused:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        total = liger_fused_linear_cross_entropy(rows, head_weight.to(rows.dtype), targets, reduction="sum")
    else:
        logits = F.linear(rows, head_weight).float()
        total = F.cross_entropy(logits, targets, reduction="sum")
    denominator = num_items_in_batch if num_items_in_batch is not None else rows.shape[0]
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator
