"""The speed profiles (`train.profile`): named sets of the levers that make LoRA/QLoRA training faster or leaner.

This is the one registry: the run config checks `train.profile` against `PROFILE_NAMES` when it
is loaded, before any stage runs, and training takes its profile from here through
`finqlora.train.profiles.get_profile`, which also makes the choices that depend on the machine
(the `cpu` profile's precision). Nothing here probes the hardware or imports torch.

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

How training applies them: `finqlora.train.setup.prepare_model_and_data` patches the model
(`finqlora.train.patches`) and picks the collator and packs the samples (`finqlora.train.collate`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# A compute dtype decided on the machine: bf16 where the CPU multiplies bf16 natively (AMX /
# AVX512-BF16), else fp32 (finqlora.train.profiles.get_profile makes the choice).
BF16_WHERE_NATIVE = "bf16-where-native"


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
    # "bf16" | "fp16" | "fp32" | BF16_WHERE_NATIVE (bf16 or fp32, chosen on the machine); None = the run
    # config's compute_dtype (auto).
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
            compute_dtype=BF16_WHERE_NATIVE,
            upcast_frozen_to_fp32=False,
        ),
    )
}


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


PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)
