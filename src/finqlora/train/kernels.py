"""Lean autograd paths for QLoRA training at small batches, where a step is CPU-bound.

At 4 samples per step (~1,700 tokens) the H200 spends most of a QLoRA step waiting for the CPU:
every adapted projection goes through peft's LoRA layer (adapter lookups, a dropout module, dtype
casts, three separate products and an add) and bitsandbytes' `matmul_4bit` (its own autograd
function and checks), twice in the forward pass under gradient checkpointing and once more in
the backward pass. Two levers here cut that work without changing the function computed:

- `fused_lora_forward`: one autograd function per adapted projection computes
  `base(x) + scale * B(A(dropout(x)))` with the frozen weight dequantized (NF4) or used as is,
  the LoRA product accumulated into the base output (`addmm_`), and a hand-written backward that
  dequantizes the frozen weight again instead of keeping it. LoRA dropout is applied to the LoRA
  input only, as peft does, with a boolean keep-mask saved for the backward pass (peft keeps the
  dropped input, twice the bytes). Unsloth's fused path turns itself off when lora_dropout > 0;
  this one does not. Plain torch and bitsandbytes operations: runs on any CUDA GPU (T4 too, in
  fp16) and on the CPU, where the tests compare it with peft.
- `offloaded_checkpoint`: gradient checkpointing that keeps each decoder layer's input in pinned
  CPU memory instead of on the GPU (copied back for the layer's recomputation), with the RNG and
  autocast state of the forward pass restored for the recomputation, so dropout masks repeat.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# ---------------------------------------------------------------------------------------------
# Fused LoRA projection


def dense_weight(base: Any, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight of `base` (nn.Linear or bitsandbytes Linear4bit) as a dense (out, in) tensor."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, quant_state)
    return weight if weight.dtype == dtype else weight.to(dtype)


class _FusedLoRALinear(torch.autograd.Function):
    """y = x W^T + b + scale * (dropout(x) A^T) B^T, with W frozen (dense or 4-bit)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: Any, scale: float,
                dropout: float) -> torch.Tensor:
        dtype = x.dtype
        rows = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        weight = dense_weight(base, dtype)
        bias = base.bias.to(dtype) if base.bias is not None else None
        out = torch.nn.functional.linear(rows, weight, bias)
        keep = None
        if dropout > 0.0:
            keep = torch.rand(rows.shape, device=rows.device, dtype=torch.float32) >= dropout
            dropped = rows * keep * (1.0 / (1.0 - dropout))
        else:
            dropped = rows
        hidden = dropped @ a.t()  # (tokens, r)
        out.addmm_(hidden, b.t(), alpha=scale)
        ctx.save_for_backward(rows, keep, hidden, lora_a, lora_b)
        ctx.base, ctx.scale, ctx.dropout, ctx.shape = base, scale, dropout, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        rows, keep, hidden, lora_a, lora_b = ctx.saved_tensors
        dtype = rows.dtype
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        inverse = 1.0 / (1.0 - ctx.dropout) if ctx.dropout > 0.0 else 1.0
        dropped = rows * keep * inverse if keep is not None else rows
        grad_b = (grad.t() @ hidden).mul_(ctx.scale)  # (out, r)
        grad_hidden = (grad @ b).mul_(ctx.scale)  # (tokens, r)
        grad_a = grad_hidden.t() @ dropped  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dense_weight(ctx.base, dtype)
            if keep is None:
                grad_x.addmm_(grad_hidden, a)
            else:
                grad_x.add_((grad_hidden @ a) * keep, alpha=inverse)
            grad_x = grad_x.view(ctx.shape)
        return grad_x, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None, None, None


def compute_dtype(x: torch.Tensor, base: Any) -> torch.dtype:
    """The dtype the projection multiplies in: autocast's where it is on, else the frozen weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    quant_state = getattr(base.weight, "quant_state", None)
    return quant_state.dtype if quant_state is not None else base.weight.dtype


def fused_lora_forward(layer: Any, original_forward: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """peft LoRA Linear forward through `_FusedLoRALinear`; anything unusual takes peft's own path.

    Unusual = adapters disabled or merged, several active adapters, DoRA, extra arguments
    (mixed-adapter batches), or an adapter that is not a plain (A, B) pair.
    """
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return original_forward(x, *args, **kwargs)
    name = layer.active_adapters[0]
    if name not in layer.lora_A or layer.use_dora.get(name, False):
        return original_forward(x, *args, **kwargs)
    dropout_module = layer.lora_dropout[name]
    dropout = float(getattr(dropout_module, "p", 0.0)) if dropout_module.training else 0.0
    base = layer.get_base_layer()
    dtype = compute_dtype(x, base)
    with torch.autocast(x.device.type, enabled=False):
        return _FusedLoRALinear.apply(x.to(dtype), layer.lora_A[name].weight, layer.lora_B[name].weight, base,
                                      float(layer.scaling[name]), dropout)


def install_fused_lora(model: torch.nn.Module) -> int:
    """Route every peft LoRA Linear of `model` (over nn.Linear or bnb Linear4bit) through the fused path.

    Returns how many layers were switched. Layers of other kinds (embeddings, convolutions) keep
    peft's forward.
    """
    from peft.tuners.lora import LoraLayer

    switched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or getattr(module, "_finqlora_fused", False):
            continue
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        if weight is None or weight.dim() != 2 or not hasattr(base, "in_features"):
            continue
        module.forward = _bound_fused_forward(module, module.forward)
        module._finqlora_fused = True
        switched += 1
    return switched


def _bound_fused_forward(layer: Any, original_forward: Callable) -> Callable:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return fused_lora_forward(layer, original_forward, x, *args, **kwargs)

    return forward


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing with the layer inputs kept in CPU memory


class _OffloadedCheckpoint(torch.autograd.Function):
    """Runs `run(hidden)` without keeping activations; `hidden` waits in pinned host memory."""

    @staticmethod
    def forward(ctx: Any, run: Callable, hidden: torch.Tensor, grad_mode_forward: bool) -> torch.Tensor:
        device = hidden.device
        ctx.run, ctx.device = run, device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        if device.type == "cuda":
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            host.copy_(hidden, non_blocking=True)
            ctx.host = host
        else:
            ctx.host = hidden.detach()
        if grad_mode_forward:
            # The same (compiled) graph as the recomputation, so its random ops draw the same
            # numbers; what it would keep for a backward pass is dropped as soon as it is saved.
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop_saved, _never_unpacked):
                out = run(hidden.detach().requires_grad_(True)).detach()
        else:
            with torch.no_grad():
                out = run(hidden)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        hidden = ctx.host.to(ctx.device, non_blocking=True).detach().requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden)
        torch.autograd.backward(out, grad_out)
        ctx.host = None
        return None, hidden.grad, None


def _drop_saved(tensor: torch.Tensor) -> None:
    return None


def _never_unpacked(packed: None) -> torch.Tensor:
    raise RuntimeError("the offloaded checkpoint's first forward pass has no backward pass")


def offloaded_checkpoint(run: Callable, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """A transformers `_gradient_checkpointing_func`: `run(hidden)` with its input kept on the host.

    Decoder layers pass everything but the hidden states as keyword arguments (bound into
    `run`), so one positional tensor is all there is; anything else takes torch's checkpoint.
    A layer that returns a 1-tuple (some transformers versions) gets a 1-tuple back.
    """
    return _offloaded(run, hidden, args, kwargs, grad_mode_forward=False)


def offloaded_checkpoint_for_compiled(run: Callable, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """`offloaded_checkpoint` whose first forward pass runs in grad mode, for compiled layers.

    A compiled layer has one graph for grad mode and another without; their random ops (LoRA
    dropout) need not draw the same numbers for the same generator state, and the recomputation
    must repeat the forward pass's masks.
    """
    return _offloaded(run, hidden, args, kwargs, grad_mode_forward=True)


def _offloaded(run: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict, *, grad_mode_forward: bool) -> Any:
    if args or kwargs or not isinstance(hidden, torch.Tensor) or not hidden.requires_grad:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(run, hidden, *args, use_reentrant=False, **kwargs)
    shape: dict[str, bool] = {}

    def tensor_out(inner: torch.Tensor) -> torch.Tensor:
        out = run(inner)
        shape["tuple"] = isinstance(out, tuple)
        if shape["tuple"]:
            if len(out) != 1:
                raise TypeError(f"offloaded checkpointing expects a layer with one output, got {len(out)}")
            return out[0]
        return out

    out = _OffloadedCheckpoint.apply(tensor_out, hidden, grad_mode_forward)
    return (out,) if shape["tuple"] else out


def install_offloaded_checkpointing(model: torch.nn.Module, *, compiled_layers: bool = False) -> int:
    """Switch every checkpointed decoder layer of `model` to offloaded checkpointing; returns how many.

    `compiled_layers`: the layers are compiled (see `offloaded_checkpoint_for_compiled`). The
    transformers Trainer enables checkpointing again when training starts, which would put
    torch's checkpoint back; the model's enable methods are wrapped so offloading follows them.
    """
    function = offloaded_checkpoint_for_compiled if compiled_layers else offloaded_checkpoint
    switched = _set_offloaded_checkpointing(model, function)
    for name in ("gradient_checkpointing_enable", "activation_checkpointing_enable"):
        method = getattr(model, name, None)
        if callable(method) and not getattr(method, "_finqlora_offload", False):
            setattr(model, name, _reinstalling(model, method, function))
    return switched


def _set_offloaded_checkpointing(model: torch.nn.Module, function: Callable) -> int:
    from transformers import PreTrainedModel

    switched = 0
    for module in model.modules():
        if isinstance(module, PreTrainedModel):  # the model's own flag, not a checkpointed layer
            continue
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = function
            switched += 1
    return switched


def _reinstalling(model: torch.nn.Module, method: Callable, function: Callable) -> Callable:
    def enable(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        _set_offloaded_checkpointing(model, function)
        return result

    enable._finqlora_offload = True  # type: ignore[attr-defined]
    return enable


# ---------------------------------------------------------------------------------------------
# The frozen input embedding in host memory

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


class HostEmbedding(torch.nn.Module):
    """A frozen input embedding whose table stays in (pinned) host memory.

    A step reads only the rows of its batch's token ids (a few thousand of a vocabulary of
    ~100,000): they are gathered on the host and copied to `device`. The table is neither a
    parameter nor a buffer, so moving the model, DDP and the model's `device` leave it alone;
    training saves only the adapter, never the base weights. `weight` returns it.
    """

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device) -> None:
        super().__init__()
        table = embedding.weight.detach().to("cpu")
        self._table = table.pin_memory() if device.type == "cuda" else table
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = table.shape
        self.output_device = device

    @property
    def weight(self) -> torch.Tensor:
        return self._table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(input_ids.to("cpu"), self._table, self.padding_idx)
        if self.output_device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.output_device, non_blocking=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table on the host, output on {self.output_device}"


def offload_input_embeddings(lm: Any) -> bool:
    """Put `lm`'s frozen input embedding table in host memory (HostEmbedding); returns whether it did.

    Left alone: a trainable embedding, one tied to the output layer (the head needs it on the
    GPU), and embedding subclasses with their own forward (scaled embeddings). Hooks already on
    the embedding (the one that makes its output require grad for checkpointing) carry over,
    and their handles still remove them.
    """
    embedding = lm.get_input_embeddings()
    output = lm.get_output_embeddings()
    if type(embedding) is not torch.nn.Embedding or embedding.weight.requires_grad:
        return False
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        return False
    host = HostEmbedding(embedding, embedding.weight.device)
    for name in _HOOK_DICTS:
        setattr(host, name, getattr(embedding, name))
    lm.set_input_embeddings(host)
    return True
