"""The model patches of a speed profile, applied after peft wraps the model.

`apply_model_speedups(model, profile)` turns on the profile's model-side levers: attention
kernel choices, Liger kernels, LoRA updates in fp32 over a bf16 base, varlen attention for
packed samples, the answer-only loss, and the fused, offloaded and compiled layers of
finqlora.train.kernels, .compiled and .recompute. The levers themselves are described in
finqlora.core.profiles; their measured effect in docs/performance.md.
"""

from __future__ import annotations

import functools
import types
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.profiles import SpeedProfile


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
                hint="build batches with finqlora.train.collate.make_data_collator(tokenizer, profile, "
                "attn_implementation=finqlora.train.patches.attention_implementation(model))",
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise FinqloraError(f"varlen attention takes one packed row per micro-batch, got {query.shape[0]}",
                            hint="use finqlora.train.collate.make_data_collator(..., attn_implementation=...) for packed batches")
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
