"""Compiled decoder layers (finqlora.train.compiled) compute what peft + bitsandbytes compute.

On the CPU the layers compile with the `aot_eager` backend: the same graph capture, autograd
derivation and recomputation as the GPU path, without code generation (seconds, not minutes on
two cores). The tests marked cuda run the real inductor/Triton path on a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.train.conftest import dense_nf4_reference
from finqlora.core.errors import FinqloraError
from finqlora.train import compiled, kernels, profiles

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor/Triton path)")


def _tiny_llama(layers=3, dtype=torch.float32, quantize=False, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if quantize:
        _quantize_nf4(model, dtype, device)
    return model


def _quantize_nf4(model, dtype, device):
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                          compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                          device="meta")
                    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4",
                                                 quant_storage=torch.uint8, module=q).to(device)
                    setattr(parent, name, q)


def _lora(model, dropout, checkpointing, compiled_layers=False, offload=True):
    """`checkpointing`: every layer checkpointed, offloaded as the compiled profiles do (`offload`) or
    torch's own (the fast profiles)."""
    from peft import LoraConfig, get_peft_model

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # as training does: every layer's input requires grad
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B: every LoRA gradient is non-zero
            param.data = (torch.randn(param.shape, generator=generator) * 0.05).to(param.device, param.dtype)
    if checkpointing and offload:
        kernels.install_offloaded_checkpointing(model, compiled_layers=compiled_layers)
    return model.train()


def _batch(length, device="cpu"):
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 300, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a padded row
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": ids.masked_fill(mask == 0, -100).to(device)}


@contextlib.contextmanager
def _counting_saved_bytes():
    """Bytes the autograd graph saves outside checkpointed regions (a list of one number)."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


def _loss_and_grads(model, batch, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_nf4_dequantize_is_bit_identical_to_bitsandbytes():
    import bitsandbytes.functional as bnbf

    for shape in [(64, 128), (256, 192), (100, 64)]:  # 100 blocks: fewer than one 256-block of scales
        weight = torch.randn(*shape)
        packed, state = bnbf.quantize_4bit(weight.to(torch.bfloat16), quant_type="nf4", compress_statistics=True,
                                           blocksize=64)
        ours = compiled.nf4_dequantize(packed, state.absmax, state.state2.code, state.state2.absmax, state.offset,
                                       state.code, state.blocksize, state.state2.blocksize, tuple(state.shape),
                                       state.dtype)
        assert torch.equal(ours, bnbf.dequantize_4bit(packed, state)), shape


def test_compiled_layers_match_peft_loss_and_grads():
    """NF4 base, LoRA dropout 0.1, offloaded checkpointing: every lever of the compiled profiles."""
    from torch._dynamo.utils import counters

    reference = _lora(_tiny_llama(quantize=True), 0.1, True)
    candidate = _lora(_tiny_llama(quantize=True), 0.1, True, compiled_layers=True)
    torch._dynamo.reset()
    counters.clear()
    assert compiled.compile_decoder_layers(candidate.get_base_model(), backend="aot_eager") == 3
    for length in (9, 17):  # padded batches of changing length reuse the graph
        loss_ref, grads_ref = _loss_and_grads(reference, _batch(length))
        loss_new, grads_new = _loss_and_grads(candidate, _batch(length))
        assert torch.allclose(loss_ref, loss_new, rtol=1e-6), (length, loss_ref, loss_new)
        assert grads_ref.keys() == grads_new.keys() and len(grads_ref) == 3 * 7 * 2
        for name, grad in grads_ref.items():
            assert grad.abs().sum() > 0, name
            assert torch.allclose(grad, grads_new[name], rtol=1e-4, atol=1e-7), name
    assert not counters["graph_break"], dict(counters["graph_break"])
    # One graph per grad mode for all three layers and every length: no per-layer recompiles.
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_compiled_layers_beside_layers_that_keep_their_activations_compute_the_same():
    """fast-compiled: memory-sized checkpointing leaves the last layers unchecked, the rest checkpointed."""
    from torch._dynamo.utils import counters

    from finqlora.train.recompute import MemorySizedCheckpointing

    reference = _lora(_tiny_llama(quantize=True), 0.1, True, offload=False)
    candidate = _lora(_tiny_llama(quantize=True), 0.1, True, offload=False)
    torch._dynamo.reset()
    counters.clear()
    lm = candidate.get_base_model()
    assert compiled.compile_decoder_layers(lm, backend="aot_eager") == 3
    sizing = MemorySizedCheckpointing(lm, compiled.decoder_layers(lm))
    sizing.remove()  # sizing reads CUDA memory: set the split by hand
    saved = {}
    for keep in (2, 0, 3):
        sizing.keep_activations(keep)
        loss_ref, grads_ref = _loss_and_grads(reference, _batch(9))
        with _counting_saved_bytes() as saved[keep]:
            loss_new, grads_new = _loss_and_grads(candidate, _batch(9))
        assert torch.allclose(loss_ref, loss_new, rtol=1e-6), (keep, loss_ref, loss_new)
        assert grads_ref.keys() == grads_new.keys() and len(grads_ref) == 3 * 7 * 2
        for name, grad in grads_ref.items():
            assert torch.allclose(grad, grads_new[name], rtol=1e-4, atol=1e-7), (keep, name)
    # A kept layer saves its activations for the backward pass; a checkpointed one only its input.
    assert saved[0][0] < saved[2][0] < saved[3][0], saved
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Checkpointed or not, the layers run the same compiled graph (checkpointing stays outside it).
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_layers_keep_the_adapter_files_and_peft_paths(tmp_path):
    plain = _lora(_tiny_llama(quantize=True), 0.0, False).eval()
    exact = dense_nf4_reference(_lora(_tiny_llama(quantize=True), 0.0, False)).eval()
    traced = _lora(_tiny_llama(quantize=True), 0.0, False).eval()
    assert compiled.install_traced_lora(traced) == 3 * 7  # the projections as the compiled layers run them
    batch = _batch(11)
    with torch.no_grad():
        want = exact(**batch).logits
        assert torch.allclose(want, traced(**batch).logits, atol=1e-6)
        # peft + bitsandbytes compute the same function, in bf16 precision on avx512_bf16 CPUs (conftest).
        assert torch.allclose(want, plain(**batch).logits, rtol=1e-2, atol=1e-2)
        with traced.disable_adapter(), plain.disable_adapter():  # peft's own forward takes over
            assert torch.allclose(plain(**batch).logits, traced(**batch).logits, atol=1e-6)
    # The quantization buffers are views of the frozen weight, not new state to save.
    assert traced.state_dict().keys() == plain.state_dict().keys()
    traced.save_pretrained(tmp_path / "traced"), plain.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "traced" / "adapter_model.safetensors").stat().st_size == \
        (tmp_path / "plain" / "adapter_model.safetensors").stat().st_size


def test_compiled_layers_refuse_other_4bit_layouts_and_models_without_layers():
    import bitsandbytes as bnb

    model = _tiny_llama(layers=1)
    child = model.model.layers[0].mlp.down_proj
    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compress_statistics=False,
                          quant_type="fp4", device="meta")
    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, compress_statistics=False,
                                 quant_type="fp4", module=q).to("cpu")
    model.model.layers[0].mlp.down_proj = q
    with pytest.raises(FinqloraError, match="NF4 weights with double quantization") as err:
        compiled.compile_decoder_layers(_lora(model, 0.0, False).get_base_model(), backend="aot_eager")
    assert "--profile fused" in err.value.hint
    with pytest.raises(FinqloraError, match="no transformers decoder layers"):
        compiled.compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)), backend="aot_eager")


def test_compiled_profiles_keep_the_run_configs_batches_and_t4_kernels():
    for name in ("compiled", "t4-compiled"):
        profile = profiles.get_profile(name)
        assert not profile.packing and profile.budget_scale == 1, "same samples per optimizer step as the recipe"
        assert profile.compiled_layers and profile.offload_activations and not profile.varlen_attention
    t4 = profiles.get_profile("t4-compiled")
    assert t4.compute_dtype == "fp16" and t4.avoid_flash_attention and t4.avoid_cudnn_attention


@cuda
def test_inductor_dropout_masks_repeat_in_the_offloaded_recomputation():
    """With checkpointing the layer runs twice; the backward must see the forward pass's masks.

    (Inductor's graph without grad mode draws other numbers than the grad-mode graph for the
    same generator state, which is why the compiled profiles' first pass runs in grad mode.)
    """
    plain = _lora(_tiny_llama(dtype=torch.bfloat16, quantize=True, device="cuda"), 0.1, False)
    offloaded = _lora(_tiny_llama(dtype=torch.bfloat16, quantize=True, device="cuda"), 0.1, True, compiled_layers=True)
    profile = profiles.get_profile("compiled")  # what the profile compiles: C++ launcher, dense weights kept
    for model in (plain, offloaded):
        compiled.compile_decoder_layers(model.get_base_model(), cpp_wrapper=profile.compile_cpp_wrapper,
                                        recompute_weights=profile.recompute_dequantized_weights)
    batch = _batch(33, "cuda")
    loss_plain, grads_plain = _loss_and_grads(plain, batch, seed=7)
    loss_offloaded, grads_offloaded = _loss_and_grads(offloaded, batch, seed=7)
    assert torch.equal(loss_plain, loss_offloaded)
    for name, grad in grads_plain.items():
        assert torch.allclose(grad, grads_offloaded[name], rtol=1e-2, atol=1e-5), name
    loss_other_seed, _ = _loss_and_grads(offloaded, batch, seed=8)
    assert not torch.equal(loss_plain, loss_other_seed), "dropout is on"


@cuda
def test_inductor_compiled_layers_match_the_fused_path_on_cuda():
    reference = _lora(_tiny_llama(dtype=torch.bfloat16, quantize=True, device="cuda"), 0.0, True)
    kernels.install_fused_lora(reference)
    candidate = _lora(_tiny_llama(dtype=torch.bfloat16, quantize=True, device="cuda"), 0.0, True, compiled_layers=True)
    profile = profiles.get_profile("compiled")
    compiled.compile_decoder_layers(candidate.get_base_model(), cpp_wrapper=profile.compile_cpp_wrapper,
                                    recompute_weights=profile.recompute_dequantized_weights)
    for length in (40, 57):
        loss_ref, grads_ref = _loss_and_grads(reference, _batch(length, "cuda"))
        loss_new, grads_new = _loss_and_grads(candidate, _batch(length, "cuda"))
        assert torch.allclose(loss_ref.float(), loss_new.float(), rtol=2e-3), (loss_ref, loss_new)
        for name, grad in grads_ref.items():
            cosine = torch.nn.functional.cosine_similarity(grad.float().flatten(), grads_new[name].float().flatten(), 0)
            assert cosine > 0.99, (name, cosine)


def test_compiled_layers_keeping_the_dense_weights_compute_the_same():
    reference = _lora(_tiny_llama(quantize=True), 0.1, True)
    candidate = _lora(_tiny_llama(quantize=True), 0.1, True, compiled_layers=True)
    torch._dynamo.reset()
    compiled.compile_decoder_layers(candidate.get_base_model(), backend="aot_eager", recompute_weights=False)
    loss_ref, grads_ref = _loss_and_grads(reference, _batch(13))
    loss_new, grads_new = _loss_and_grads(candidate, _batch(13))
    assert torch.allclose(loss_ref, loss_new, rtol=1e-6), (loss_ref, loss_new)
    for name, grad in grads_ref.items():
        assert torch.allclose(grad, grads_new[name], rtol=1e-4, atol=1e-7), name
