"""Choice scoring speed: benchmark items per second, batched vs one at a time (issue 15, item 6).

Candidate: `finqlora.evaluate.choice.score_choices` (the shared prompt prefix run once, each
batch's own prompt tokens in one pass, all options of a batch in one more pass).
Baseline, measured in the same run on the first `--baseline-items` of the same items: one
full forward pass per (item, option) over prompt + option, no cache and no batching -- the
straightforward way to get the same log-likelihoods. Both must pick the same options (the
script checks it), so the ratio compares equal work.

    nice -n 5 .venv/bin/python benchmarks/choice_scoring.py \\
        --benchmark ../shared/data/benchmarks/finfe/train_list.json --items 100 --baseline-items 10

Prints items/s of each (wall clock and per CPU-second), the ratio, and (with --json) writes
them to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def naive_scores(model, tokenizer, questions) -> list[int]:
    """One forward pass per option over prompt + option; mean log-prob per option token."""
    import torch

    from finqlora.core.chat_format import render_prompt
    from finqlora.evaluate.choice import normalised_score, pick

    choices = []
    for messages, options in questions:
        prompt = tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False)
        scores = []
        for option in options:
            ids = tokenizer.encode(option, add_special_tokens=False)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0].float(), dim=-1)
            scores.append(normalised_score([float(logprobs[len(prompt) - 1 + t, token]) for t, token in enumerate(ids)], option))
        choices.append(pick(scores))
    return choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--benchmark", type=Path, default=Path("../shared/data/benchmarks/finfe/train_list.json"))
    parser.add_argument("--format", default="finfe")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--baseline-items", type=int, default=10, help="the slow baseline runs on this many of the same items")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.benchmark.exists():
        raise SystemExit(f"benchmark not found: {args.benchmark} (the third-party data lives in ../shared/data)")

    import torch

    from finqlora.evaluate.benchmarks import load_benchmark
    from finqlora.evaluate.choice import score_choices
    from finqlora.evaluate.evaluation import build_items
    from finqlora.models.loading import load_model

    benchmark = load_benchmark(args.benchmark, args.format, limit=args.items, seed=0)
    items = build_items([], [benchmark])
    questions = [(item["messages"], item["choice"]["options"]) for item in items]
    loaded = load_model(args.model, device="cpu", progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    score_choices(model, tokenizer, questions[:2], batch_size=2)  # warm-up (first-call allocations)

    started, cpu_started = time.perf_counter(), time.process_time()
    results = score_choices(model, tokenizer, questions, batch_size=args.batch_size)
    batched_s, batched_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    started, cpu_started = time.perf_counter(), time.process_time()
    baseline = naive_scores(model, tokenizer, questions[: args.baseline_items])
    baseline_s, baseline_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    agree = sum(a == r.choice for a, r in zip(baseline, results))

    correct = sum(item["choice"]["classes"][r.choice] == item["label"]["class"] for item, r in zip(items, results))
    report = {
        "model": args.model, "benchmark": str(args.benchmark), "items": len(items), "batch_size": args.batch_size,
        "cpu_threads": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
        "batched_items_per_s": round(len(items) / batched_s, 3),
        "baseline_items": len(baseline), "baseline_items_per_s": round(len(baseline) / baseline_s, 3),
        "speedup": round((len(items) / batched_s) / (len(baseline) / baseline_s), 2),
        # CPU seconds do not grow when other processes take the cores, wall seconds do: on a
        # shared machine, items per CPU-second x cores estimates the rate on idle cores.
        "batched_items_per_cpu_s": round(len(items) / batched_cpu_s, 3),
        "baseline_items_per_cpu_s": round(len(baseline) / baseline_cpu_s, 3),
        "estimated_idle_items_per_s": round(len(items) / batched_cpu_s * torch.get_num_threads(), 3),
        "torch_threads": torch.get_num_threads(),
        "baseline_agrees": f"{agree}/{len(baseline)}", "accuracy": round(correct / len(items), 3),
    }
    for key, value in report.items():
        print(f"{key:>22}: {value}")
    if agree != len(baseline):
        raise SystemExit("the batched scores picked other options than the one-at-a-time baseline")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
