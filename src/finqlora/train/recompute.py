"""Gradient checkpointing on only as many decoder layers as GPU memory requires.

Checkpointing keeps each decoder layer's input and runs the layer forward again in the backward
pass. For LoRA over a frozen base that is half as much matrix work again: per weight and token
the forward pass costs 2 products, the input-gradient backward 2 (frozen weights get no weight
gradient), and the recomputation 2 more. On a GPU with memory to spare the layers that fit keep
their activations and skip the recomputation.

How many fit is decided again for every training micro-batch, from its token count:

- the first training micro-batch runs with every layer checkpointed but the last, and measures
  what that layer's forward pass keeps per token, and what the step takes beyond that, per token,
  over what was allocated before it (checkpointed inputs, logits, the backward's temporaries);
- a later micro-batch of T tokens keeps the activations of the largest k layers with
  allocated + T x (rest + k x per layer) within the limit: the memory this process may use (free
  on the device plus what it holds, under its per-process fraction) less a reserve.

The kept layers are the last k: their backward pass runs first and frees their memory before
the checkpointed layers recompute theirs. Dropout draws the same masks either way (checkpointing
replays the RNG state), so the choice changes speed and memory, not the training.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

# Kept free under the limit (a share of what the process may use): allocator rounding, cuBLAS
# workspaces, a longer micro-batch's temporaries.
RESERVE_FRACTION = 0.1
MIN_RESERVE_BYTES = 2**30


def layers_to_keep(*, tokens: int, available_bytes: float, bytes_per_token_layer: float, rest_per_token: float,
                   layers: int) -> int:
    """How many of `layers` decoder layers keep their activations for a micro-batch of `tokens`.

    `available_bytes`: the limit less what is allocated before the micro-batch;
    `bytes_per_token_layer`: what one layer keeps per token; `rest_per_token`: what the step
    needs per token beyond the kept layers.
    """
    if tokens <= 0 or bytes_per_token_layer <= 0:
        return 0
    spare = available_bytes / tokens - rest_per_token
    return max(0, min(layers, int(spare // bytes_per_token_layer)))


def usable_memory_limit(device: torch.device) -> float:
    """Bytes this process may hold on `device`, less the reserve.

    Free device memory plus what this process's allocator already holds (other processes keep
    theirs), capped by `torch.cuda.set_per_process_memory_fraction` when one is set.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allowed = total * torch.cuda.get_per_process_memory_fraction(index)
    usable = min(free + torch.cuda.memory_reserved(index), allowed)
    return usable - max(MIN_RESERVE_BYTES, RESERVE_FRACTION * allowed)


class MemorySizedCheckpointing:
    """Sets each decoder layer's `gradient_checkpointing` flag before every training forward pass.

    Installed as a forward pre-hook on the causal LM; `kept` counts the micro-batches by how
    many layers kept their activations. Whatever turns checkpointing on or off (the Trainer
    enables it when training starts) is followed: with it off, no flag is touched.
    """

    def __init__(self, lm: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
        self.layers = layers
        self.device = next(lm.parameters()).device
        self.bytes_per_token_layer: float | None = None
        self.rest_per_token: float | None = None
        self.kept: Counter[int] = Counter()
        self._applied: list[bool] | None = None
        self._checkpointing = False
        self._probe: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._hook = lm.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def remove(self) -> None:
        """Stop sizing; the flags stay as last set."""
        self._hook.remove()
        self._remove_probe_hooks()

    def summary(self) -> dict[str, Any]:
        """For training_info.json: how many layers kept their activations, in how many micro-batches."""
        return {
            "decoder_layers": len(self.layers),
            "micro_batches_by_layers_kept": {str(k): n for k, n in sorted(self.kept.items())},
            "kib_per_token_per_kept_layer": round((self.bytes_per_token_layer or 0) / 2**10, 1),
        }

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        flags = [bool(layer.gradient_checkpointing) for layer in self.layers]
        if flags != self._applied:  # changed by someone else: follow their choice
            self._checkpointing = any(flags)
        if not self._checkpointing:
            return
        tokens = _token_count(args, kwargs)
        if self._probe is not None:
            self._calibrate()
        if self.bytes_per_token_layer is None:
            self._start_probe(tokens)
            return
        available = usable_memory_limit(self.device) - torch.cuda.memory_allocated(self.device)
        keep = layers_to_keep(tokens=tokens, available_bytes=available, bytes_per_token_layer=self.bytes_per_token_layer,
                              rest_per_token=self.rest_per_token or 0.0, layers=len(self.layers))
        self.kept[keep] += 1
        self.keep_activations(keep)

    def keep_activations(self, keep: int) -> None:
        """Checkpoint all decoder layers but the last `keep` (until the next training forward pass resizes)."""
        checkpointed = len(self.layers) - keep
        self._applied = [index < checkpointed for index in range(len(self.layers))]
        for layer, flag in zip(self.layers, self._applied):
            layer.gradient_checkpointing = flag

    def _start_probe(self, tokens: int) -> None:
        """Keep the last layer's activations in this micro-batch and measure them."""
        probe: dict[str, Any] = {"tokens": tokens, "start": torch.cuda.memory_allocated(self.device)}
        last = self.layers[-1]

        def before(module: Any, inputs: Any) -> None:
            probe["before"] = torch.cuda.memory_allocated(self.device)

        def after(module: Any, inputs: Any, output: Any) -> None:
            probe.setdefault("kept", torch.cuda.memory_allocated(self.device) - probe["before"])

        self._handles = [last.register_forward_pre_hook(before), last.register_forward_hook(after)]
        self._probe = probe
        self.keep_activations(1)

    def _calibrate(self) -> None:
        """After the probed micro-batch's forward and backward: per-token costs from its measurements."""
        probe, self._probe = self._probe, None
        self._remove_probe_hooks()
        if "kept" not in probe or probe["tokens"] <= 0:
            return  # the probed pass never reached the last layer: probe again
        tokens = probe["tokens"]
        # The peak so far also covers any earlier peak (loading): an overestimate keeps fewer layers.
        rest = torch.cuda.max_memory_allocated(self.device) - probe["start"] - probe["kept"]
        self.bytes_per_token_layer = max(probe["kept"], 1) / tokens
        self.rest_per_token = max(rest, 0) / tokens

    def _remove_probe_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _token_count(args: tuple, kwargs: dict) -> int:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if value is not None:
            return int(value.shape[0] * value.shape[1])
    first = args[0] if args else None
    return int(first.shape[0] * first.shape[1]) if isinstance(first, torch.Tensor) and first.dim() >= 2 else 0


def memory_sizing_of(model: torch.nn.Module) -> MemorySizedCheckpointing | None:
    """The sizing installed on `model` or on a module inside it (peft and Trainer wrappers), if any."""
    return next((m._finqlora_memory_sizing for m in model.modules() if hasattr(m, "_finqlora_memory_sizing")), None)


def install_memory_sized_checkpointing(lm: torch.nn.Module) -> MemorySizedCheckpointing | None:
    """Size checkpointing from free memory on `lm`'s CUDA device (None elsewhere, or without decoder layers)."""
    from finqlora.train.compiled import decoder_layers

    layers = decoder_layers(lm)
    if not layers or next(lm.parameters()).device.type != "cuda":
        return None
    sizing = MemorySizedCheckpointing(lm, layers)
    lm._finqlora_memory_sizing = sizing
    return sizing
