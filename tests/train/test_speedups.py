"""Speed levers keep the training loss exactly what the plain path computes (CPU, tiny model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.train.conftest import dense_nf4_reference
from finqlora.core import hardware
from finqlora.core import profiles as core_profiles
from finqlora.core.chat_format import encode_for_training
from finqlora.core.errors import FinqloraError
from finqlora.train import collate, patches, profiles

RECORDS = [
    {"instruction": "判断这条新闻对黄金的影响", "input": "美联储宣布降息25个基点。", "output": "利好。降息压低实际利率。"},
    {"instruction": "What is 2+2?", "input": "", "output": "4"},
    {"instruction": "Summarize", "input": "Gold rose 1% as the dollar fell on weak payrolls data.", "output": "Gold up, dollar down."},
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model, tokenizer


@pytest.fixture(scope="module")
def samples(tiny):
    _, tokenizer = tiny
    out = []
    for record in RECORDS:
        encoded = encode_for_training(tokenizer, record, max_length=128)
        out.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    return out


def _per_sample_reference(model, samples):
    """Sum of token losses and token count, each sample run alone without padding."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample["input_ids"]])
            labels = torch.tensor([sample["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            target = labels[0, 1:]
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total, count


def test_profile_lookup_and_errors():
    assert profiles.get_profile("default") is core_profiles.PROFILES["default"]
    assert profiles.get_profile(" T4 ").name == "t4"
    for name in ("default", "t4", "fast", "cpu"):
        assert name in core_profiles.PROFILES
    t4 = profiles.get_profile("t4")
    assert t4.load_in_4bit and t4.gradient_checkpointing and t4.compute_dtype == "fp16"
    assert not profiles.get_profile("cpu").liger, "the CPU profile must never use Triton kernels"
    with pytest.raises(FinqloraError) as err:
        profiles.get_profile("turbo")
    assert "turbo" in str(err.value) and "fast" in str(err.value) and "t4" in str(err.value)
    assert profiles.profile_as_dict(t4)["name"] == "t4"
    # t4: 4 rows of batch_size x max_length tokens (measured <= the baseline's peak memory).
    assert collate.tokens_per_micro_batch(t4, 4, 512) == 4 * 2048 and t4.pack_rows == 4


def test_pack_by_token_budget_is_a_partition_within_budget():
    lengths = [int(x) for x in torch.randint(5, 300, (500,), generator=torch.Generator().manual_seed(1))]
    bins = collate.pack_by_token_budget(lengths, 1024, seed=3)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    fill = sum(lengths) / (len(bins) * 1024)
    assert fill > 0.9, f"first-fit packing left too much room: {fill:.2%}"
    assert bins == collate.pack_by_token_budget(lengths, 1024, seed=3)
    assert bins != collate.pack_by_token_budget(lengths, 1024, seed=4)
    with pytest.raises(FinqloraError, match="sample 1 has 2000 tokens"):
        collate.pack_by_token_budget([10, 2000], 1024)


def test_packed_collator_restarts_positions_and_masks_boundaries(samples):
    collator = collate.make_data_collator(None, profiles.get_profile("cpu"))
    batch = collator([samples[0], {"pack": [samples[1], samples[2]]}])
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in batch, "a padding-free batch must not carry a 2D mask (it would hide the packing)"
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    for start, length in zip(starts, lengths):
        assert batch["position_ids"][0, start : start + length].tolist() == list(range(length))
        assert batch["labels"][0, start].item() == -100


def test_packed_loss_equals_unpadded_per_sample_loss(tiny, samples):
    model, _ = tiny
    ref_sum, ref_count = _per_sample_reference(model, samples)
    reference = ref_sum / ref_count

    packed = collate.make_data_collator(None, profiles.get_profile("cpu"))(samples)
    with torch.no_grad():
        plain_packed = model(**packed).loss.item()  # transformers' own loss on the packed row
    assert plain_packed == pytest.approx(reference, rel=1e-5)

    model_copy = type(model)(model.config)
    model_copy.load_state_dict(model.state_dict())
    patches.apply_model_speedups(model_copy, profiles.get_profile("cpu"))
    model_copy.train()
    fast = model_copy(**packed)
    assert fast.logits is None, "the answer-only path must not build full logits"
    assert fast.loss.item() == pytest.approx(reference, rel=1e-5)
    fast.loss.backward()
    assert model_copy.lm_head.weight.grad is not None and torch.isfinite(model_copy.lm_head.weight.grad).all()

    # Gradient accumulation: Trainer passes the token count of the whole accumulated batch.
    scaled = model_copy(**packed, num_items_in_batch=torch.tensor(ref_count * 2)).loss.item()
    assert scaled == pytest.approx(reference / 2, rel=1e-5)

    # The padded default path gives the same mean loss.
    _, tokenizer = tiny
    padded = collate.make_data_collator(tokenizer, profiles.get_profile("default"))(
        [dict(s) for s in samples]
    )
    assert "attention_mask" in padded and padded["input_ids"].shape[0] == len(samples)
    with torch.no_grad():
        assert model(**padded).loss.item() == pytest.approx(reference, rel=1e-4)

    # In eval mode the patched model gives full logits again (generation, evaluation).
    model_copy.eval()
    with torch.no_grad():
        out = model_copy(**packed)
    assert out.logits is not None and out.loss.item() == pytest.approx(reference, rel=1e-5)


def test_multi_row_packing_keeps_the_loss_and_balances_rows(tiny, samples):
    model, _ = tiny
    ref_sum, ref_count = _per_sample_reference(model, samples)
    profile = dataclasses.replace(profiles.get_profile("cpu"), pack_rows=2)
    batch = collate.make_data_collator(None, profile)([{"pack": samples}])
    assert batch["input_ids"].shape[0] == 2
    lengths = sorted(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape[1] == max(lengths[-1], lengths[0] + lengths[1])
    assert int((batch["labels"] != -100).sum()) == ref_count
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(ref_sum / ref_count, rel=1e-5)
        logits = model(**batch).logits
    # The longest sample sits alone in its row; its logits match a solo run.
    longest = max(samples, key=lambda s: len(s["input_ids"]))
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([longest["input_ids"]])).logits[0]
    row = 0 if batch["input_ids"][0, : len(longest["input_ids"])].tolist() == longest["input_ids"] else 1
    torch.testing.assert_close(logits[row, : len(longest["input_ids"])], alone, rtol=1e-4, atol=1e-4)


def test_no_attention_across_packed_samples(tiny, samples):
    model, _ = tiny
    collator = collate.make_data_collator(None, profiles.get_profile("cpu"))
    first, second = samples[0], samples[2]
    changed = dict(first, input_ids=[(t * 7 + 13) % 1000 + 5 for t in first["input_ids"]])
    with torch.no_grad():
        logits_a = model(**collator([first, second])).logits[0]
        logits_b = model(**collator([changed, second])).logits[0]
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
    n = len(first["input_ids"])
    assert not torch.allclose(logits_a[:n], logits_b[:n]), "the change to sample A must be visible in A"
    torch.testing.assert_close(logits_a[n:], logits_b[n:], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits_a[n:], alone, rtol=1e-4, atol=1e-4)


def test_answer_only_loss_matches_full_logits_with_peft(tiny, samples):
    """The lever also works under a peft wrapper and gives the same LoRA gradients."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    packed = collate.make_data_collator(None, profiles.get_profile("cpu"))(samples)
    grads = []
    for use_lever in (False, True):
        base = type(model)(model.config)
        base.load_state_dict(model.state_dict())
        torch.manual_seed(0)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        # LoRA B starts at zero; give it values so A's gradient is non-zero too.
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
        if use_lever:
            patches.apply_model_speedups(peft_model, profiles.get_profile("cpu"))
        peft_model.train()
        peft_model(**packed).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_lora_update_in_fp32_keeps_small_updates_over_a_bf16_base(tiny, samples):
    """Over a bf16 base, an adapted layer's LoRA update is added in fp32: an update far below bf16's
    resolution of the layer output still changes it (without the lever it is rounded away), and
    the model also runs outside autocast (evaluation, generation)."""

    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    profile = dataclasses.replace(profiles.get_profile("cpu"), compute_dtype="bf16", lora_update_in_fp32=True)
    x = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for lever in (False, True):
        base = type(model)(model.config)
        base.load_state_dict(model.state_dict())
        peft_model = get_peft_model(base.to(torch.bfloat16),
                                    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.fill_(1e-8)
        patches.apply_model_speedups(peft_model, profile if lever else dataclasses.replace(profile, lora_update_in_fp32=False))
        layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
        with torch.autocast("cpu", dtype=torch.bfloat16):
            adapted = layer(x)
            with peft_model.disable_adapter():
                plain = layer(x)
        outputs[lever] = (adapted, plain)
    assert outputs[False][0].dtype == torch.bfloat16 and torch.equal(*outputs[False]), "bf16 add rounds it away"
    adapted, plain = outputs[True]
    assert adapted.dtype == torch.float32 and not torch.equal(adapted, plain)
    assert (adapted - plain).abs().max() < 1e-3, "only the tiny LoRA update differs"
    # Outside autocast: bf16 layers take the fp32 activations of adapted ones without dtype errors.
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor([samples[0]["input_ids"]])).logits
    assert torch.isfinite(logits).all()
    assert peft_model.get_base_model().model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16


def test_varlen_collator_gives_one_row_with_sample_boundaries(samples):
    profile = profiles.get_profile("fast")
    assert profile.varlen_attention and profile.pack_rows > 1
    batch = collate.make_data_collator(None, profile, attn_implementation=patches.VARLEN_ATTENTION)(
        [{"pack": samples}])
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (1, sum(lengths)), "varlen attention needs no rows: one row holds all"
    assert batch["cu_seq_lens_q"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["max_length_q"] == max(lengths) and batch["use_cache"] is False
    # Without varlen attention the profile's rows are kept (masked sdpa, rows of similar length).
    rows = collate.make_data_collator(None, profile, attn_implementation="sdpa")([{"pack": samples}])
    assert rows["input_ids"].shape[0] == len(samples) and "cu_seq_lens_q" not in rows


def test_varlen_attention_needs_cuda_and_falls_back_to_sdpa(tiny, samples):
    """On the CPU the profile keeps sdpa; without boundaries the function is sdpa, and refuses packs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, _ = tiny
    assert not patches.packed_varlen_available("cpu")
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())

    profile = dataclasses.replace(profiles.get_profile("cpu"), varlen_attention=True)
    patches.apply_model_speedups(copy, profile)
    assert patches.attention_implementation(copy) == "sdpa", "no flash kernel on the CPU: masked packing stays"

    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 9, 8, generator=generator) for _ in range(3))
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.35)
    got, weights = patches.varlen_attention_forward(module, query, key, value, None, scaling=0.35,
                                                     position_ids=torch.arange(9).expand(2, 9))
    assert weights is None
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    packed_positions = torch.cat([torch.arange(4), torch.arange(5)]).unsqueeze(0)
    with pytest.raises(FinqloraError, match="without their boundaries"):
        patches.varlen_attention_forward(module, query[:1], key[:1], value[:1], None, position_ids=packed_positions)
    with pytest.raises(FinqloraError, match="one packed row"):
        patches.varlen_attention_forward(module, query, key, value, None, cu_seq_lens_q=torch.tensor([0, 4, 9]),
                                          max_length_q=5)


@pytest.mark.skipif(not patches.packed_varlen_available("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="varlen flash attention needs a CUDA GPU of compute capability 8.0+ (none here)")
def test_varlen_attention_matches_masked_packing_on_cuda():
    """Same loss and LoRA gradients as sdpa with the block-diagonal mask; generation unchanged.

    A random grouped-query Llama (4 query heads, 2 key/value heads) in bf16, five packed samples.
    """

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for length in (37, 64, 5, 120, 18):
        ids = torch.randint(3, 512, (length,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    results = []
    for varlen in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").to("cuda")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
        # Only the attention differs between the two runs: the cpu profile's fp32 LoRA updates (added to
        # it after this test was written) would run the masked path's attention in fp32.
        profile = dataclasses.replace(profiles.get_profile("cpu"), compute_dtype="bf16", varlen_attention=varlen,
                                      lora_update_in_fp32=False)
        patches.apply_model_speedups(model, profile)
        assert (patches.attention_implementation(model) == patches.VARLEN_ATTENTION) is varlen
        collator = collate.make_data_collator(None, profile, attn_implementation=patches.attention_implementation(model))
        batch = {k: v.to("cuda") if hasattr(v, "to") else v for k, v in collator([{"pack": samples}]).items()}
        model.train()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        prompt = torch.tensor([samples[3]["input_ids"][:12]], device="cuda")
        with torch.no_grad():
            generated = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
        results.append((loss.item(), grads, generated.tolist()))
    (masked_loss, masked_grads, masked_gen), (varlen_loss, varlen_grads, varlen_gen) = results
    assert varlen_loss == pytest.approx(masked_loss, rel=1e-2)
    for name in masked_grads:
        torch.testing.assert_close(varlen_grads[name], masked_grads[name], rtol=5e-2, atol=5e-3)
    assert varlen_gen == masked_gen


def test_liger_profiles_refuse_the_cpu(tiny):
    model, _ = tiny
    with pytest.raises(FinqloraError, match="CUDA"):
        patches.apply_model_speedups(model, profiles.get_profile("t4"))


def test_padding_collator_needs_a_pad_token(tiny):
    _, tokenizer = tiny

    class NoPad:
        pad_token_id = None
        name_or_path = "x"

    with pytest.raises(FinqloraError, match="no pad token"):
        collate.make_data_collator(NoPad(), profiles.get_profile("default"))
    assert collate.make_data_collator(tokenizer, profiles.get_profile("default")) is not None


def test_cpu_bf16_detection_reads_cpu_flags():
    assert hardware.cpu_has_fast_bf16("processor : 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    assert hardware.cpu_has_fast_bf16("flags : fpu avx512_bf16\n")
    assert not hardware.cpu_has_fast_bf16("flags : fpu sse2 avx2 avx512f\n")
    assert profiles.get_profile("cpu").compute_dtype == ("bf16" if hardware.cpu_has_fast_bf16() else "fp32")


def test_cpu_profile_precision_is_chosen_when_the_profile_is_asked_for(monkeypatch):
    declared = core_profiles.PROFILES["cpu"]
    assert declared.compute_dtype == core_profiles.BF16_WHERE_NATIVE, "importing probed the hardware"
    for native, dtype in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(profiles, "cpu_has_fast_bf16", lambda native=native: native)
        made = profiles.get_profile("cpu")
        assert made == dataclasses.replace(declared, compute_dtype=dtype)
        assert profiles.profile_as_dict(made)["compute_dtype"] == dtype  # what training_info.json records
    assert core_profiles.PROFILES["cpu"] is declared
    # Every profile the run config accepts comes out with a precision resolve_plan can use.
    for name in core_profiles.PROFILE_NAMES:
        assert profiles.get_profile(name).compute_dtype in (None, "bf16", "fp16", "fp32"), name


def _bench_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_throughput"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _token_file(tmp_path, count=60):
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = rng.integers(12, 60, count)
    ids = rng.integers(3, 500, int(lengths.sum())).astype(np.int32)
    answer = np.zeros(int(lengths.sum()), bool)
    start = 0
    for n in lengths:
        answer[start + int(n * 0.6) : start + int(n)] = True
        start += int(n)
    np.savez(tmp_path / "t.npz", ids=ids, answer=answer, lengths=lengths.astype(np.int32))
    return tmp_path / "t.npz", lengths, answer


TINY_ARCH = dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, bos_token_id=1, eos_token_id=2)


@pytest.mark.slow
def test_gpu_benchmark_logic_on_a_tiny_model(tmp_path):
    """The GPU benchmark's measuring code, run on the CPU: token counts, blocks, the loss check."""
    tt = _bench_module()
    tokens, lengths, answer = _token_file(tmp_path)
    samples = tt.load_samples(tokens)
    assert [len(s["input_ids"]) for s in samples] == lengths.tolist()
    assert sum(x != -100 for s in samples for x in s["labels"]) == int(answer.sum())

    arch = dict(tt.DEEPSEEK_7B, **TINY_ARCH)
    variants = tt.variants()
    cpu = dict(compute_dtype="fp32", liger=False, load_in_4bit=False, avoid_cudnn_attention=False)
    results = []
    for name in ("baseline", "+packing", "repeat-bf16-config"):
        variant = dataclasses.replace(variants[name], profile=dataclasses.replace(variants[name].profile, **cpu))
        results.append(tt.run_variant(variant, samples, arch=arch, device="cpu", warmup=1, steps=3, max_length=64))
    baseline, packed, repeat = results
    assert baseline["steps"] == 3 and baseline["samples_per_step"] == 4.0 and len(baseline["step_times_s"]) == 3
    # Effective tokens are real tokens only: the sum of the timed batches' sample lengths.
    assert 3 * 4 * 12 <= baseline["tokens"] <= 3 * 4 * 60, baseline["tokens"]
    assert packed["samples_per_step"] > 4, "a 4x512 token budget holds many short samples"
    assert repeat["steps"] == 20 and repeat["loss_finite"], repeat
    assert repeat["loss_falls"], (repeat["loss_first5"], repeat["loss_last5"])
    assert repeat["tokens"] == 20 * 4 * 64
    with pytest.raises(ValueError, match="fewer than one"):
        tt.repeated_batch(samples[:2], 64)
    assert not tt.loss_check([3.0, 3.0, 3.0, 3.0, 3.0, float("nan")])["loss_falls"]
    # Blocks: untimed steps are left out, and each block's batches are its own steps' batches.
    marks = [10.0, 11.0, 13.0, 16.0]
    counted = [(100, [50, 50]), (7, [7]), (30, [10, 20]), (40, [40])]
    block = tt.block_result(marks, {"begin": 0, "untimed": 1, "timed": 3, "resumed": 9.0}, counted, arch)
    assert block["tokens"] == 77 and block["seconds"] == 6.0 and block["samples_per_step"] == 4 / 3
    assert block["step_times_s"] == [1.0, 2.0, 3.0]
    # Without an untimed step the block's clock starts when the coordinator resumed it.
    block = tt.block_result(marks, {"begin": 1, "untimed": 0, "timed": 2, "resumed": 10.5}, counted, arch)
    assert block["tokens"] == 37 and block["seconds"] == 2.5


@pytest.mark.slow
def test_gpu_benchmark_alternates_workers_and_reports_medians(tmp_path):
    """`run` on the CPU with a tiny architecture: worker processes, A B / B A rounds, paired ratios, quality table."""
    import json

    tt = _bench_module()
    tokens, _, _ = _token_file(tmp_path, count=80)
    out = tmp_path / "out"
    # 4-bit layers' widths a multiple of bitsandbytes' block (64), as in real models: its CPU eval kernel
    # on avx512_bf16 CPUs repacks the weight per row of blocks and fails on a 32-wide layer.
    arch = dict(TINY_ARCH, hidden_size=64, intermediate_size=128)
    code = tt.main(["run", "--tokens", str(tokens), "--variants", "baseline,+fused-lora", "--arch-json",
                    json.dumps(arch), "--warmup", "1", "--repeats", "2", "--steps", "2", "--val-samples", "8",
                    "--quality", "--baseline", "+fused-lora", "--out", str(out), "--work", str(tmp_path / "work")])
    assert code == 0
    rows = {r["variant"]: r for r in json.loads((out / "train_throughput.json").read_text())["results"]}
    assert set(rows) == {"baseline", "+fused-lora"}
    for row in rows.values():
        assert "error" not in row, row
        assert [b["round"] for b in row["blocks"]] == [0, 1] and all(b["steps"] == 2 for b in row["blocks"])
        assert row["samples_per_step"] == 4.0 and not row["changes_samples_per_step"]
        low, high = row["tokens_per_s_range"]
        assert low <= row["tokens_per_s"] <= high
        assert len(row["losses"]) == 1 + 2 * (1 + 2) and row["val_loss"] > 0
    # --baseline: ratios against the row a lever is added to (here the candidate, for the test).
    assert rows["+fused-lora"]["speedup"] == 1.0 and rows["baseline"]["speedup"] > 0
    # Same batches in the same order: both rows trained the same tokens in every block.
    assert [b["tokens"] for b in rows["baseline"]["blocks"]] == [b["tokens"] for b in rows["+fused-lora"]["blocks"]]
    text = (out / "train_throughput.md").read_text()
    assert "| baseline |" in text and "| +fused-lora |" in text and "vs recipe" in text


def test_benchmark_summary_pairs_rounds_and_flags_batch_changes():
    tt = _bench_module()

    def row(name, speeds, samples=4, packing=False):
        blocks = [{"round": i, "steps": 2, "samples": 2 * samples, "tokens_per_s": v, "flops": 1e12, "seconds": 1.0}
                  for i, v in enumerate(speeds)]
        return {"variant": name, "profile": {"packing": packing}, "blocks": blocks}

    rows = tt.summarize([row("baseline", [100, 50, 100]), row("fast", [300, 150, 330], samples=38, packing=True),
                         row("unsloth-d05", [200, 100, 200]), {"variant": "broken", "what": "", "error": "boom"}],
                        peak_tflops=2.0)
    base, fast, unsloth, broken = rows
    assert base["tokens_per_s"] == 100 and base["tokens_per_s_range"] == [50, 100]
    # Paired per round: fast is 3x, 3x, 3.3x the baseline's block of the same round -> median 3.0.
    assert fast["speedup"] == 3.0 and unsloth["speedup"] == 2.0 and base["vs_unsloth"] == 0.5
    assert fast["changes_samples_per_step"] and not unsloth["changes_samples_per_step"]
    assert fast["unsloth_row"] == "unsloth-packs-varlen-d05" and fast["vs_unsloth"] is None
    assert base["mfu"] == 0.5
    text = tt.table(rows)
    assert "(changes it)" in text and "failed: boom" in text and "| 100 (50-100) |" in text


@pytest.mark.slow
def test_cpu_benchmark_quality_check_on_a_tiny_model(tiny_model_dir, samples):
    """benchmarks/cpu_train_throughput.py's quality check: the same batches for every path, every
    adapter scored on the same fp32 base, differences relative to the plain path."""
    import importlib.util
    import sys
    from pathlib import Path

    _bench_module()  # the CPU benchmark imports the GPU one by name
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_train_throughput.py"
    spec = importlib.util.spec_from_file_location("cpu_train_throughput", path)
    cpu_bench = importlib.util.module_from_spec(spec)
    sys.modules["cpu_train_throughput"] = cpu_bench
    spec.loader.exec_module(cpu_bench)

    train = samples * 3
    results = cpu_bench.quality(str(tiny_model_dir), train, samples, steps=3, seed=0)
    names = [r["path"] for r in results]
    assert names[:2] == ["plain Trainer (fp32, padded)", "--profile cpu, fp32"]
    assert len(names) == (3 if hardware.cpu_has_fast_bf16() else 2)
    plain, exact = results[0], results[1]
    assert plain["relative_difference"] == 0.0
    # Packing and answer-only logits are exact: the fp32 profile trains the same adapter.
    assert exact["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)
    assert exact["val_loss_own_precision"] == exact["val_loss"]
    text = cpu_bench.table([], results, {"quality_model": "tiny", "quality_max_length": 128, "val_samples": 3})
    assert "| --profile cpu, fp32 |" in text


# ---------------------------------------------------------------------------------------------
# Fused LoRA projections and offloaded checkpointing (finqlora.train.kernels)


def _lora_model(model_dir, *, dropout, quantize=False, checkpointing=False, seed=0):
    """A fresh tiny model with all-linear LoRA r=8 and non-zero B (so every LoRA gradient is non-zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if quantize:
        _quantize_linears_nf4(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # peft draws A at random: the same A in every model compared
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return model


def _quantize_linears_nf4(model):
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
                                          quant_storage=torch.uint8, device="meta")
                    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", quant_storage=torch.uint8, module=q).to("cpu")
                    setattr(parent, name, q)


def _loss_and_lora_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return loss.detach(), grads


def _padded_batch(samples):
    """Right-padded batch with an attention mask and -100 labels on the padding."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("quantize", [False, True], ids=["dense-base", "nf4-base"])
def test_fused_lora_matches_peft_loss_and_lora_grads(tiny_model_dir, samples, quantize):
    from finqlora.train import kernels

    batch = _padded_batch(samples)
    plain = _lora_model(tiny_model_dir, dropout=0.0, quantize=quantize)
    fused = _lora_model(tiny_model_dir, dropout=0.0, quantize=quantize)
    plain.train(), fused.train()
    switched = kernels.install_fused_lora(fused)
    assert switched == 2 * 7, "every adapted projection of both blocks takes the fused path"
    loss_plain, grads_plain = _loss_and_lora_grads(plain, batch)
    loss_fused, grads_fused = _loss_and_lora_grads(fused, batch)
    assert torch.allclose(loss_plain, loss_fused, rtol=1e-5, atol=1e-6), (loss_plain, loss_fused)
    assert grads_plain.keys() == grads_fused.keys() and len(grads_plain) == 2 * 7 * 2
    for name, grad in grads_plain.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, grads_fused[name], rtol=1e-4, atol=1e-6), name
    # Outside training (eval, generation) it is still peft's function: exactly that of the dense
    # dequantized weights, and bitsandbytes' CPU kernel's within its bf16 error (conftest says why).
    exact = dense_nf4_reference(_lora_model(tiny_model_dir, dropout=0.0, quantize=quantize)).eval()
    fused.eval(), plain.eval()
    with torch.no_grad():
        want = exact(**batch).logits
        assert torch.allclose(want, fused(**batch).logits, atol=1e-5)
        assert torch.allclose(want, plain(**batch).logits, rtol=1e-2, atol=1e-2)
        with fused.disable_adapter(), plain.disable_adapter():  # peft's own forward takes over
            assert torch.allclose(plain(**batch).logits, fused(**batch).logits, atol=1e-5)


def test_fused_lora_dropout_is_on_the_lora_input_only():
    """Same random keep-mask as the kernel draws; output and every gradient equal plain autograd's."""
    from finqlora.train.kernels import _FusedLoRALinear

    torch.manual_seed(1)
    base = torch.nn.Linear(48, 40, bias=True)
    x = torch.randn(3, 7, 48, requires_grad=True)
    a = (torch.randn(8, 48) * 0.1).requires_grad_()
    b = (torch.randn(40, 8) * 0.1).requires_grad_()
    p, scale = 0.3, 2.0
    torch.manual_seed(5)
    out = _FusedLoRALinear.apply(x, a, b, base, scale, p)
    out.backward(torch.ones_like(out))
    got = (out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    x.grad = a.grad = b.grad = None
    torch.manual_seed(5)
    keep = torch.rand(21, 48) >= p
    assert 0.55 < keep.float().mean() < 0.85
    rows = x.reshape(-1, 48)
    ref = base(rows) + scale * ((rows * keep / (1 - p)) @ a.t()) @ b.t()
    ref.backward(torch.ones_like(ref))
    want = (ref.detach().view(3, 7, 40), x.grad, a.grad, b.grad)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)
    # The frozen path is not dropped: with B = 0 the output is exactly base(x).
    zero = _FusedLoRALinear.apply(x.detach(), a.detach(), torch.zeros_like(b), base, scale, p)
    assert torch.allclose(zero, base(x.detach()), atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["peft-lora", "fused-lora"])
def test_offloaded_checkpointing_repeats_dropout_and_matches_plain_backward(tiny_model_dir, samples, fused):
    from finqlora.train import kernels

    batch = _padded_batch(samples)
    reference = _lora_model(tiny_model_dir, dropout=0.1)
    offloaded = _lora_model(tiny_model_dir, dropout=0.1, checkpointing=True)
    reference.train(), offloaded.train()
    assert kernels.install_offloaded_checkpointing(offloaded) == 2
    # The Trainer enables checkpointing again when it starts; offloading must survive that.
    offloaded.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = offloaded.get_base_model().model.layers
    assert all(layer._gradient_checkpointing_func is kernels.offloaded_checkpoint for layer in layers)
    if fused:  # both levers together, as the fused profiles run them (the same dropout masks in both)
        kernels.install_fused_lora(offloaded), kernels.install_fused_lora(reference)
    torch.manual_seed(11)
    loss_ref, grads_ref = _loss_and_lora_grads(reference, batch)
    torch.manual_seed(11)
    loss_off, grads_off = _loss_and_lora_grads(offloaded, batch)
    assert torch.allclose(loss_ref, loss_off, rtol=1e-5), (loss_ref, loss_off)
    for name, grad in grads_ref.items():
        assert torch.allclose(grad, grads_off[name], rtol=1e-4, atol=1e-6), name


def test_fused_profiles_keep_the_run_configs_batches():
    for name in ("fused", "t4-fused"):
        profile = profiles.get_profile(name)
        assert not profile.packing and profile.budget_scale == 1, "same samples per optimizer step as the recipe"
        assert profile.fused_lora and profile.offload_activations and not profile.varlen_attention
    assert profiles.get_profile("t4-fused").compute_dtype == "fp16"


def test_right_padded_batches_lose_only_a_mask_that_changes_nothing(tiny, samples):
    """Without the mask, labelled positions of a right-padded batch get the same loss (causal)."""
    model, tokenizer = tiny
    profile = core_profiles.SpeedProfile(name="x", description="x", drop_right_padding_mask=True)
    collator = collate.make_data_collator(tokenizer, profile)
    batch = collator([dict(s) for s in samples])
    assert "attention_mask" not in batch and (batch["labels"] == -100).any()  # padded, mask dropped
    masked = collate.make_data_collator(tokenizer, profiles.get_profile("default"))([dict(s) for s in samples])
    assert torch.equal(masked["input_ids"], batch["input_ids"]) and "attention_mask" in masked
    with torch.no_grad():
        loss_without = model(**batch).loss
        loss_with = model(**masked).loss
    assert torch.allclose(loss_without, loss_with, rtol=1e-6), (loss_without, loss_with)
    total, count = _per_sample_reference(model, samples)
    assert loss_without.item() == pytest.approx(total / count, rel=1e-5)


def test_masks_that_matter_are_kept():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert collate.right_padded_without_labels(right, labels)
    assert not collate.right_padded_without_labels(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[-100, 1, 2, 3]]))
    assert not collate.right_padded_without_labels(torch.tensor([[1, 0, 1, 0]]), torch.tensor([[1, -100, 2, -100]]))
    assert not collate.right_padded_without_labels(right, torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]]))  # a labelled pad
    assert not collate.right_padded_without_labels(None, labels)


def test_input_embedding_table_in_host_memory_gives_the_same_model(tiny_model_dir, samples):
    from finqlora.train import kernels

    plain = _lora_model(tiny_model_dir, dropout=0.0, checkpointing=True)
    hosted = _lora_model(tiny_model_dir, dropout=0.0, checkpointing=True)
    for model in (plain, hosted):  # the tiny model ties its head to the embedding; a 7B model does not
        head = model.get_base_model().lm_head
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    lm = hosted.get_base_model()
    table_bytes = lm.get_input_embeddings().weight.nbytes
    before = sum(p.nbytes for p in lm.parameters())
    assert kernels.offload_input_embeddings(lm)
    assert isinstance(lm.get_input_embeddings(), kernels.HostEmbedding)
    assert sum(p.nbytes for p in lm.parameters()) == before - table_bytes  # no longer model state to move
    batch = _padded_batch(samples)
    loss_ref, grads_ref = _loss_and_lora_grads(plain, batch)
    loss_new, grads_new = _loss_and_lora_grads(hosted, batch)
    assert torch.equal(loss_ref, loss_new)
    for name, grad in grads_ref.items():
        assert torch.equal(grad, grads_new[name]), name
    # The hook that makes the embedding output require grad (checkpointing needs it) came along,
    # and handles remove hooks from both alike.
    assert lm.get_input_embeddings()(batch["input_ids"]).requires_grad
    lm.disable_input_require_grads()
    plain.get_base_model().disable_input_require_grads()
    hooks_left = [len(model.get_base_model().get_input_embeddings()._forward_hooks) for model in (plain, hosted)]
    assert hooks_left[0] == hooks_left[1]


def test_tied_or_trainable_embeddings_stay_on_the_device(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finqlora.train import kernels

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not kernels.offload_input_embeddings(model)  # trainable (no peft freezing here)
    model.requires_grad_(False)
    model.get_output_embeddings().weight = model.get_input_embeddings().weight  # tied
    assert not kernels.offload_input_embeddings(model)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned host table, copy to the GPU)")
def test_input_embedding_table_in_host_memory_on_cuda():
    from transformers import LlamaConfig, LlamaForCausalLM

    from finqlora.train import kernels

    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).requires_grad_(False)
    ids = torch.randint(0, 500, (3, 21), device="cuda")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        before = torch.cuda.memory_allocated()
        assert kernels.offload_input_embeddings(model)
        table = model.get_input_embeddings().weight
        assert table.device.type == "cpu" and table.is_pinned()
        assert torch.cuda.memory_allocated() <= before - table.nbytes  # the GPU copy is gone
        assert torch.equal(model(input_ids=ids).logits, expected)
