"""Decoder layers compiled as one region each, for QLoRA steps that wait on the CPU.

At the recipe's 4 samples per step (~1,700 tokens) a QLoRA step on a large GPU is bound by the
CPU: each of the seven adapted projections of a layer costs a dozen Python-dispatched kernels
(bitsandbytes' dequantization and checks, peft's adapter lookups, dropout, casts, three
products and an add), and gradient checkpointing runs every layer forward twice. Compiling the
whole decoder layer turns that into a short list of generated kernels per layer, and lets the
compiler fuse what eager mode runs one by one (RMSNorm, RoPE, SwiGLU, dropout, the LoRA add).

What makes the layer compilable: every adapted projection computes its frozen weight from plain
tensors (`nf4_dequantize`, the bitsandbytes NF4 + double-quantization layout written in torch
operations, bit-identical to `bitsandbytes.functional.dequantize_4bit`) instead of calling into
bitsandbytes, and the LoRA update is written as ordinary operations, so the compiler derives the
backward pass (keeping each dense weight for it, or dequantizing again there: `recompute_weights`). The
projections stay peft LoRA layers (same parameters, same state dict, same adapter files); only
their forward changes, and anything unusual (disabled or merged adapters, several active
adapters, DoRA) takes peft's own forward.

One compiled graph serves all layers: they share code and shapes, and their parameters are
graph inputs. Sequence lengths are dynamic, so padded batches of any length reuse it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint

# ---------------------------------------------------------------------------------------------
# NF4 dequantization in torch operations


def nf4_dequantize(packed: torch.Tensor, absmax_codes: torch.Tensor, absmax_code: torch.Tensor,
                   absmax_scale: torch.Tensor, absmax_offset: torch.Tensor, code: torch.Tensor,
                   blocksize: int, absmax_blocksize: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of a bitsandbytes NF4 tensor with double-quantized block scales.

    bitsandbytes stores two 4-bit code indices per byte (the first element in the high nibble),
    one scale per `blocksize` elements, and those scales themselves 8-bit quantized: scale =
    absmax_code[absmax_codes] * absmax_scale[block // absmax_blocksize] + absmax_offset.
    """
    blocks = absmax_codes.shape[0]
    block_ids = torch.arange(blocks, device=packed.device)
    scales = absmax_code[absmax_codes.long()] * absmax_scale[block_ids // absmax_blocksize] + absmax_offset
    flat = packed.reshape(-1)
    indices = torch.stack((flat >> 4, flat & 15), dim=-1).reshape(-1).long()
    values = code[indices].view(blocks, blocksize) * scales.view(blocks, 1)
    return values.view(shape).to(dtype)


_NF4_BUFFERS = ("packed", "absmax_codes", "absmax_code", "absmax_scale", "absmax_offset", "code")


def _attach_frozen_weight(layer: Any) -> None:
    """Expose the frozen weight of a peft LoRA layer as plain tensors (shared storage, not saved).

    A 4-bit base gets its packed codes and quantization state as non-persistent buffers; a
    dense base is used as is. The quantization layout must be NF4 with double quantization
    (what the 4-bit recipe loads); anything else is refused with the profile to use instead.
    """
    from finqlora.core.errors import FinqloraError

    base = layer.get_base_layer()
    state = getattr(base.weight, "quant_state", None)
    layer._finqlora_nf4 = state is not None
    if state is None:
        return
    if state.quant_type != "nf4" or not state.nested:
        raise FinqloraError(
            f"compiled layers need NF4 weights with double quantization, this layer has "
            f"{state.quant_type} (double quantization {'on' if state.nested else 'off'})",
            hint="load with bnb_4bit_quant_type='nf4' and bnb_4bit_use_double_quant=True, or use --profile fused",
        )
    tensors = (base.weight.data.view(torch.uint8), state.absmax, state.state2.code, state.state2.absmax,
               state.offset.reshape(()), state.code)
    for name, tensor in zip(_NF4_BUFFERS, tensors):
        layer.register_buffer(f"_finqlora_nf4_{name}", tensor, persistent=False)
    layer._finqlora_nf4_layout = (int(state.blocksize), int(state.state2.blocksize), tuple(state.shape), state.dtype)


def frozen_weight(layer: Any) -> torch.Tensor:
    """The dense frozen weight of an adapted layer prepared by `_attach_frozen_weight`."""
    if not layer._finqlora_nf4:
        return layer.get_base_layer().weight
    blocksize, absmax_blocksize, shape, dtype = layer._finqlora_nf4_layout
    tensors = [getattr(layer, f"_finqlora_nf4_{name}") for name in _NF4_BUFFERS]
    if not layer._finqlora_nf4_recompute:
        return nf4_dequantize(*tensors, blocksize, absmax_blocksize, shape, dtype)
    # Checkpointed: the backward pass dequantizes again. Otherwise the compiler's partitioner
    # keeps each dense weight for the backward pass (7 per layer, 0.4 GB in a 7B model's layer).
    return torch.utils.checkpoint.checkpoint(nf4_dequantize, *tensors, blocksize, absmax_blocksize, shape, dtype,
                                             use_reentrant=False)


# ---------------------------------------------------------------------------------------------
# Adapted projections as plain operations


class _TracedLoRAForward:
    """Mixed into a peft LoRA Linear class: y = x W^T + b + scale * B(A(dropout(x))) in plain ops."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        adapters = self.active_adapters
        if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1 \
                or adapters[0] not in self.lora_A or self.use_dora.get(adapters[0], False):
            return super().forward(x, *args, **kwargs)
        name = adapters[0]
        weight = frozen_weight(self)
        dtype = weight.dtype
        x = x.to(dtype)
        bias = self.get_base_layer().bias
        out = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(dtype))
        dropout = self.lora_dropout[name]
        dropped = torch.nn.functional.dropout(x, float(getattr(dropout, "p", 0.0)), self.training)
        update = torch.nn.functional.linear(dropped, self.lora_A[name].weight.to(dtype))
        update = torch.nn.functional.linear(update, self.lora_B[name].weight.to(dtype))
        return out + update * self.scaling[name]


_TRACED_CLASSES: dict[type, type] = {}


def _traced_class(cls: type) -> type:
    if cls not in _TRACED_CLASSES:
        _TRACED_CLASSES[cls] = type(f"Traced{cls.__name__}", (_TracedLoRAForward, cls), {"__module__": __name__})
    return _TRACED_CLASSES[cls]


def install_traced_lora(model: torch.nn.Module, *, recompute_weights: bool = True) -> int:
    """Give every peft LoRA Linear of `model` the plain-operation forward; returns how many.

    `recompute_weights`: a 4-bit weight is dequantized again for the backward pass (False: the
    dense weights of a layer are kept from its forward to its backward pass).
    """
    from peft.tuners.lora import LoraLayer

    switched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or isinstance(module, _TracedLoRAForward):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        _attach_frozen_weight(module)
        module._finqlora_nf4_recompute = recompute_weights
        module.__class__ = _traced_class(type(module))
        switched += 1
    return switched


# ---------------------------------------------------------------------------------------------
# Compiling the decoder layers


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a transformers model (the checkpointed layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


_COMPILED_LAYER_CLASSES: dict[tuple[type, str, bool], type] = {}


def _compiled_layer_class(cls: type, backend: str, cpp_wrapper: bool) -> type:
    """A subclass of the decoder layer class whose forward is compiled, below the checkpointing.

    Newer transformers checkpoint inside the layer's `forward` (a `forward_with_checkpointing`
    wrapper that subclasses get too); older ones in `__call__`. Either way the compiled function
    is the layer's own forward, so checkpointing (ours, with its host copies and RNG state) and
    module hooks stay eager around it.
    """
    key = (cls, backend, cpp_wrapper)
    if key not in _COMPILED_LAYER_CLASSES:
        forward = cls.forward
        if getattr(getattr(forward, "__code__", None), "co_name", "") == "forward_with_checkpointing":
            forward = forward.__wrapped__
        options = {"cpp_wrapper": True} if cpp_wrapper and backend == "inductor" else None
        _COMPILED_LAYER_CLASSES[key] = type(f"Compiled{cls.__name__}", (cls,), {
            "forward": torch.compile(forward, backend=backend, dynamic=True, options=options), "__module__": __name__})
    return _COMPILED_LAYER_CLASSES[key]


def compile_decoder_layers(model: torch.nn.Module, *, backend: str = "inductor", recompute_weights: bool = True,
                           cpp_wrapper: bool = False) -> int:
    """Route every adapted projection through plain operations, then compile each decoder layer's forward.

    All layers of a class share one compiled function (one graph per grad mode, whatever the
    sequence length); returns how many layers now run it. `recompute_weights`: see
    `install_traced_lora`. `cpp_wrapper`: inductor calls the layer's kernels from generated C++
    instead of Python, less CPU time per launch (it needs the C++ compiler that Triton needs too).
    """
    from finqlora.core.errors import FinqloraError

    layers = decoder_layers(model)
    if not layers:
        raise FinqloraError(
            f"{type(model).__name__} has no transformers decoder layers to compile",
            hint="use --profile fused for this model",
        )
    install_traced_lora(model, recompute_weights=recompute_weights)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    for layer in layers:
        if type(layer) not in _COMPILED_LAYER_CLASSES.values():
            layer.__class__ = _compiled_layer_class(type(layer), backend, cpp_wrapper)
    return len(layers)
