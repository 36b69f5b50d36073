"""GPU training throughput and memory: the standard QLoRA recipe vs finqlora's speed profiles.

Model: the exact deepseek-llm-7b-chat architecture (Llama, vocab 102,400, hidden 4096,
intermediate 11,008, 30 layers, 32 heads) with random weights, built directly on the GPU and
quantized to NF4 with bitsandbytes (double quantization) exactly as a 4-bit load would do it:
speed and memory do not depend on weight values, and the real weights cannot be fetched there.

Data: token ids of a real instruction dataset, made on a machine that has the data:

    python benchmarks/train_throughput.py prepare --dataset runs/bench/dataset.jsonl \
        --tokenizer builtin:qwen2.5-coder-0.5b-instruct --out .bench/train_tokens.npz

tokenizes every record with `chat_format.encode_for_training` (max length 512, prompt labels
-100) and maps the ids into the 102,400-entry vocabulary (id mod 102,400: the lengths and the
prompt/answer split are what matter for speed). Then, on the GPU machine:

    python benchmarks/train_throughput.py run --tokens .bench/train_tokens.npz --out results/

runs each variant in its own process (clean peak-memory numbers, no kernel patches leaking
between variants) and prints a table: effective tokens/s (tokens that are trained, padding
excluded), peak GPU memory, MFU against a bf16 matmul peak measured in the same run, and the
speed-up over the baseline, which is measured in the same run:

    plain transformers Trainer + peft + bitsandbytes NF4 double quant, batch 4, max length 512,
    dynamic padding, gradient checkpointing, paged 8-bit AdamW, all-linear LoRA r=8.

`--repeat-check` variants train 25 steps on one repeated batch of 4 x 512 tokens and report
whether the loss stays finite and falls (issue 5's check for the T4 and bf16 configs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from finqlora.train.speedups import SpeedProfile, get_profile  # noqa: E402

DEEPSEEK_7B = dict(
    vocab_size=102400,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=30,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=100000,
    eos_token_id=100001,
    tie_word_embeddings=False,
)

# The standard recipe (issue 5 defaults), which a profile's None fields fall back to.
STANDARD = dict(load_in_4bit=True, gradient_checkpointing=True, compute_dtype="bf16", optimizer="paged_adamw_8bit")
BATCH_SIZE = 4
MAX_LENGTH = 512
LORA_R = 8


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    profile: SpeedProfile
    repeat_check: bool = False  # one repeated 4 x 512 batch: does the loss fall?
    batch_size: int = BATCH_SIZE  # samples per padded batch; a packed budget is batch_size x max_length


def resolved(profile: SpeedProfile, **changes: Any) -> SpeedProfile:
    """The profile with None fields set to the standard recipe, plus `changes`."""
    filled = {k: v for k, v in STANDARD.items() if getattr(profile, k) is None}
    return dataclasses.replace(profile, **filled, **changes)


def variants() -> dict[str, Variant]:
    base = resolved(get_profile("default"))
    t4 = resolved(get_profile("t4"))
    fast = resolved(get_profile("fast"))
    rows = [
        Variant("baseline", "plain Trainer + peft + bnb NF4 (the standard recipe)", base),
        Variant("t4", "--profile t4 (fp16, 4-bit, checkpointing, 4 packed rows of 4x512 tokens)", t4),
        Variant("fast", "--profile fast (4-bit, checkpointing, varlen attention, 8x4x512-token micro-batches)", fast),
        Variant("fast-masked", "fast with sdpa and block-diagonal masks in 8 rows instead of varlen attention",
                dataclasses.replace(fast, varlen_attention=False)),
        Variant("fast-bf16", "--profile fast-bf16 (like fast, no quantization)", resolved(get_profile("fast-bf16"))),
        Variant("fast-no-checkpointing", "fast without checkpointing, 2x4x512-token micro-batches (memory for speed)",
                dataclasses.replace(fast, gradient_checkpointing=False, budget_scale=2, pack_rows=2)),
        # Ablation: each lever alone on top of the baseline.
        Variant("+packing", "baseline + padding-free packing (1 row, 4x512 token budget)",
                dataclasses.replace(base, packing=True)),
        Variant("+packing+varlen", "baseline + padding-free packing with varlen attention (1 row, 4x512 tokens)",
                dataclasses.replace(base, packing=True, varlen_attention=True)),
        Variant("+answer-only", "baseline + answer-only logits (torch CE)", dataclasses.replace(base, answer_only_logits=True)),
        Variant("+liger", "baseline + Liger RMSNorm/SwiGLU/RoPE + fused linear-CE",
                dataclasses.replace(base, liger=True, answer_only_logits=True)),
        Variant("+no-upcast", "baseline without fp32 upcast of norms/embeddings/lm_head",
                dataclasses.replace(base, upcast_frozen_to_fp32=False)),
        Variant("+no-cudnn-attention", "baseline with flash/mem-efficient attention instead of cuDNN's",
                dataclasses.replace(base, avoid_cudnn_attention=True)),
        Variant("no-checkpointing", "baseline without gradient checkpointing",
                dataclasses.replace(base, gradient_checkpointing=False)),
        Variant("fp16-standard", "the standard recipe in fp16 (the T4 config's precision)",
                dataclasses.replace(base, compute_dtype="fp16")),
        # Control: more tokens per step without our levers (t4's 8,192-token budget as padded samples).
        Variant("batch16-standard", "the standard recipe with batch 16 (more tokens per step, no other lever)",
                base, batch_size=16),
        # Diagnostics of the T4 profile's cost.
        Variant("t4-bf16", "--profile t4 in bf16 (what fp16 costs)", dataclasses.replace(t4, compute_dtype="bf16")),
        Variant("t4-no-checkpointing", "--profile t4 without checkpointing (what checkpointing costs)",
                dataclasses.replace(t4, gradient_checkpointing=False)),
        # Issue 5: the two GPU configs (and the T4 profile) on one repeated batch.
        Variant("repeat-t4-config", "T4 config (standard recipe, fp16) on a repeated 4x512 batch",
                dataclasses.replace(base, compute_dtype="fp16"), repeat_check=True),
        Variant("repeat-bf16-config", "bf16 config (standard recipe) on a repeated 4x512 batch", base, repeat_check=True),
        Variant("repeat-t4-profile", "--profile t4 on a repeated 4x512 batch", t4, repeat_check=True),
    ]
    return {v.name: v for v in rows}


# What `run` measures by default (the table in docs/benchmarks.md): the profiles, each lever alone
# on top of the baseline, the bigger-batch control, and the baseline again at the end, because
# step times on a shared VM drift; ratios use the faster of the two baseline runs.
MAIN_VARIANTS = ("baseline", "t4", "fast", "fast-masked", "fast-bf16", "+packing", "+packing+varlen", "+answer-only",
                 "+liger", "+no-upcast", "+no-cudnn-attention", "no-checkpointing", "fp16-standard",
                 "batch16-standard", "fast-no-checkpointing", "baseline")


# ---------------------------------------------------------------------------------------------
# Data


def prepare(dataset: Path, tokenizer_spec: str, out: Path, vocab_size: int, max_length: int, limit: int | None) -> dict:
    """Tokenize a JSONL instruction dataset into a small .npz of ids, labels mask and lengths."""
    from rich.progress import track
    from transformers import AutoTokenizer

    from finqlora.core.chat_format import encode_for_training

    if tokenizer_spec.startswith("builtin:") or not Path(tokenizer_spec).exists():
        from finqlora.models.loading import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_spec)
    else:
        path = Path(tokenizer_spec)
        tokenizer = (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if path.suffix == ".gguf"
                     else AutoTokenizer.from_pretrained(path))
    records = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit:
        records = records[:limit]
    ids: list[int] = []
    trained: list[bool] = []
    lengths: list[int] = []
    for record in track(records, description="tokenizing"):
        encoded = encode_for_training(tokenizer, record, max_length)
        ids.extend(t % vocab_size for t in encoded.input_ids)
        trained.extend(label != -100 for label in encoded.labels)
        lengths.append(len(encoded.input_ids))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, ids=np.asarray(ids, dtype=np.int32), answer=np.asarray(trained, dtype=bool),
                        lengths=np.asarray(lengths, dtype=np.int32))
    stats = length_stats(np.asarray(lengths))
    stats.update(dataset=str(dataset), tokenizer=tokenizer_spec, records=len(records),
                 answer_token_share=round(float(np.mean(trained)), 4))
    out.with_suffix(".json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    return stats


def length_stats(lengths: np.ndarray) -> dict:
    return dict(samples=int(lengths.size), mean=round(float(lengths.mean()), 1), median=int(np.median(lengths)),
                p90=int(np.percentile(lengths, 90)), max=int(lengths.max()), tokens=int(lengths.sum()))


def load_samples(tokens: Path) -> list[dict[str, list[int]]]:
    data = np.load(tokens)
    ids, answer, lengths = data["ids"], data["answer"], data["lengths"]
    samples, start = [], 0
    for n in lengths.tolist():
        chunk = ids[start : start + n].tolist()
        labels = [t if a else -100 for t, a in zip(chunk, answer[start : start + n].tolist())]
        samples.append({"input_ids": chunk, "labels": labels})
        start += n
    return samples


def repeated_batch(samples: list[dict[str, list[int]]], length: int = MAX_LENGTH) -> list[dict[str, list[int]]]:
    """Four samples of exactly `length` tokens (real samples concatenated, answer labels kept)."""
    flat_ids: list[int] = []
    flat_labels: list[int] = []
    for s in samples:
        flat_ids += s["input_ids"]
        flat_labels += s["labels"]
        if len(flat_ids) >= BATCH_SIZE * length:
            break
    else:
        raise ValueError(f"the data has {len(flat_ids)} tokens, fewer than one {BATCH_SIZE} x {length} batch")
    return [{"input_ids": flat_ids[i * length : (i + 1) * length], "labels": flat_labels[i * length : (i + 1) * length]}
            for i in range(BATCH_SIZE)]


# ---------------------------------------------------------------------------------------------
# Model


def build_model(arch: dict, profile: SpeedProfile, device: str) -> Any:
    """Random-weight Llama of `arch` on `device`, NF4-quantized when the profile says so."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[profile.compute_dtype]
    config = LlamaConfig(**arch)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if profile.load_in_4bit:
        quantize_nf4(model, dtype)
    model.config.use_cache = False
    return model


def quantize_nf4(model: Any, compute_dtype: Any) -> None:
    """Swap every linear layer of the decoder blocks for a bitsandbytes NF4 (double-quant) layer.

    This is what `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...))`
    does while it loads a checkpoint; lm_head and embeddings stay unquantized, as there.
    """
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      quant_storage=torch.uint8, device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", quant_storage=torch.uint8,
                                             module=q).to(child.weight.device)
                setattr(parent, name, q)
    model.is_loaded_in_4bit = True


def attach_lora(model: Any, profile: SpeedProfile, lora_layers: int | None = None) -> Any:
    """peft LoRA r=8 on all linear layers (of the last `lora_layers` blocks, if given); the
    standard recipe uses prepare_model_for_kbit_training."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if profile.load_in_4bit and profile.upcast_frozen_to_fp32:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=profile.gradient_checkpointing)
    elif profile.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    from finqlora.train.training import lora_targets

    targets, layers = lora_targets(model, "all-linear", lora_layers)
    config = LoraConfig(r=LORA_R, lora_alpha=16, lora_dropout=0.05, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM", layers_to_transform=layers)
    return get_peft_model(model, config)


def model_flops_per_token(arch: dict) -> float:
    """LoRA training FLOPs per token without recomputation: forward 2N + input-gradient backward 2N.

    N counts the decoder's linear weights and the lm_head (embeddings are lookups). The frozen
    base gets no weight gradients, so the usual 6N is 4N here; LoRA's own matmuls are <1%.
    """
    h, i, layers, vocab = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], arch["vocab_size"]
    kv = h * arch["num_key_value_heads"] // arch["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return 4.0 * (layers * per_layer + h * vocab)


def attention_flops(arch: dict, lengths: list[int]) -> float:
    """Causal attention score/value FLOPs (forward + backward = 3x forward) for these samples."""
    h, layers = arch["hidden_size"], arch["num_hidden_layers"]
    return sum(3 * 2 * n * n * h * layers for n in lengths)


# ---------------------------------------------------------------------------------------------
# One variant


def run_variant(variant: Variant, samples: list[dict[str, list[int]]], *, arch: dict, device: str,
                warmup: int, steps: int, seed: int = 0, trace_steps: int = 0,
                build: Any = None, max_length: int = MAX_LENGTH, flops_arch: Any = None,
                lora_layers: int | None = None) -> dict:
    """Train `warmup + steps` optimizer steps and measure the timed ones.

    `build(profile)` returns the base model (default: a random model of `arch` on `device`);
    LoRA and the profile's levers are added here, as the training path does. `flops_arch()`
    gives the dimensions for the MFU count when `build` makes a model other than `arch`.
    """
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from finqlora.train.speedups import (apply_model_speedups, attention_implementation, make_data_collator,
                                   pack_by_token_budget, tokens_per_micro_batch)

    profile = variant.profile
    cuda = device.startswith("cuda")
    model = build(profile) if build is not None else build_model(arch, profile, device)
    model = attach_lora(model, profile, lora_layers)
    model = apply_model_speedups(model, profile)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    if variant.repeat_check:  # issue 5 asks for 20+ steps
        warmup, steps = max(warmup, 5), max(steps, 20)
    total_steps = warmup + steps
    if variant.repeat_check:
        # One epoch = one step on the same four samples; the Trainer repeats epochs up to max_steps.
        batch = repeated_batch(samples, max_length)
        train = [{"pack": batch}] if profile.packing else batch
    elif profile.packing:
        budget = tokens_per_micro_batch(profile, variant.batch_size, max_length)
        packs = pack_by_token_budget([len(s["input_ids"]) for s in samples], budget, seed=seed)
        train = [{"pack": [samples[i] for i in pack]} for pack in packs]
    else:
        train = samples
    per_device = 1 if profile.packing else variant.batch_size

    counted: list[tuple[int, list[int]]] = []  # per micro-batch: real tokens, sample lengths

    collate = make_data_collator(padding_tokenizer(), profile, attn_implementation=attention_implementation(model))

    def counting_collate(features: list[dict]) -> dict:
        batch = collate(features)
        flat = [s for f in features for s in (f["pack"] if "pack" in f else [f])]
        counted.append((sum(len(s["input_ids"]) for s in flat), [len(s["input_ids"]) for s in flat]))
        return batch

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if cuda:
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = Clock()
    callbacks: list[Any] = [clock]
    if trace_steps:
        callbacks.append(ProfileSteps(warmup, trace_steps))
    args = TrainingArguments(
        output_dir=os.environ.get("TMPDIR", "/tmp") + f"/bench-{variant.name}",
        per_device_train_batch_size=per_device,
        max_steps=total_steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine" if not variant.repeat_check else "constant",
        warmup_steps=2,
        optim=profile.optimizer if cuda else "adamw_torch",
        bf16=profile.compute_dtype == "bf16",  # on the CPU: bf16 autocast (AMX / AVX512-BF16)
        fp16=cuda and profile.compute_dtype == "fp16",
        gradient_checkpointing=profile.gradient_checkpointing,
        # The plain recipe keeps transformers' defaults; our paths use non-reentrant checkpointing.
        gradient_checkpointing_kwargs=None if profile.upcast_frozen_to_fp32 else {"use_reentrant": False},
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not cuda,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=counting_collate,
                      callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # per-step log dicts would drown the table
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start

    # Micro-batch k is collated just before optimizer step k (no workers, no accumulation).
    timed = clock.marks[warmup - 1 :] if warmup > 0 else [start] + clock.marks
    seconds = timed[-1] - timed[0]
    timed_batches = counted[warmup : warmup + len(timed) - 1]
    tokens = sum(n for n, _ in timed_batches)
    lengths = [n for _, ls in timed_batches for n in ls]
    result = dict(
        variant=variant.name,
        what=variant.what,
        profile=dataclasses.asdict(profile),
        steps=len(timed) - 1,
        seconds=seconds,
        tokens=tokens,
        tokens_per_s=tokens / seconds if seconds > 0 else float("nan"),
        samples_per_step=len(lengths) / max(len(timed_batches), 1),
        step_times_s=[b - a for a, b in zip(timed, timed[1:])],
        flops=model_flops_per_token(flops_arch() if flops_arch else arch) * tokens
        + attention_flops(flops_arch() if flops_arch else arch, lengths),
        losses=clock.losses,
        wall_s=wall,
    )
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if variant.repeat_check:
        result.update(loss_check(clock.losses))
    return result


class ProfileSteps:
    """torch.profiler over a few steps after warm-up; prints where CPU and GPU time goes."""

    def __new__(cls, start: int, count: int):  # noqa: ANN204
        import torch
        from transformers import TrainerCallback

        class _Profile(TrainerCallback):
            def __init__(self) -> None:
                self.prof = None

            def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                if state.global_step == start:
                    activities = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        activities.append(torch.profiler.ProfilerActivity.CUDA)
                    self.prof = torch.profiler.profile(activities=activities)
                    self.prof.__enter__()

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                if self.prof is not None and state.global_step == start + count:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    self.prof.__exit__(None, None, None)
                    averages = self.prof.key_averages()
                    print(averages.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60), file=sys.stderr)
                    print(averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60), file=sys.stderr)
                    if torch.cuda.is_available():
                        print(averages.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60),
                              file=sys.stderr)
                    self.prof = None

        return _Profile()


def loss_check(losses: list[float]) -> dict:
    """Finite everywhere, and the last five steps' mean below the first five's."""
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    first, last = statistics.fmean(losses[:5]), statistics.fmean(losses[-5:])
    return dict(loss_finite=finite, loss_first5=first, loss_last5=last, loss_falls=finite and last < first)


def padding_tokenizer() -> Any:
    """A real (fast) tokenizer whose only job is padding token-id batches with id 0.

    The benchmark's ids are already tokenized, and the random model has no tokenizer of its own;
    padded positions are masked out of attention and loss, so the pad id does not matter.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                   pad_token="<pad>", padding_side="right")


def matmul_peak_tflops(device: str = "cuda", n: int = 8192, reps: int = 20) -> float:
    """bf16 matmul rate on random data (median of `reps` timed products after warm-up)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n**3 / statistics.median(times) / 1e12


# ---------------------------------------------------------------------------------------------
# Driver


def summarize(results: list[dict], peak_tflops: float | None) -> list[dict]:
    """Add MFU and ratios against the baseline of the same run (the fastest, if it ran more than once)."""
    baselines = [r for r in results if r["variant"] == "baseline" and "error" not in r]
    base = max(baselines, key=lambda r: r["tokens_per_s"], default=None)
    for r in results:
        if "error" in r:
            continue
        if peak_tflops and r["seconds"] > 0:
            r["mfu"] = r["flops"] / r["seconds"] / (peak_tflops * 1e12)
        if base and not r["variant"].startswith("repeat"):
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            if "peak_allocated_gib" in r:
                r["memory_vs_baseline"] = r["peak_allocated_gib"] / base["peak_allocated_gib"]
    return results


def table(results: list[dict]) -> str:
    lines = ["| variant | what | eff. tokens/s | x baseline | peak GiB (alloc/reserved) | MFU | samples/step | loss check |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r.get('what', '')} | failed: {r['error'][:120]} | | | | | |")
            continue
        mem = (f"{r['peak_allocated_gib']:.1f} / {r['peak_reserved_gib']:.1f}" if "peak_allocated_gib" in r else "-")
        check = ""
        if "loss_falls" in r:
            check = (f"{'ok' if r['loss_falls'] else 'FAIL'}: {r['loss_first5']:.3f} -> {r['loss_last5']:.3f}"
                     f"{'' if r['loss_finite'] else ' (non-finite)'}")
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        lines.append(f"| {r['variant']} | {r['what']} | {r['tokens_per_s']:,.0f} | {speedup} | {mem} | {mfu} | "
                     f"{r['samples_per_step']:.1f} | {check} |")
    return "\n".join(lines)


def environment() -> dict:
    import importlib.metadata as md

    import torch

    env = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "triton"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    known = variants()
    names = [n.strip() for n in args.variants.split(",")] if args.variants else list(MAIN_VARIANTS)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="train_throughput-"))
    env = environment()
    peak = matmul_peak_tflops() if torch.cuda.is_available() else None
    env["bf16_matmul_peak_tflops"] = peak
    data_info = length_stats(np.load(args.tokens)["lengths"])
    print(json.dumps({"environment": env, "data": data_info}, indent=1), flush=True)
    results = []
    for index, name in enumerate(names):
        result_file = work / f"variant_{index:02d}_{name.replace('+', 'plus_')}.json"
        cmd = [sys.executable, __file__, "worker", "--variant", name, "--tokens", str(args.tokens),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--json-out", str(result_file)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout)
        if proc.returncode != 0 or not result_file.exists():
            tail = (proc.stderr or proc.stdout)[-3000:]
            with open(out / "failures.log", "a", encoding="utf-8") as log:
                log.write(f"===== {name} (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}\n")
            result = {"variant": name, "what": known[name].what, "error": tail.strip().splitlines()[-1] if tail.strip() else "no output"}
            print(f"[{name}] FAILED after {time.perf_counter() - started:.0f}s:\n{tail}", flush=True)
        else:
            result = json.loads(result_file.read_text())
            print(f"[{name}] {result['tokens_per_s']:,.0f} tok/s, peak {result.get('peak_allocated_gib', 0):.1f} GiB, "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
        results.append(result)
        summarize(results, peak)
        (out / "train_throughput.json").write_text(json.dumps(
            {"environment": env, "data": data_info, "results": results}, indent=1))
    (out / "train_throughput.md").write_text(table(results) + "\n")
    print()
    print(table(results))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import torch

    variant = variants()[args.variant]
    samples = load_samples(Path(args.tokens))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_variant(variant, samples, arch=DEEPSEEK_7B, device=device, warmup=args.warmup, steps=args.steps,
                         trace_steps=args.trace_steps)
    Path(args.json_out).write_text(json.dumps(result))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    stats = prepare(Path(args.dataset), args.tokenizer, Path(args.out), DEEPSEEK_7B["vocab_size"], MAX_LENGTH,
                    args.limit)
    print(json.dumps(stats, indent=1, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize an instruction JSONL into a small .npz (run where the data is)")
    p.add_argument("--dataset", required=True, help="instruction JSONL (e.g. the output of finqlora build)")
    p.add_argument("--tokenizer", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--out", default=".bench/train_tokens.npz")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")
    p.set_defaults(func=cmd_prepare)
    r = sub.add_parser("run", help="run the variants (each in its own process) and print the table")
    r.add_argument("--tokens", default=".bench/train_tokens.npz")
    r.add_argument("--variants", default="", help="comma-separated names (default: the main set); known: " + ", ".join(variants()))
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    r.add_argument("--variant-timeout", type=int, default=300)
    r.add_argument("--out", default="runs/train_throughput")
    r.set_defaults(func=cmd_run)
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("--variant", required=True)
    w.add_argument("--tokens", required=True)
    w.add_argument("--warmup", type=int, default=5)
    w.add_argument("--steps", type=int, default=20)
    w.add_argument("--json-out", required=True)
    w.add_argument("--trace-steps", type=int, default=0, help="profile this many steps after warm-up (stderr)")
    w.set_defaults(func=cmd_worker)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
