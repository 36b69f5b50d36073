"""CPU training: finqlora's `cpu` speed profile vs the plain Trainer, speed and quality.

    python benchmarks/cpu_train_throughput.py --dataset data/qlora/instructions.jsonl

1. Throughput (the demo config's settings: built-in Qwen2.5-Coder-0.5B, LoRA r=8 on all linear
   layers, batch 4, max length 384, AdamW): effective tokens/s (tokens trained, padding
   excluded) of the plain transformers Trainer (fp32, padded batches, full logits) and of the
   `cpu` profile (packed rows, answer-only logits, bf16 autocast on CPUs with AMX/AVX512-BF16),
   measured in the same run on the same data.
2. Quality (a small real model, the built-in SmolLM2-135M, to keep it affordable on 2 cores):
   100 optimizer steps of each path on the same batches in the same order (the optimized path
   packs exactly the baseline's 4 samples of each step), then the validation loss of both
   adapters, computed the same way; they must agree within 2%.

Results go to --out (JSON + a Markdown table) and are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import train_throughput as tt  # noqa: E402

from finqlora.speedups import SpeedProfile, apply_model_speedups, get_profile, make_data_collator  # noqa: E402

PLAIN = dataclasses.replace(get_profile("default"), load_in_4bit=False, gradient_checkpointing=False,
                            compute_dtype="fp32", optimizer="adamw_torch")


def optimized_profile() -> SpeedProfile:
    return dataclasses.replace(get_profile("cpu"), optimizer="adamw_torch")


def read_split(dataset: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in records if r.get("split", "train") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not val:  # a dataset without splits: hold out every 10th record
        val, train = records[::10], [r for i, r in enumerate(records) if i % 10]
    return train, val


def encode(tokenizer: Any, records: list[dict], max_length: int) -> list[dict[str, list[int]]]:
    from finqlora.chat_format import encode_for_training

    out = []
    for record in records:
        encoded = encode_for_training(tokenizer, record, max_length)
        out.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    return out


def load_base(spec: str, profile: SpeedProfile) -> Any:
    from finqlora.models import load_model

    dtype = {"bf16": "bfloat16", "fp32": "float32"}[profile.compute_dtype]
    return load_model(spec, device="cpu", dtype=dtype, load_in_4bit=False, for_training=True, progress=False).model


def arch_of(model: Any) -> dict:
    config = model.config
    return dict(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                num_key_value_heads=config.num_key_value_heads, vocab_size=config.vocab_size)


def throughput(spec: str, samples: list[dict], max_length: int, warmup: int, steps: int) -> list[dict]:
    results = []
    arch = None
    for name, profile in (("plain Trainer (fp32, padded)", PLAIN), ("--profile cpu", optimized_profile())):
        def build(p: SpeedProfile, spec: str = spec) -> Any:
            nonlocal arch
            model = load_base(spec, p)
            arch = arch_of(model)
            return model

        variant = tt.Variant(name, name, profile)
        started = time.perf_counter()
        result = tt.run_variant(variant, samples, arch={}, device="cpu", warmup=warmup, steps=steps, build=build,
                                max_length=max_length, flops_arch=lambda: arch)
        print(f"[{name}] {result['tokens_per_s']:.1f} tok/s ({time.perf_counter() - started:.0f}s)", flush=True)
        results.append(result)
    base = results[0]["tokens_per_s"]
    for r in results:
        r["speedup"] = r["tokens_per_s"] / base
    return results


def validation_loss(model: Any, samples: list[dict]) -> float:
    """Mean answer-token cross-entropy over the validation samples, one sample at a time (no padding)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample["input_ids"]])
            labels = torch.tensor([sample["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = labels[0, 1:]
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def quality(spec: str, train: list[dict], val: list[dict], steps: int, seed: int) -> list[dict]:
    """Both paths, the same 4-sample batches in the same order, then the same validation loss."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import PrinterCallback, Trainer, TrainingArguments

    class InOrder(Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(self.train_dataset)

    order: list[int] = []
    rng = random.Random(seed)
    while len(order) < steps * tt.BATCH_SIZE:
        chunk = list(range(len(train)))
        rng.shuffle(chunk)
        order += chunk
    batches = [order[i * tt.BATCH_SIZE : (i + 1) * tt.BATCH_SIZE] for i in range(steps)]
    results = []
    for name, profile in (("plain Trainer (fp32, padded)", PLAIN), ("--profile cpu", optimized_profile())):
        torch.manual_seed(seed)
        model = tt.attach_lora(load_base(spec, profile), profile)
        model = apply_model_speedups(model, profile)
        if profile.packing:
            items, per_device = [{"pack": [train[i] for i in b]} for b in batches], 1
        else:
            items, per_device = [train[i] for b in batches for i in b], tt.BATCH_SIZE
        args = TrainingArguments(
            output_dir="/tmp/cpu-quality", per_device_train_batch_size=per_device, max_steps=steps,
            learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=3, optim="adamw_torch",
            bf16=profile.compute_dtype == "bf16", logging_steps=10, save_strategy="no", report_to=[], seed=seed,
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, use_cpu=True,
        )
        trainer = InOrder(model=model, args=args, train_dataset=items,
                          data_collator=make_data_collator(tt.padding_tokenizer(), profile))
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        loss = validation_loss(model, val)
        print(f"[quality {name}] val loss {loss:.4f} after {steps} steps ({seconds:.0f}s)", flush=True)
        results.append(dict(path=name, val_loss=loss, train_seconds=seconds, steps=steps))
    base = results[0]["val_loss"]
    for r in results:
        r["relative_difference"] = abs(r["val_loss"] - base) / base
    return results


def table(speed: list[dict], check: list[dict], info: dict) -> str:
    lines: list[str] = []
    if speed:
        lines += [f"Throughput ({info['throughput_model']}, batch 4, max length {info['max_length']}, "
                  f"{info['train_samples']} train samples, mean {info['mean_tokens']:.0f} tokens):", "",
                  "| path | eff. tokens/s | x plain | samples/step |", "| --- | ---: | ---: | ---: |"]
    for r in speed:
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['samples_per_step']:.1f} |")
    if check:
        lines += ["", f"Quality ({info['quality_model']}, {check[0]['steps']} steps, same batches, max length "
                      f"{info['quality_max_length']}, {info['val_samples']} val samples):", "",
                  "| path | val loss | difference | train time |", "| --- | ---: | ---: | ---: |"]
        for r in check:
            lines.append(f"| {r['path']} | {r['val_loss']:.4f} | {r['relative_difference']:.2%} | {r['train_seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="instruction JSONL with train/val splits (finqlora build)")
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct", help="throughput model")
    parser.add_argument("--quality-model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--max-length", type=int, default=384, help="the demo config's max length")
    parser.add_argument("--quality-max-length", type=int, default=128,
                        help="max length of the quality check (shorter keeps 2 x 100 steps affordable on 2 cores)")
    parser.add_argument("--train-samples", type=int, default=300)
    parser.add_argument("--val-samples", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per path (throughput); 0 skips it")
    parser.add_argument("--quality-steps", type=int, default=100, help="0 skips the quality check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/cpu_train_throughput")
    args = parser.parse_args(argv)

    from finqlora.models import load_tokenizer

    train_records, val_records = read_split(Path(args.dataset))
    train_records, val_records = train_records[: args.train_samples], val_records[: args.val_samples]
    samples = encode(load_tokenizer(args.model), train_records, args.max_length) if args.steps else []
    info = dict(throughput_model=args.model, quality_model=args.quality_model, max_length=args.max_length,
                train_samples=len(samples), val_samples=len(val_records), dataset=args.dataset,
                mean_tokens=sum(len(s["input_ids"]) for s in samples) / max(len(samples), 1),
                quality_max_length=args.quality_max_length,
                cpu_profile=dataclasses.asdict(optimized_profile()), environment=tt.environment())
    speed = throughput(args.model, samples, args.max_length, args.warmup, args.steps) if args.steps else []
    check: list[dict] = []
    if args.quality_steps:
        tokenizer = load_tokenizer(args.quality_model)
        check = quality(args.quality_model, encode(tokenizer, train_records, args.quality_max_length),
                        encode(tokenizer, val_records, args.quality_max_length), args.quality_steps, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_train_throughput.json").write_text(json.dumps(dict(info=info, throughput=speed, quality=check),
                                                              indent=1, ensure_ascii=False))
    text = table(speed, check, info)
    (out / "cpu_train_throughput.md").write_text(text + "\n", encoding="utf-8")
    print()
    print(text)
    ok = all(r["relative_difference"] <= 0.02 for r in check) and all(not math.isnan(r["tokens_per_s"]) for r in speed)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
