"""GPU training throughput and memory: the standard QLoRA recipe, finqlora's speed profiles and
stock Unsloth, measured side by side in one run.

Model: the exact deepseek-llm-7b-chat architecture (Llama, vocab 102,400, hidden 4096,
intermediate 11,008, 30 layers, 32 heads) with random weights, built on the GPU one layer at a
time, each decoder layer quantized to bitsandbytes NF4 (double quant) as soon as it exists, as a
4-bit load would do it: speed and memory do not depend on weight values, and the real weights
cannot be fetched there.

Data: token ids of a real instruction dataset, made on a machine that has the data:

    python benchmarks/train_throughput.py prepare --dataset runs/bench/dataset.jsonl \
        --tokenizer builtin:qwen2.5-coder-0.5b-instruct --out .bench/train_tokens.npz

tokenizes every record with `chat_format.encode_for_training` (max length 512, prompt labels
-100) and maps the ids into the 102,400-entry vocabulary (id mod 102,400: the lengths and the
prompt/answer split are what matter for speed). Then, on the GPU machine:

    python benchmarks/train_throughput.py run --tokens .bench/train_tokens.npz --out results/

How `run` measures. Every variant is a worker process of its own (its own CUDA context, so its
peak memory and its kernel patches stay its own) that builds its model once and then trains in
blocks on command, one worker at a time. First each trains a warm-up block of `--warmup` steps;
then `--repeats` rounds follow, and in each round every variant trains one block of one untimed
step plus `--steps` timed ones, in the order given (A B C, then C B A in the next round, so slow
drift cancels). All variants with the same batch layout see the same samples in the same order.
A row reports:

- effective tokens/s (tokens trained, prompt and answer, padding excluded) as the median over
  its timed blocks, with the range;
- ratios against the baseline row (`--baseline`: the recipe, or the profile a lever is added to)
  and the matched stock-Unsloth row as the median of per-round ratios (each block against the
  other row's block of the same round);
- peak GPU memory after the model is built: torch's allocated and reserved peaks, plus the
  paged 8-bit optimizer state (CUDA managed memory, which torch's counters do not see);
- samples per optimizer step: a row whose micro-batches hold more samples than the recipe's 4
  (the packed profiles) trains a different batch size, and the table says so, whichever row is
  the baseline.

Baseline: plain transformers Trainer + peft + bitsandbytes NF4 double quant, batch 4, max length
512, dynamic padding, gradient checkpointing, paged 8-bit AdamW, all-linear LoRA r=8 (alpha 16,
dropout 0.05), bf16. Unsloth rows (`engine="unsloth"`, need unsloth installed) run stock
Unsloth's FastLanguageModel on a random bf16 checkpoint of the same architecture, saved once
per run, with the same data, optimizer, schedule and timing; `-varlen` Unsloth rows hand its
packed attention torch's varlen flash kernel through a shim and are NOT stock Unsloth.

`--quality` runs the same machinery on a model of the same shape with fewer layers: every
variant trains the same batches for `--steps` steps in one block and then scores held-out
samples; the table gives each row's loss against the standard recipe in the same precision.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import selectors
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from finqlora.core.profiles import SpeedProfile  # noqa: E402
from finqlora.train.profiles import get_profile  # noqa: E402
from finqlora.train.recompute import memory_sizing_of  # noqa: E402

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
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    profile: SpeedProfile  # for Unsloth rows only the data layout (packing, budget) is used
    repeat_check: bool = False  # one repeated 4 x 512 batch: does the loss fall?
    batch_size: int = BATCH_SIZE  # samples per padded batch; a packed budget is batch_size x max_length
    engine: str = "finqlora"  # "finqlora" (peft + the profile's levers) or "unsloth" (stock FastLanguageModel)
    lora_dropout: float = 0.05
    varlen_shim: bool = False  # Unsloth rows: torch's varlen kernel for packed rows (not stock)
    unsloth_checkpointing: str | bool = "unsloth"  # Unsloth rows: its use_gradient_checkpointing


def resolved(profile: SpeedProfile, **changes: Any) -> SpeedProfile:
    """The profile with None fields set to the standard recipe, plus `changes`."""
    filled = {k: v for k, v in STANDARD.items() if getattr(profile, k) is None}
    return dataclasses.replace(profile, **filled, **changes)


def variants() -> dict[str, Variant]:
    replace = dataclasses.replace
    base = resolved(get_profile("default"))
    t4 = resolved(get_profile("t4"))
    fast = resolved(get_profile("fast"))
    fast_compiled = resolved(get_profile("fast-compiled"))
    fused = resolved(get_profile("fused"))
    t4_fused = resolved(get_profile("t4-fused"))
    compiled = resolved(get_profile("compiled"))
    layers_only = replace(compiled, drop_right_padding_mask=False, offload_input_embeddings=False,
                          recompute_dequantized_weights=True, compile_cpp_wrapper=False,
                          optimizer=STANDARD["optimizer"])
    rows = [
        Variant("baseline", "plain Trainer + peft + bnb NF4 (the standard recipe)", base),
        Variant("fp16-standard", "the standard recipe in fp16 (a T4's precision)", replace(base, compute_dtype="fp16")),
        # The profiles that keep the recipe's 4 samples per step.
        Variant("fused", "--profile fused: fused LoRA (dropout kept), Liger, answer-only fused CE, no upcast, "
                "offloaded checkpointing", fused),
        Variant("t4-fused", "--profile t4-fused: the same in fp16, sm75 kernels only", t4_fused),
        Variant("compiled", "--profile compiled: decoder layers compiled (NF4 + LoRA with dropout, norms, RoPE, "
                "SwiGLU fused; C++ launcher, dense weights kept for backward), answer-only fused CE, no upcast, "
                "offloaded checkpointing, embedding table on the host, no padding mask, fused AdamW", compiled),
        Variant("t4-compiled", "--profile t4-compiled: the same in fp16, sm75 kernels only (no flash attention)",
                resolved(get_profile("t4-compiled"))),
        # The compiled layers alone (the profile as first measured), then each later lever on top of
        # them (issue 17: measure each lever alone and together).
        Variant("compiled-layers", "compiled decoder layers (dense weights recomputed, Python launcher), "
                "answer-only fused CE, no upcast, offloaded checkpointing, paged 8-bit AdamW", layers_only),
        Variant("compiled-layers+no-pad-mask", "compiled-layers, right-padded batches without a padding mask",
                replace(layers_only, drop_right_padding_mask=True)),
        Variant("compiled-layers+fused-adamw", "compiled-layers with torch's fused AdamW (fp32 state)",
                replace(layers_only, optimizer="adamw_torch_fused")),
        Variant("compiled-layers+host-embed", "compiled-layers, input embedding table in pinned host memory",
                replace(layers_only, offload_input_embeddings=True)),
        Variant("compiled-layers+host-embed+keep-weights", "compiled-layers, embedding table on the host, dense "
                "weights kept for the backward pass",
                replace(layers_only, offload_input_embeddings=True, recompute_dequantized_weights=False)),
        Variant("compiled-layers+cpp-wrapper", "compiled-layers with inductor's C++ launcher",
                replace(layers_only, compile_cpp_wrapper=True)),
        Variant("compiled-no-offload", "compiled with checkpointed layer inputs kept on the GPU",
                replace(compiled, offload_activations=False)),
        Variant("fused-no-offload", "fused with checkpointed layer inputs kept on the GPU",
                replace(fused, offload_activations=False)),
        # Each lever alone on top of the baseline.
        Variant("+fused-lora", "baseline + fused LoRA projections", replace(base, fused_lora=True)),
        Variant("+offload", "baseline + checkpointing with layer inputs in CPU memory",
                replace(base, offload_activations=True)),
        Variant("+answer-only", "baseline + answer-only logits (torch CE)", replace(base, answer_only_logits=True)),
        Variant("+liger", "baseline + Liger RMSNorm/SwiGLU/RoPE + fused linear-CE",
                replace(base, liger=True, answer_only_logits=True)),
        Variant("+no-upcast", "baseline without fp32 upcast of norms/embeddings/lm_head",
                replace(base, upcast_frozen_to_fp32=False)),
        Variant("+no-cudnn-attention", "baseline with flash/mem-efficient attention instead of cuDNN's",
                replace(base, avoid_cudnn_attention=True)),
        Variant("no-checkpointing", "baseline without gradient checkpointing", replace(base, gradient_checkpointing=False)),
        # Packed profiles: more samples per optimizer step than the recipe's 4.
        Variant("t4", "--profile t4 (fp16, 4-bit, checkpointing, 4 packed rows of 4x512 tokens)", t4),
        Variant("fast", "--profile fast (4-bit, varlen attention, 8x4x512-token micro-batches, checkpointing on "
                "only as many layers as free memory requires)", fast),
        Variant("fast-checkpoint-all", "fast with every layer checkpointed (the profile before memory sizing)",
                replace(fast, memory_sized_checkpointing=False)),
        Variant("fast-fused", "fast + fused LoRA projections", replace(fast, fused_lora=True)),
        Variant("fast-compiled", "--profile fast-compiled: fast + compiled decoder layers", fast_compiled),
        Variant("fast-compiled-checkpoint-all", "fast-compiled with every layer checkpointed",
                replace(fast_compiled, memory_sized_checkpointing=False)),
        Variant("fast-masked", "fast with sdpa and block-diagonal masks in 8 rows instead of varlen attention",
                replace(fast, varlen_attention=False)),
        Variant("fast-bf16", "--profile fast-bf16 (like fast, no quantization)", resolved(get_profile("fast-bf16"))),
        Variant("+packing", "baseline + padding-free packing (1 row, 4x512 token budget)", replace(base, packing=True)),
        Variant("+packing+varlen", "baseline + padding-free packing with varlen attention (1 row, 4x512 tokens)",
                replace(base, packing=True, varlen_attention=True)),
        Variant("batch16-standard", "the standard recipe with batch 16 (more tokens per step, no other lever)",
                base, batch_size=16),
        # Stock Unsloth (and one shimmed variant) on the same samples.
        Variant("unsloth-d05", "stock Unsloth, padded batches of 4, lora_dropout 0.05", base, engine="unsloth"),
        Variant("unsloth-d0", "stock Unsloth, padded batches of 4, lora_dropout 0 (its fast LoRA path)", base,
                engine="unsloth", lora_dropout=0.0),
        Variant("unsloth-packs-d05", "stock Unsloth on fast's micro-batches (one padding-free row each)", fast,
                engine="unsloth"),
        Variant("unsloth-packs-varlen-d05", "Unsloth on fast's micro-batches with a varlen-attention shim (NOT stock)",
                fast, engine="unsloth", varlen_shim=True),
        Variant("unsloth-packs-varlen-d05-no-checkpointing", "unsloth-packs-varlen-d05 with Unsloth's checkpointing "
                "off (use_gradient_checkpointing=False; NOT stock: the shim)", fast, engine="unsloth", varlen_shim=True,
                unsloth_checkpointing=False),
        Variant("unsloth-packs-varlen-d0", "as unsloth-packs-varlen-d05 with lora_dropout 0 (NOT stock)", fast,
                engine="unsloth", lora_dropout=0.0, varlen_shim=True),
        # Issue 5: the two GPU configs (and the T4 profile) on one repeated batch.
        Variant("repeat-t4-config", "T4 config (standard recipe, fp16) on a repeated 4x512 batch",
                replace(base, compute_dtype="fp16"), repeat_check=True),
        Variant("repeat-bf16-config", "bf16 config (standard recipe) on a repeated 4x512 batch", base, repeat_check=True),
        Variant("repeat-t4-profile", "--profile t4 on a repeated 4x512 batch", t4, repeat_check=True),
    ]
    return {v.name: v for v in rows}


# Named sets for `run --variants` (what docs/benchmarks.md reports).
VARIANT_SETS = {
    # The recipe's 4 samples per step: baseline, stock Unsloth, our profiles and each lever alone.
    "small-batch": ("baseline", "unsloth-d05", "compiled", "t4-compiled", "fp16-standard", "fused",
                    "compiled-no-offload", "unsloth-d0"),
    # The compiled profile's levers, each alone on the compiled layers and all together.
    "levers": ("unsloth-d05", "compiled-layers", "compiled-layers+no-pad-mask", "compiled-layers+fused-adamw",
               "compiled-layers+host-embed", "compiled-layers+host-embed+keep-weights", "compiled-layers+cpp-wrapper",
               "compiled"),
    # Packed micro-batches (more samples per step), against Unsloth on the same packs.
    # The memory-sized profiles size themselves from what the GPU has free: run one of them per run
    # (or cap each worker with --gpu-memory-gib), or the first to start takes the memory.
    "packed": ("fast-compiled", "unsloth-packs-varlen-d05"),
    # The packed levers alone and together, each memory-sized worker capped (--gpu-memory-gib).
    "packed-levers": ("fast-checkpoint-all", "fast", "fast-compiled-checkpoint-all", "fast-compiled",
                      "unsloth-packs-varlen-d05"),
    # The loss after the same 100 batches, each profile against the recipe in its precision.
    "quality": ("baseline", "compiled", "fused", "fp16-standard", "t4-compiled", "t4-fused"),
}
# Which standard row a row's loss is compared with (`--quality`): the recipe in the same precision.
QUALITY_REFERENCE = {"bf16": "baseline", "fp16": "fp16-standard"}


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

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_model(arch: dict, profile: SpeedProfile, device: str, *, quantize: bool | None = None) -> Any:
    """Random-weight Llama of `arch` on `device`, built one layer at a time (NF4 when the profile says so).

    Built on the meta device and materialized layer by layer, each decoder layer quantized before
    the next one exists, so building never holds the full bf16 model (14 GB for deepseek-7b) and
    workers can build side by side. Weights ~ N(0, initializer_range), norms 1, as from_config.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = getattr(torch, DTYPES[profile.compute_dtype])
    quantize = profile.load_in_4bit if quantize is None else quantize
    config = LlamaConfig(**arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    generator = torch.Generator(device=device).manual_seed(0)
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head, *model.model.layers):
        module.to_empty(device=device)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if param.dim() == 1:
                    param.fill_(1.0)  # RMSNorm scales
                else:
                    param.normal_(0.0, config.initializer_range, generator=generator)
        if quantize and module in model.model.layers:
            quantize_layer_nf4(module, dtype)
    # Its inverse frequencies are computed in __init__ (a non-persistent buffer): build it again for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)
    if config.tie_word_embeddings:
        model.tie_weights()
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"random model left tensors unmaterialized: {left[:5]}")
    if quantize:
        model.is_loaded_in_4bit = True
    model.config.use_cache = False
    return model


def quantize_layer_nf4(layer: Any, compute_dtype: Any) -> None:
    """Swap every linear layer of one decoder block for a bitsandbytes NF4 (double-quant) layer.

    This is what `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...))`
    does while it loads a checkpoint; lm_head and embeddings stay unquantized, as there.
    """
    import bitsandbytes as bnb
    import torch

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


def save_random_checkpoint(arch: dict, path: Path) -> dict:
    """A bf16 random checkpoint of `arch` (with a padding tokenizer) for the Unsloth rows to load."""
    import torch

    started = time.perf_counter()
    profile = dataclasses.replace(get_profile("default"), compute_dtype="bf16", load_in_4bit=False)
    model = build_model(arch, profile, "cuda" if torch.cuda.is_available() else "cpu")
    model.config.architectures = ["LlamaForCausalLM"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size="4GB")
    tokenizer = padding_tokenizer()
    tokenizer.eos_token = tokenizer.bos_token = tokenizer.pad_token
    tokenizer.model_max_length = 4096
    tokenizer.save_pretrained(path)
    return {"checkpoint": str(path), "params": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - started, 1)}


def attach_lora(model: Any, profile: SpeedProfile, lora_layers: int | None = None, lora_dropout: float = 0.05) -> Any:
    """peft LoRA r=8 on all linear layers (of the last `lora_layers` blocks, if given); the
    standard recipe uses prepare_model_for_kbit_training."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if profile.load_in_4bit and profile.upcast_frozen_to_fp32:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=profile.gradient_checkpointing)
    elif profile.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    from finqlora.train.setup import lora_targets

    targets, layers = lora_targets(model, "all-linear", lora_layers)
    config = LoraConfig(r=LORA_R, lora_alpha=16, lora_dropout=lora_dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM", layers_to_transform=layers)
    import torch

    torch.manual_seed(0)  # peft draws LoRA's A at random: the same adapters in every variant
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
# Training in blocks (one worker = one variant = one model)

# The next block of a session: (untimed steps, timed steps), or None to stop.
Plan = Callable[[], "tuple[int, int] | None"]


def _no_event(*args: Any, **kwargs: Any) -> None:
    return None


class BlockClock:
    """Trainer callback: stamps every optimizer step's end and, after each block, asks `plan` for the next.

    The Trainer waits inside `on_step_end` while the coordinator runs the other variants, so the
    pause is outside every timed interval. (A plain class: transformers is imported only inside
    the worker, after Unsloth where a row needs it.)
    """

    def __init__(self, plan: Plan, on_block: Callable[[dict], None], cuda: bool) -> None:
        self.plan, self.on_block, self.cuda = plan, on_block, cuda
        self.marks: list[float] = []  # perf_counter at the end of each optimizer step
        self.losses: list[float] = []
        self.blocks: list[dict] = []
        self.remaining = 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):  # every other Trainer event
            return _no_event
        raise AttributeError(name)

    def _next(self, control: Any) -> None:
        step = self.plan()
        if step is None or sum(step) == 0:
            control.should_training_stop = True
            return
        untimed, timed = step
        self.blocks.append({"begin": len(self.marks), "untimed": untimed, "timed": timed,
                            "resumed": time.perf_counter()})
        self.remaining = untimed + timed

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._next(control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        self.remaining -= 1
        if self.remaining == 0:
            self.on_block(self.blocks[-1])
            self._next(control)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def block_result(marks: list[float], block: dict, counted: list[tuple[int, list[int]]], arch: dict) -> dict:
    """Tokens, time and FLOPs of a block's timed steps (micro-batch k is optimizer step k)."""
    begin, untimed, timed = block["begin"], block["untimed"], block["timed"]
    if timed == 0:
        return {"steps": 0}
    first = begin + untimed
    start = marks[first - 1] if untimed else block["resumed"]
    stamps = [start] + marks[first : first + timed]
    seconds = stamps[-1] - stamps[0]
    batches = counted[first : first + timed]
    tokens = sum(n for n, _ in batches)
    lengths = [n for _, ls in batches for n in ls]
    return dict(steps=timed, seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds if seconds > 0 else float("nan"),
                samples=len(lengths), samples_per_step=len(lengths) / timed,
                step_times_s=[b - a for a, b in zip(stamps, stamps[1:])],
                flops=model_flops_per_token(arch) * tokens + attention_flops(arch, lengths))


def train_items(variant: Variant, samples: list[dict], max_length: int, seed: int) -> tuple[list[dict], int]:
    """The Trainer's dataset and per-device batch size for the variant's batch layout."""
    from finqlora.train.collate import pack_by_token_budget, tokens_per_micro_batch

    profile = variant.profile
    if variant.repeat_check:
        # One epoch = one step on the same four samples; the Trainer repeats epochs up to max_steps.
        batch = repeated_batch(samples, max_length)
        return ([{"pack": batch}], 1) if profile.packing else (batch, BATCH_SIZE)
    if profile.packing:
        budget = tokens_per_micro_batch(profile, variant.batch_size, max_length)
        packs = pack_by_token_budget([len(s["input_ids"]) for s in samples], budget, seed=seed)
        return [{"pack": [samples[i] for i in pack]} for pack in packs], 1
    return samples, variant.batch_size


def finqlora_model(variant: Variant, *, arch: dict, device: str, build: Any, lora_layers: int | None) -> tuple[Any, Any]:
    """peft LoRA on the random base (or `build(profile)`), the profile's levers, the profile's collator."""
    from finqlora.train.collate import make_data_collator
    from finqlora.train.patches import apply_model_speedups, attention_implementation

    profile = variant.profile
    model = build(profile) if build is not None else build_model(arch, profile, device)
    model = attach_lora(model, profile, lora_layers, variant.lora_dropout)
    model = apply_model_speedups(model, profile)
    collate = make_data_collator(padding_tokenizer(), profile, attn_implementation=attention_implementation(model))
    return model, collate


def training_arguments(variant: Variant, per_device: int, total_steps: int, seed: int, cuda: bool) -> Any:
    from transformers import TrainingArguments

    profile = variant.profile
    unsloth = variant.engine == "unsloth"
    checkpointing = bool(profile.gradient_checkpointing) and not unsloth  # Unsloth checkpoints its own way
    return TrainingArguments(
        output_dir=os.environ.get("TMPDIR", "/tmp") + f"/bench-{variant.name}",
        per_device_train_batch_size=per_device,
        max_steps=total_steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine" if not variant.repeat_check else "constant",
        warmup_steps=2,
        optim=(profile.optimizer if not unsloth else "paged_adamw_8bit") if cuda else "adamw_torch",
        bf16=unsloth or profile.compute_dtype == "bf16",  # on the CPU: bf16 autocast (AMX / AVX512-BF16)
        fp16=cuda and not unsloth and profile.compute_dtype == "fp16",
        gradient_checkpointing=checkpointing,
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


def train_session(variant: Variant, samples: list[dict], *, arch: dict, device: str, plan: Plan, total_steps: int,
                  on_block: Callable[[dict], None] | None = None, ready: Callable[[dict], None] | None = None,
                  seed: int = 0, build: Any = None, max_length: int = MAX_LENGTH, flops_arch: Any = None,
                  lora_layers: int | None = None, checkpoint: str | None = None, trace_steps: int = 0,
                  trace_from: int = 1) -> tuple[dict, Any]:
    """Build the variant's model once, then train the blocks `plan` hands out; returns (result, model)."""
    import torch
    from transformers import PrinterCallback, Trainer

    cuda = device.startswith("cuda")
    started = time.perf_counter()
    if variant.engine == "unsloth":
        model, collate = unsloth_model(variant, checkpoint)
    else:
        model, collate = finqlora_model(variant, arch=arch, device=device, build=build, lora_layers=lora_layers)
    train, per_device = train_items(variant, samples, max_length, seed)
    counted: list[tuple[int, list[int]]] = []  # per micro-batch: real tokens, sample lengths

    def counting_collate(features: list[dict]) -> dict:
        batch = collate(features)
        flat = [s for f in features for s in (f["pack"] if "pack" in f else [f])]
        counted.append((sum(len(s["input_ids"]) for s in flat), [len(s["input_ids"]) for s in flat]))
        return batch

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    load_s = time.perf_counter() - started
    if ready is not None:
        ready({"load_s": round(load_s, 1)})
    blocks: list[dict] = []
    dims = flops_arch() if flops_arch else arch

    def done(block: dict) -> None:
        blocks.append(block_result(clock.marks, block, counted, dims))
        if cuda:  # the run's peak so far: shows whether it came in the warm-up or in steady steps
            blocks[-1]["peak_gib_so_far"] = [round(torch.cuda.max_memory_allocated() / 2**30, 3),
                                             round(torch.cuda.max_memory_reserved() / 2**30, 3)]
        if on_block is not None:
            on_block(blocks[-1])

    clock = BlockClock(plan, done, cuda)
    callbacks: list[Any] = [clock] + ([ProfileSteps(trace_from, trace_steps)] if trace_steps else [])
    trainer = Trainer(model=model, args=training_arguments(variant, per_device, total_steps, seed, cuda),
                      train_dataset=train, data_collator=counting_collate, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # per-step log dicts would drown the table
    trainer.train()
    result = dict(variant=variant.name, what=variant.what, engine=variant.engine, profile=dataclasses.asdict(variant.profile),
                  lora_dropout=variant.lora_dropout, blocks=blocks, losses=clock.losses, load_s=round(load_s, 1),
                  wall_s=time.perf_counter() - started)
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        result["paged_optimizer_gib"] = paged_state_gib(trainer.optimizer)
    if variant.varlen_shim:
        result["varlen_shim_calls"] = VARLEN_SHIM_CALLS[0]
    sizing = memory_sizing_of(trainer.model)
    if sizing is not None:  # how many layers kept their activations, per micro-batch
        result["memory_sized_checkpointing"] = sizing.summary()
    if variant.profile.compiled_layers:  # one graph for all layers expected, and no breaks inside a layer
        from torch._dynamo.utils import counters

        result["compiled_graphs"] = counters["stats"].get("unique_graphs", 0)
        result["graph_breaks"] = sum(counters["graph_break"].values())
    return result, trainer.model


def run_variant(variant: Variant, samples: list[dict[str, list[int]]], *, arch: dict, device: str,
                warmup: int, steps: int, seed: int = 0, trace_steps: int = 0,
                build: Any = None, max_length: int = MAX_LENGTH, flops_arch: Any = None,
                lora_layers: int | None = None) -> dict:
    """One block in this process: `warmup` untimed and `steps` timed optimizer steps (the CPU benchmark's use).

    `build(profile)` returns the base model (default: a random model of `arch` on `device`);
    LoRA and the profile's levers are added here, as the training path does. `flops_arch()`
    gives the dimensions for the MFU count when `build` makes a model other than `arch`.
    """
    if variant.repeat_check:  # issue 5 asks for 20+ steps
        warmup, steps = max(warmup, 5), max(steps, 20)
    plan = iter([(warmup, steps)])
    result, _ = train_session(variant, samples, arch=arch, device=device, plan=lambda: next(plan, None),
                              total_steps=warmup + steps, seed=seed, build=build, max_length=max_length,
                              flops_arch=flops_arch, lora_layers=lora_layers, trace_steps=trace_steps)
    block = result.pop("blocks")[0]
    result.update(block)
    if variant.repeat_check:
        result.update(loss_check(result["losses"]))
    return result


def paged_state_gib(optimizer: Any) -> float:
    """Bytes of optimizer state in bitsandbytes' paged (CUDA managed) buffers, outside torch's counters."""
    inner = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if hasattr(value, "nbytes") and getattr(value, "is_paged", False):
                total += value.nbytes
    return total / 2**30


def val_loss(model: Any, samples: list[dict], profile: SpeedProfile, device: str) -> float:
    """Mean token loss of held-out samples (eval mode, padded batches of 4, the profile's precision)."""
    import torch
    from finqlora.train.collate import make_data_collator

    collate = make_data_collator(padding_tokenizer(), get_profile("default"))
    dtype = getattr(torch, DTYPES.get(profile.compute_dtype or "bf16", "bfloat16"))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
        for i in range(0, len(samples), BATCH_SIZE):
            batch = {k: v.to(device) for k, v in collate(samples[i : i + BATCH_SIZE]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            targets = batch["labels"][:, 1:]
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Stock Unsloth on the same samples

VARLEN_SHIM_CALLS = [0]


def unsloth_model(variant: Variant, checkpoint: str | None) -> tuple[Any, Any]:
    """Stock Unsloth: FastLanguageModel 4-bit load, LoRA on every projection, its own checkpointing."""
    import torch
    from unsloth import FastLanguageModel

    from finqlora.train.collate import make_data_collator

    if not checkpoint:
        raise RuntimeError("Unsloth rows need --checkpoint (made by `make-checkpoint`)")
    model, _ = FastLanguageModel.from_pretrained(model_name=checkpoint, max_seq_length=MAX_LENGTH, dtype=torch.bfloat16,
                                                 load_in_4bit=True, local_files_only=True, fix_tokenizer=False)
    model = FastLanguageModel.get_peft_model(model, r=LORA_R, lora_alpha=16, lora_dropout=variant.lora_dropout,
                                             target_modules=LORA_TARGETS, bias="none",
                                             use_gradient_checkpointing=variant.unsloth_checkpointing, random_state=0,
                                             max_seq_length=MAX_LENGTH)
    if variant.varlen_shim:
        install_unsloth_varlen_shim()
    if variant.profile.packing:
        return model, PackedRowCollator()
    return model, make_data_collator(padding_tokenizer(), get_profile("default"))


class PackedRowCollator:
    """Samples (or packs) in one padding-free row for Unsloth: positions restart per sample, each
    sample's first label is -100 (as transformers' DataCollatorWithFlattening), and
    `packed_seq_lengths` carries the boundaries to Unsloth's packed attention."""

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        lengths: list[int] = []
        for feature in features:
            for sample in feature["pack"] if "pack" in feature else [feature]:
                n = len(sample["input_ids"])
                ids += list(sample["input_ids"])
                labels += [-100] + list(sample["labels"][1:])
                positions += list(range(n))
                lengths.append(n)
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]),
                "packed_seq_lengths": torch.tensor(lengths, dtype=torch.int32)}


def install_unsloth_varlen_shim() -> None:
    """Hand Unsloth's packed attention torch's varlen kernel (NOT stock Unsloth).

    Unsloth 2026.10.9 takes torch's varlen_attn only when it accepts `enable_gqa` (torch 2.12+);
    on torch 2.11 it runs packed rows as one sdpa call per run of equal-length samples. The
    deepseek-7b shape has no grouped-query attention, so the shim drops the argument and calls
    the kernel the project's varlen attention calls.
    """
    from torch.nn.attention.varlen import varlen_attn
    from unsloth.utils import attention_dispatch

    def shim(q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_q: int, max_k: int, *, scale: Any = None,
             window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False) -> Any:
        if enable_gqa:
            raise NotImplementedError("the varlen shim has no grouped-query attention")
        VARLEN_SHIM_CALLS[0] += 1
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)

    attention_dispatch._TORCH_VARLEN_ATTN = shim


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
                        print(averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=80),
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


# ---------------------------------------------------------------------------------------------
# Driver: the coordinator and its workers


def paired_ratio(row: dict, reference: dict | None) -> float | None:
    """Median over rounds of row's block tokens/s over the reference's block of the same round."""
    if reference is None or "error" in reference or "error" in row:
        return None
    ref = {b["round"]: b["tokens_per_s"] for b in reference.get("blocks", []) if b.get("steps")}
    ratios = [b["tokens_per_s"] / ref[b["round"]] for b in row.get("blocks", []) if b.get("steps") and b["round"] in ref]
    return statistics.median(ratios) if ratios else None


def summarize(rows: list[dict], peak_tflops: float | None, *, baseline: str = "baseline",
              unsloth_padded: str = "unsloth-d05", unsloth_packed: str = "unsloth-packs-varlen-d05") -> list[dict]:
    """Medians over each row's timed blocks, MFU, paired ratios against the baseline and matched Unsloth rows."""
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        timed = [b for b in r.get("blocks", []) if b.get("steps")]
        if "error" in r or not timed:
            continue
        speeds = [b["tokens_per_s"] for b in timed]
        r["tokens_per_s"] = statistics.median(speeds)
        r["tokens_per_s_range"] = [min(speeds), max(speeds)]
        r["timed_blocks"] = len(timed)
        r["samples_per_step"] = sum(b["samples"] for b in timed) / sum(b["steps"] for b in timed)
        if peak_tflops:
            r["mfu"] = statistics.median(b["flops"] / b["seconds"] for b in timed) / (peak_tflops * 1e12)
    base = by_name.get(baseline)
    for r in rows:
        if "tokens_per_s" not in r:
            continue
        r["speedup"] = paired_ratio(r, base)
        packed = bool(r.get("profile", {}).get("packing"))
        r["unsloth_row"] = unsloth_packed if packed else unsloth_padded
        r["vs_unsloth"] = paired_ratio(r, by_name.get(r["unsloth_row"]))
        # Against the recipe's batch, whichever row the ratios divide by.
        r["changes_samples_per_step"] = abs(r["samples_per_step"] - BATCH_SIZE) > 0.05
    return rows


def _fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def table(rows: list[dict]) -> str:
    lines = ["| variant | what | tok/s (median; range) | x baseline | x Unsloth (row) | peak GiB alloc / reserved "
             "(+ paged opt.) | samples/step | MFU |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r.get('what', '')} | failed: {r['error'][:160]} | | | | | |")
            continue
        if "tokens_per_s" not in r:
            continue
        low, high = r["tokens_per_s_range"]
        mem = (f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f} (+{r['paged_optimizer_gib']:.2f})"
               if "peak_allocated_gib" in r else "-")
        unsloth = f"{_fmt_ratio(r.get('vs_unsloth'))} ({r['unsloth_row']})" if r.get("vs_unsloth") else "-"
        samples = f"{r['samples_per_step']:.1f}" + (" (changes it)" if r.get("changes_samples_per_step") else "")
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        lines.append(f"| {r['variant']} | {r.get('what', '')} | {r['tokens_per_s']:,.0f} ({low:,.0f}-{high:,.0f}) | "
                     f"{_fmt_ratio(r.get('speedup'))} | {unsloth} | {mem} | {samples} | {mfu} |")
    return "\n".join(lines)


def quality_table(rows: list[dict], last: int = 10) -> str:
    """Each row's held-out and final training loss against the standard recipe in the same precision."""
    by_name = {r["variant"]: r for r in rows if "error" not in r}
    lines = ["| variant | precision | val loss | vs recipe (row) | train loss, last 10 steps | within 1% |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:160]} | | | | |")
            continue
        dtype = r["profile"]["compute_dtype"]
        ref = by_name.get(QUALITY_REFERENCE.get(dtype, ""))
        train = statistics.fmean(r["losses"][-last:]) if r.get("losses") else float("nan")
        if ref is not None and "val_loss" in r and "val_loss" in ref:
            rel = r["val_loss"] / ref["val_loss"] - 1
            versus, ok = f"{rel:+.2%} ({ref['variant']})", "yes" if abs(rel) <= 0.01 else "NO"
        else:
            versus, ok = "-", "-"
        lines.append(f"| {r['variant']} | {dtype} | {r.get('val_loss', float('nan')):.4f} | {versus} | {train:.4f} | {ok} |")
    return "\n".join(lines)


class WorkerProcess:
    """One variant's worker: JSON lines in on stdin, JSON lines out on stdout, its log on stderr.

    Replies are read from the pipe's file descriptor into our own line buffer: a buffered
    readline after `select` can swallow a second line that arrived with the first, and the
    selector would then wait for data that was already read.
    """

    def __init__(self, name: str, cmd: list[str], log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.error: str | None = None
        self.ready: dict = {}
        self.blocks: list[dict] = []
        self.final: dict = {}
        self._pending = b""

    def send(self, message: dict) -> None:
        if self.error is None:
            try:
                self.proc.stdin.write((json.dumps(message) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                self.fail(f"worker gone ({exc})")

    def receive(self, timeout: float) -> dict | None:
        if self.error is not None:
            return None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                start = line.find(b'{"event"')  # a message may follow stray text that reached the pipe
                if start >= 0:
                    try:
                        return json.loads(line[start:])
                    except json.JSONDecodeError:
                        pass
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                self.fail(f"no answer within {timeout:.0f}s")
                return None
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                self.fail(f"exited with {self.proc.wait()}")
                return None
            self._pending += chunk

    def fail(self, why: str) -> None:
        self.log.flush()
        tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-2500:].strip().splitlines()
        last = next((line for line in reversed(tail) if line.strip() and not line.startswith(" ")), "")
        self.error = f"{why}: {last}"[:400]
        print(f"[{self.name}] FAILED: {why}\n" + "\n".join(tail[-25:]), flush=True)
        if self.proc.poll() is None:
            self.proc.kill()

    def row(self, what: str) -> dict:
        if self.error is not None:
            return {"variant": self.name, "what": what, "error": self.error, "blocks": self.blocks}
        return {"variant": self.name, "what": what, **self.final, "blocks": self.blocks, "ready": self.ready}


def worker_command(name: str, args: argparse.Namespace, total_steps: int, checkpoint: Path | None) -> list[str]:
    cmd = [sys.executable, __file__, "worker", "--variant", name, "--tokens", str(args.tokens),
           "--total-steps", str(total_steps), "--val-samples", str(args.val_samples)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.arch_json:
        cmd += ["--arch-json", args.arch_json]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    if args.trace_steps:
        cmd += ["--trace-steps", str(args.trace_steps), "--trace-from", str(args.trace_from)]
    if args.gpu_memory_gib:
        cmd += ["--gpu-memory-gib", str(args.gpu_memory_gib)]
    return cmd


def start_workers(names: list[str], args: argparse.Namespace, out: Path, total_steps: int) -> dict[str, WorkerProcess]:
    """Start every worker; Unsloth rows start once their random checkpoint is on disk."""
    known = variants()
    workers: dict[str, WorkerProcess] = {}
    unsloth = [n for n in names if known[n].engine == "unsloth"]
    maker = None
    checkpoint = Path(args.work) / "random-bf16-checkpoint"
    if unsloth:
        make = [sys.executable, __file__, "make-checkpoint", "--path", str(checkpoint)]
        if args.layers:
            make += ["--layers", str(args.layers)]
        maker = subprocess.Popen(make, stdout=open(out / "make_checkpoint.log", "w"), stderr=subprocess.STDOUT)
    for name in names:
        if known[name].engine != "unsloth":
            workers[name] = WorkerProcess(name, worker_command(name, args, total_steps, None), out / f"worker_{_slug(name)}.log")
    if maker is not None:
        code = maker.wait()
        for name in unsloth:
            workers[name] = WorkerProcess(name, worker_command(name, args, total_steps, checkpoint),
                                          out / f"worker_{_slug(name)}.log")
            if code != 0:
                workers[name].fail(f"make-checkpoint exited with {code} (see make_checkpoint.log)")
    return {name: workers[name] for name in names}


def _slug(name: str) -> str:
    return name.replace("+", "plus_")


def drive(workers: dict[str, WorkerProcess], args: argparse.Namespace, save: Callable[[], None]) -> None:
    """Ready, warm-up (all workers at once), then `repeats` rounds of one block per worker (order reversed
    every other round)."""
    for worker in workers.values():
        worker.ready = worker.receive(args.ready_timeout) or {}
    live = [w for w in workers.values() if w.error is None]
    print("ready: " + ", ".join(f"{w.name} ({w.ready.get('load_s')}s)" for w in live), flush=True)
    if args.warmup:
        # All at once: nothing is timed here, and compiling variants then compile side by side.
        started = time.perf_counter()
        for worker in live:
            worker.send({"cmd": "block", "untimed": args.warmup, "timed": 0})
        for worker in live:
            worker.receive(args.block_timeout)
        print(f"warm-up: {time.perf_counter() - started:.0f}s", flush=True)
    for round_index in range(args.repeats):
        for worker in live if round_index % 2 == 0 else live[::-1]:
            worker.send({"cmd": "block", "untimed": args.untimed, "timed": args.steps})
            block = worker.receive(args.block_timeout)
            if block is not None:
                worker.blocks.append({**block, "round": round_index})
                print(f"[round {round_index}] {worker.name}: {block['tokens_per_s']:,.0f} tok/s", flush=True)
        save()
    for worker in live:
        worker.send({"cmd": "finish"})
        worker.final = worker.receive(args.block_timeout + 300) or {}
        if worker.proc.poll() is None:
            try:
                worker.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.proc.kill()


def expand_names(spec: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        names += list(VARIANT_SETS[part]) if part in VARIANT_SETS else ([part] if part else [])
    return list(dict.fromkeys(names))


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    known = variants()
    names = expand_names(args.variants)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(known)}; sets: {', '.join(VARIANT_SETS)}", file=sys.stderr)
        return 2
    env = environment()
    peak = matmul_peak_tflops() if torch.cuda.is_available() else None
    env["bf16_matmul_peak_tflops"] = peak
    env["command"] = " ".join(sys.argv)
    data_info = length_stats(np.load(args.tokens)["lengths"])
    print(json.dumps({"environment": env, "data": data_info}, indent=1), flush=True)
    total_steps = args.warmup + args.repeats * (args.untimed + args.steps)
    workers = start_workers(names, args, out, total_steps)

    def rows() -> list[dict]:
        return summarize([{"profile": dataclasses.asdict(known[n].profile), **w.row(known[n].what)}
                          for n, w in workers.items()], peak, baseline=args.baseline)

    def save() -> None:
        (out / "train_throughput.json").write_text(json.dumps(
            {"environment": env, "data": data_info, "results": rows()}, indent=1))

    drive(workers, args, save)
    save()
    final = rows()
    text = table(final) + ("\n\n" + quality_table(final) if args.quality else "")
    (out / "train_throughput.md").write_text(text + "\n")
    print()
    print(text)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    # The protocol owns the real stdout; everything libraries print goes to the log (stderr). This
    # comes first: Unsloth prints at import, and a half line in the protocol pipe would hide the
    # next message (seen on the H200: a second Unsloth worker's "ready" never arrived).
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    variant = variants()[args.variant]
    if variant.engine == "unsloth":
        import unsloth  # noqa: F401  (before transformers and peft, as Unsloth asks)

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    def plan() -> tuple[int, int] | None:
        line = sys.stdin.readline()
        message = json.loads(line) if line.strip() else {"cmd": "finish"}
        return (int(message["untimed"]), int(message["timed"])) if message["cmd"] == "block" else None

    import torch

    samples = load_samples(Path(args.tokens))
    held_out = samples[-args.val_samples:] if args.val_samples else []
    train = samples[: len(samples) - len(held_out)]
    arch = dict(DEEPSEEK_7B, **(json.loads(args.arch_json) if args.arch_json else {}))
    if args.layers:
        arch["num_hidden_layers"] = args.layers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.gpu_memory_gib and device == "cuda":  # what a GPU of that size would leave this worker
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gib * 2**30 / total), 0)
    result, model = train_session(variant, train, arch=arch, device=device, plan=plan, total_steps=args.total_steps,
                                  on_block=lambda block: send({"event": "block", **block}),
                                  ready=lambda info: send({"event": "ready", **info}), checkpoint=args.checkpoint,
                                  trace_steps=args.trace_steps, trace_from=args.trace_from)
    if held_out:
        result["val_loss"] = val_loss(model, held_out, variant.profile, device)
    send({"event": "finished", **result})
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    arch = dict(DEEPSEEK_7B, **({"num_hidden_layers": args.layers} if args.layers else {}))
    print(json.dumps(save_random_checkpoint(arch, Path(args.path))), flush=True)
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
    r = sub.add_parser("run", help="run the variants side by side in alternating blocks and print the table")
    r.add_argument("--tokens", default=".bench/train_tokens.npz")
    r.add_argument("--variants", default="small-batch",
                   help="comma-separated names or sets (" + ", ".join(VARIANT_SETS) + "); known: " + ", ".join(variants()))
    r.add_argument("--baseline", default="baseline",
                   help="the row the 'x baseline' column divides by (a lever's ratio to the profile without it)")
    r.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first round")
    r.add_argument("--repeats", type=int, default=3, help="rounds; each variant trains one timed block per round")
    r.add_argument("--steps", type=int, default=8, help="timed optimizer steps per block")
    r.add_argument("--untimed", type=int, default=1, help="untimed steps at the start of every block")
    r.add_argument("--layers", type=int, default=0, help="decoder layers (0 = the architecture's 30)")
    r.add_argument("--arch-json", default="", help=argparse.SUPPRESS)  # tests: a tiny architecture
    r.add_argument("--val-samples", type=int, default=0, help="hold out the last N samples and score them at the end")
    r.add_argument("--quality", action="store_true", help="also print the loss table (use with --val-samples)")
    r.add_argument("--ready-timeout", type=int, default=480)
    r.add_argument("--block-timeout", type=int, default=240)
    r.add_argument("--trace-steps", type=int, default=0,
                   help="profile this many steps in every worker (tables in the worker logs)")
    r.add_argument("--trace-from", type=int, default=1, help="the first profiled optimizer step")
    r.add_argument("--gpu-memory-gib", type=float, default=0,
                   help="cap each worker's GPU memory (several memory-sized profiles in one run)")
    r.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp") + "/train_throughput")
    r.add_argument("--out", default="runs/train_throughput")
    r.set_defaults(func=cmd_run)
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("--variant", required=True)
    w.add_argument("--tokens", required=True)
    w.add_argument("--total-steps", type=int, required=True)
    w.add_argument("--val-samples", type=int, default=0)
    w.add_argument("--layers", type=int, default=0)
    w.add_argument("--arch-json", default="")
    w.add_argument("--checkpoint", default=None)
    w.add_argument("--trace-steps", type=int, default=0, help="profile this many steps (tables on stderr)")
    w.add_argument("--trace-from", type=int, default=1, help="the first profiled optimizer step")
    w.add_argument("--gpu-memory-gib", type=float, default=0)
    w.set_defaults(func=cmd_worker)
    m = sub.add_parser("make-checkpoint", help="save a random bf16 checkpoint of the architecture (Unsloth rows)")
    m.add_argument("--path", required=True)
    m.add_argument("--layers", type=int, default=0)
    m.set_defaults(func=cmd_make_checkpoint)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
