"""CPU training: finqlora's `cpu` speed profile vs the plain Trainer, speed and quality.

    python benchmarks/cpu_train_throughput.py --dataset data/qlora/instructions.jsonl

1. Throughput, with the demo config's settings read from --config (configs/demo-cpu.yaml: the
   built-in Qwen2.5-Coder-0.5B, LoRA r=8 on all linear layers of the last 8 blocks, batch 2,
   max length 512, AdamW): effective tokens/s (tokens trained, padding excluded) of the plain
   transformers Trainer (fp32, padded batches, full logits) and of the `cpu` profile (packed
   micro-batches of batch x max length tokens, answer-only logits, bf16 base on CPUs with
   AMX/AVX512-BF16), measured in the same run on the same data, with the same LoRA layers.
2. Quality (a small real model, the built-in SmolLM2-135M, to keep it affordable on 2 cores):
   100 optimizer steps of each path on the same batches in the same order (the optimized paths
   pack exactly the baseline's 4 samples of each step): the plain Trainer, the `cpu` profile
   in fp32 (its exact levers only: packing, answer-only logits) and the `cpu` profile as it
   runs here (bf16 where the CPU has it). Each adapter is then put on the same fp32 base and
   scored on the same validation samples; they must agree within 2%. The bf16 adapter's loss
   on its own bf16 base is reported too.

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

from finqlora.core.profiles import SpeedProfile  # noqa: E402
from finqlora.train.collate import make_data_collator  # noqa: E402
from finqlora.train.patches import apply_model_speedups  # noqa: E402
from finqlora.train.profiles import get_profile  # noqa: E402

PLAIN = dataclasses.replace(get_profile("default"), load_in_4bit=False, gradient_checkpointing=False,
                            compute_dtype="fp32", optimizer="adamw_torch")


def optimized_profile(compute_dtype: str | None = None) -> SpeedProfile:
    profile = dataclasses.replace(get_profile("cpu"), optimizer="adamw_torch")
    return dataclasses.replace(profile, compute_dtype=compute_dtype) if compute_dtype else profile


def read_split(dataset: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in records if r.get("split", "train") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not val:  # a dataset without splits: hold out every 10th record
        val, train = records[::10], [r for i, r in enumerate(records) if i % 10]
    return train, val


def encode(tokenizer: Any, records: list[dict], max_length: int) -> list[dict[str, list[int]]]:
    from finqlora.core.chat_format import encode_for_training

    out = []
    for record in records:
        encoded = encode_for_training(tokenizer, record, max_length)
        out.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    return out


def load_base(spec: str, profile: SpeedProfile) -> Any:
    from finqlora.models.loading import load_model

    dtype = {"bf16": "bfloat16", "fp32": "float32"}[profile.compute_dtype]
    return load_model(spec, device="cpu", dtype=dtype, load_in_4bit=False, for_training=True, progress=False).model


def arch_of(model: Any) -> dict:
    config = model.config
    return dict(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                num_key_value_heads=config.num_key_value_heads, vocab_size=config.vocab_size)


def training_paths() -> dict[str, tuple[str, SpeedProfile]]:
    """The compared training paths by short name; `cpu` only where it differs from `cpu-fp32`."""
    paths = {"plain": ("plain Trainer (fp32, padded)", PLAIN),
             "cpu-fp32": ("--profile cpu, fp32", optimized_profile("fp32"))}
    if optimized_profile().compute_dtype != "fp32":
        paths["cpu"] = (f"--profile cpu ({optimized_profile().compute_dtype})", optimized_profile())
    return paths


def throughput(spec: str, samples: list[dict], max_length: int, warmup: int, steps: int, *, batch_size: int,
               lora_layers: int | None) -> list[dict]:
    results = []
    arch = None
    for name, profile in training_paths().values():
        def build(p: SpeedProfile, spec: str = spec) -> Any:
            nonlocal arch
            model = load_base(spec, p)
            arch = arch_of(model)
            return model

        variant = tt.Variant(name, name, profile, batch_size=batch_size)
        started = time.perf_counter()
        result = tt.run_variant(variant, samples, arch={}, device="cpu", warmup=warmup, steps=steps, build=build,
                                max_length=max_length, flops_arch=lambda: arch, lora_layers=lora_layers)
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


def quality(spec: str, train: list[dict], val: list[dict], steps: int, seed: int,
            names: list[str] | None = None) -> list[dict]:
    """Each path on the same 4-sample batches in the same order, then the same validation loss."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
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
    known = training_paths()
    paths = [known[name] for name in (names or known)]
    scorer = None  # the fp32 base with a LoRA wrapper: every adapter is scored on it
    results = []
    for name, profile in paths:
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
        if scorer is None:
            scorer = tt.attach_lora(load_base(spec, PLAIN), PLAIN)
        set_peft_model_state_dict(scorer, {k: v.float() for k, v in get_peft_model_state_dict(model).items()})
        loss = validation_loss(scorer, val)
        own = validation_loss(model, val) if profile.compute_dtype != "fp32" else loss
        print(f"[quality {name}] val loss {loss:.4f} on the fp32 base ({own:.4f} on its own) after {steps} steps "
              f"({seconds:.0f}s)", flush=True)
        results.append(dict(path=name, val_loss=loss, val_loss_own_precision=own, train_seconds=seconds, steps=steps,
                            compute_dtype=profile.compute_dtype))
        del model, trainer
    base = results[0]["val_loss"]
    for r in results:
        r["relative_difference"] = abs(r["val_loss"] - base) / base
    return results


def table(speed: list[dict], check: list[dict], info: dict) -> str:
    lines: list[str] = []
    if speed:
        lines += [f"Throughput ({info['throughput_model']}, batch {info['batch_size']}, max length {info['max_length']}, "
                  f"LoRA on the last {info['lora_layers'] or 'all'} blocks, "
                  f"{info['train_samples']} train samples, mean {info['mean_tokens']:.0f} tokens):", "",
                  "| path | eff. tokens/s | x plain | samples/step |", "| --- | ---: | ---: | ---: |"]
    for r in speed:
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['samples_per_step']:.1f} |")
    if check:
        lines += ["", f"Quality ({info['quality_model']}, {check[0]['steps']} steps, same batches, max length "
                      f"{info['quality_max_length']}, {info['val_samples']} val samples):", "",
                  "| path | val loss (fp32 base) | difference | val loss (own precision) | train time |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in check:
            lines.append(f"| {r['path']} | {r['val_loss']:.4f} | {r['relative_difference']:.2%} | "
                         f"{r['val_loss_own_precision']:.4f} | {r['train_seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="instruction JSONL with train/val splits (finqlora build)")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo-cpu.yaml"),
                        help="run config whose model, batch size, max length and LoRA layers the throughput uses")
    parser.add_argument("--quality-model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--quality-max-length", type=int, default=256,
                        help="max length of the quality check (shorter than training's keeps 3 x 100 steps "
                        "affordable on 2 cores)")
    parser.add_argument("--train-samples", type=int, default=300)
    parser.add_argument("--val-samples", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per path (throughput); 0 skips it")
    parser.add_argument("--quality-steps", type=int, default=100, help="0 skips the quality check")
    parser.add_argument("--quality-paths", default="",
                        help="comma-separated subset of plain,cpu-fp32,cpu for the quality check (default: all; "
                        "differences are relative to the first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/cpu_train_throughput")
    args = parser.parse_args(argv)

    from finqlora.core.config import load_config
    from finqlora.models.loading import load_tokenizer

    demo = load_config(args.config).train
    train_records, val_records = read_split(Path(args.dataset))
    train_records, val_records = train_records[: args.train_samples], val_records[: args.val_samples]
    samples = encode(load_tokenizer(demo.model), train_records, demo.max_length) if args.steps else []
    info = dict(throughput_model=demo.model, quality_model=args.quality_model, max_length=demo.max_length,
                batch_size=demo.batch_size, lora_layers=demo.lora_layers, config=args.config,
                train_samples=len(samples), val_samples=len(val_records), dataset=args.dataset,
                mean_tokens=sum(len(s["input_ids"]) for s in samples) / max(len(samples), 1),
                quality_max_length=args.quality_max_length,
                cpu_profile=dataclasses.asdict(optimized_profile()), environment=tt.environment())
    speed = (throughput(demo.model, samples, demo.max_length, args.warmup, args.steps, batch_size=demo.batch_size,
                        lora_layers=demo.lora_layers) if args.steps else [])
    check: list[dict] = []
    if args.quality_steps:
        tokenizer = load_tokenizer(args.quality_model)
        check = quality(args.quality_model, encode(tokenizer, train_records, args.quality_max_length),
                        encode(tokenizer, val_records, args.quality_max_length), args.quality_steps, args.seed,
                        [n.strip() for n in args.quality_paths.split(",") if n.strip()] or None)
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
