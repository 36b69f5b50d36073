#!/usr/bin/env python3
"""Inference benchmark: load time (first conversion and cached), tokens/s, peak memory.

    .venv/bin/python benchmarks/inference_benchmark.py                      # built-in Qwen, CPU
    .venv/bin/python benchmarks/inference_benchmark.py --device cuda        # 4-bit NF4 on a GPU
    .venv/bin/python benchmarks/inference_benchmark.py --skip-conversion    # cached load only

The baseline is measured in the same run: 8 prompts answered one at a time (batch size 1)
against the same 8 prompts in one left-padded batch; the ratio is batched / sequential
tokens per second (only real answer tokens are counted, not padding after an early stop).
The first conversion runs in a child process with a fresh FINQLORA_HOME, so its time and
peak memory are those of a user's very first run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "美联储宣布加息25个基点"
# Eight short finance headlines written for this benchmark (no third-party text).
BATCH_PROMPTS = [
    PROMPT,
    "央行宣布下调存款准备金率0.5个百分点",
    "某新能源车企第三季度交付量同比增长40%",
    "国际油价单日下跌5%，创三个月新低",
    "财政部发行3000亿元特别国债",
    "某银行不良贷款率较上季度上升0.2个百分点",
    "人民币兑美元汇率升破7.1关口",
    "证监会宣布暂停部分IPO审核",
]

_CONVERT = """
import json, resource, sys, time
started = time.perf_counter()
from finqlora.models.builtin import prepare_builtin
prepare_builtin(sys.argv[1], progress=False, log=lambda _: None)
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure_first_conversion(spec: str) -> dict:
    from finqlora.models.builtin import get_builtin

    with tempfile.TemporaryDirectory(prefix="finqlora-bench-home-") as home:
        env = {**os.environ, "FINQLORA_HOME": home}
        out = subprocess.run(
            [sys.executable, "-c", _CONVERT, get_builtin(spec).name], env=env, capture_output=True, text=True, check=True
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_generation(loaded, prompts: list[str], batch_size: int, max_new_tokens: int) -> dict:
    import torch

    from finqlora.models.generation import GenerationSettings, build_messages, generate

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    chats = [build_messages(p) for p in prompts]
    if loaded.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = generate(loaded.model, loaded.tokenizer, chats, settings, batch_size=batch_size, progress=False)
    if loaded.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(r.new_tokens for r in results)
    return {"seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds, "answers": [r.text for r in results]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-conversion", action="store_true", help="do not measure the first conversion")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    import torch
    import transformers

    from finqlora.models.builtin import is_builtin_spec
    from finqlora.models.loading import load_model

    report: dict = {
        "model": args.model,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if is_builtin_spec(args.model) and not args.skip_conversion:
        print("measuring the first conversion (fresh cache, child process) ...", file=sys.stderr)
        report["first_conversion"] = measure_first_conversion(args.model)

    load_model(args.model, device=args.device, progress=False)  # makes sure the cache exists
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, progress=False)
    report["cached_load_seconds"] = time.perf_counter() - started
    report["device"] = loaded.device
    report["dtype"] = str(loaded.dtype).removeprefix("torch.")
    report["load_in_4bit"] = loaded.load_in_4bit
    if loaded.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        report["gpu_name"] = torch.cuda.get_device_name()

    run_generation(loaded, [PROMPT], 1, 8)  # warm-up (first-call allocations)
    single = run_generation(loaded, [PROMPT], 1, args.max_new_tokens)
    sequential = run_generation(loaded, BATCH_PROMPTS, 1, args.max_new_tokens)
    batched = run_generation(loaded, BATCH_PROMPTS, args.batch_size, args.max_new_tokens)
    report["single_prompt"] = {k: v for k, v in single.items() if k != "answers"}
    report["sequential_8"] = {k: v for k, v in sequential.items() if k != "answers"}
    report[f"batched_{args.batch_size}"] = {k: v for k, v in batched.items() if k != "answers"}
    report["batched_over_sequential"] = batched["tokens_per_s"] / sequential["tokens_per_s"]
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if loaded.device.startswith("cuda"):
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    report["answer"] = {"prompt": PROMPT, "text": single["answers"][0]}

    print(json.dumps(report, ensure_ascii=False, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
