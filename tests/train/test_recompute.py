"""Memory-sized checkpointing: layers that keep their activations train exactly as checkpointed ones."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from finqlora.train import profiles
from finqlora.train.compiled import decoder_layers
from finqlora.train.recompute import (MemorySizedCheckpointing, install_memory_sized_checkpointing, layers_to_keep,
                                     memory_sizing_of, usable_memory_limit)

GIB = 2**30


def test_layers_to_keep_fills_what_is_available_and_no_more():
    # 16,384 tokens, 140 KiB per token and layer (2.19 GiB a layer), 40 KiB per token for the rest.
    per_layer, rest, tokens = 140 * 1024, 40 * 1024, 16_384
    need = tokens * (rest + 10 * per_layer)
    assert layers_to_keep(tokens=tokens, available_bytes=need, bytes_per_token_layer=per_layer,
                          rest_per_token=rest, layers=30) == 10
    assert layers_to_keep(tokens=tokens, available_bytes=need - 1, bytes_per_token_layer=per_layer,
                          rest_per_token=rest, layers=30) == 9
    assert layers_to_keep(tokens=tokens, available_bytes=200 * GIB, bytes_per_token_layer=per_layer,
                          rest_per_token=rest, layers=30) == 30, "never more than the model has"
    assert layers_to_keep(tokens=tokens, available_bytes=-GIB, bytes_per_token_layer=per_layer,
                          rest_per_token=rest, layers=30) == 0, "over the limit already: checkpoint everything"
    # Twice the tokens, the same memory: fewer layers fit.
    assert layers_to_keep(tokens=2 * tokens, available_bytes=need, bytes_per_token_layer=per_layer,
                          rest_per_token=rest, layers=30) == 4  # (rest + 10 x layer) / 2 - rest = 4.86 layers
    assert layers_to_keep(tokens=0, available_bytes=need, bytes_per_token_layer=per_layer,
                          rest_per_token=rest, layers=30) == 0


def _tiny_lora_llama(device, *, seed=0, layers=4, dropout=0.1):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).to(device)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = (torch.randn(param.shape, generator=generator) * 0.05).to(device)
    model.train()
    return model


def _loss_and_grads(model, batch, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in every model compared
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _batch(device, rows=2, length=24):
    ids = torch.randint(3, 300, (rows, length), generator=torch.Generator().manual_seed(7)).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def test_kept_layers_train_like_checkpointed_ones_with_dropout():
    batch = _batch("cpu")
    checkpointed = _tiny_lora_llama("cpu")
    mixed = _tiny_lora_llama("cpu")
    layers = decoder_layers(mixed)
    sizing = MemorySizedCheckpointing(mixed.get_base_model(), layers)
    sizing.remove()  # no sizing on the CPU: set the split by hand
    sizing.keep_activations(3)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, False, False]
    loss_ref, grads_ref = _loss_and_grads(checkpointed, batch, seed=3)
    loss, grads = _loss_and_grads(mixed, batch, seed=3)
    assert torch.allclose(loss, loss_ref, rtol=1e-6)
    for name, grad in grads_ref.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7), name


def test_sizing_is_found_through_wrappers_and_summarized_for_training_info():
    model = _tiny_lora_llama("cpu")
    lm = model.get_base_model()
    assert memory_sizing_of(model) is None
    sizing = MemorySizedCheckpointing(lm, decoder_layers(lm))
    sizing.remove()
    lm._finqlora_memory_sizing = sizing  # as install_memory_sized_checkpointing leaves it on CUDA
    assert memory_sizing_of(model) is sizing, "found from the peft wrapper"
    sizing.kept.update({2: 3, 4: 1})
    sizing.bytes_per_token_layer = 1536.0
    assert sizing.summary() == {"decoder_layers": 4, "micro_batches_by_layers_kept": {"2": 3, "4": 1},
                                "kib_per_token_per_kept_layer": 1.5}


def test_memory_sizing_is_cuda_only_and_profiles_name_it():
    assert install_memory_sized_checkpointing(_tiny_lora_llama("cpu").get_base_model()) is None
    for name in ("fast", "fast-compiled", "fast-bf16"):
        assert profiles.get_profile(name).memory_sized_checkpointing
    for name in ("t4", "compiled", "t4-compiled", "fused", "default"):
        assert not profiles.get_profile(name).memory_sized_checkpointing, "16 GB GPUs keep every layer checkpointed"
    compiled = profiles.get_profile("fast-compiled")
    assert compiled.compiled_layers and compiled.packing and compiled.varlen_attention


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sizing reads the CUDA allocator)")
def test_memory_sized_checkpointing_on_cuda():
    batch = _batch("cuda", rows=4, length=256)
    model = _tiny_lora_llama("cuda")
    reference = _tiny_lora_llama("cuda")
    sizing = install_memory_sized_checkpointing(model.get_base_model())
    layers = sizing.layers
    for step in range(3):
        loss, grads = _loss_and_grads(model, batch, seed=step)
        loss_ref, grads_ref = _loss_and_grads(reference, batch, seed=step)
        assert torch.allclose(loss, loss_ref, rtol=1e-5), step
        for name, grad in grads_ref.items():
            assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), (step, name)
        if step == 0:  # the probe: the last layer keeps its activations and is measured
            assert [layer.gradient_checkpointing for layer in layers] == [True, True, True, False]
    assert sizing.bytes_per_token_layer > 64 * 2  # more than the layer's input, which checkpointing keeps
    assert sizing.kept == Counter({4: 2}), "a tiny model on a large GPU keeps every layer"
    with torch.no_grad():  # evaluation passes are not sized
        model.eval()
        model(**batch)
        model.train()
    assert sum(sizing.kept.values()) == 2
    # The Trainer enables checkpointing again at the start of training: sizing follows.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # This process already holds all but 4 GiB of the GPU, under the reserve: nothing fits.
    free, total = torch.cuda.mem_get_info()
    filler = torch.empty(int(free - 4 * GIB), dtype=torch.uint8, device="cuda")
    _loss_and_grads(model, batch, seed=5)
    del filler
    assert sizing.kept[0] == 1 and all(layer.gradient_checkpointing for layer in layers)
    fraction = torch.cuda.get_per_process_memory_fraction(0)
    try:  # a per-process cap is a limit too
        torch.cuda.set_per_process_memory_fraction(0.25, 0)
        assert usable_memory_limit(torch.device("cuda")) <= 0.25 * 0.9 * total
    finally:
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
    # Checkpointing turned off is left off.
    model.gradient_checkpointing_disable()
    _loss_and_grads(model, batch, seed=6)
    assert not any(layer.gradient_checkpointing for layer in layers) and sum(sizing.kept.values()) == 3
    assert sizing.summary()["micro_batches_by_layers_kept"] == {"0": 1, "4": 2}


def test_train_summary_names_the_layers_not_recomputed():
    from types import SimpleNamespace

    from rich.console import Console

    from finqlora.cli.train import _summary

    info = {"name": "r", "train_losses": [], "val_losses": [], "max_steps": 10, "epochs_completed": 1.0,
            "timing": {"train_seconds": 5.0, "load_and_tokenize_seconds": 1.0}, "throughput": {"tokens_per_second": None},
            "memory": {"cuda_allocated_gib": 20.0}, "device": "cuda", "adapter_is": "last step",
            "memory_sized_checkpointing": {"decoder_layers": 30, "micro_batches_by_layers_kept": {"6": 13},
                                           "kib_per_token_per_kept_layer": 199.2}}
    result = SimpleNamespace(info=info, status="completed", global_step=10, best_step=None, output_dir="runs/r")
    console = Console(record=True, width=200)
    _summary(result, console)
    text = console.export_text()
    assert "layers not recomputed" in text and "6 in 13 micro-batches (of 30 layers)" in text
    info["memory_sized_checkpointing"] = None  # CPU runs and other profiles: no row
    console = Console(record=True, width=200)
    _summary(result, console)
    assert "not recomputed" not in console.export_text()


def test_out_of_memory_advice_names_the_memory_sized_profile():
    from finqlora.core.config import TrainConfig
    from finqlora.train.outcome import oom_error
    from finqlora.train.setup import resolve_plan

    cfg = TrainConfig(profile="fast", load_in_4bit=False)  # a plan this CPU can make
    plan = resolve_plan(cfg, profiles.get_profile("fast"))
    assert "profile fast fills the GPU memory it finds free" in oom_error(cfg, plan, profiles.get_profile("fast")).hint
    assert "fills the GPU memory" not in oom_error(cfg, plan, profiles.get_profile("t4")).hint
    assert "fills the GPU memory" not in oom_error(cfg, plan).hint
