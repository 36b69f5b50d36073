"""Helpers of the training tests (the NF4 speed paths of test_compiled.py and test_speedups.py)."""

from __future__ import annotations


def dense_nf4_reference(model):  # noqa: ANN001, ANN201 - a torch module, changed in place and returned
    """`model` with every bitsandbytes 4-bit layer replaced by a dense Linear of its dequantized weight.

    The exact fp32 reference for our NF4 paths: the same function as peft + bitsandbytes, without
    bitsandbytes' CPU inference kernel, which on CPUs with avx512_bf16 (eval mode, input without grad)
    repacks the weight and multiplies in bf16 precision: ~0.3 % relative error (measured 2026-12-07
    on this AMD EPYC: 3.3e-3 abs on outputs up to 0.70 of one q_proj; ~5e-3 on the tiny model's logits).
    Call it before the model's first eval forward (bitsandbytes repacks the weight there).
    """
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                dense.weight.data = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                if child.bias is not None:
                    dense.bias.data = child.bias.data.clone()
                setattr(parent, name, dense.requires_grad_(False))
    return model
