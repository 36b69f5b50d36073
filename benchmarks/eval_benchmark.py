"""Evaluation speed: batched generation (what `finqlora eval` does) vs one prompt at a time.

    .venv/bin/python benchmarks/eval_benchmark.py [--model builtin:qwen2.5-coder-0.5b-instruct]
        [--data DATASET.jsonl] [--prompts 16] [--batch-size 8] [--max-new-tokens 64] [--dtype auto] [--json out.json]

Both runs answer the same prompts (the test split of --data, else the built-in general-text
passages as questions) greedily with the same settings through `finqlora.models.generation.generate`;
the baseline is batch_size=1 measured in the same process right after. The script prints the
wall time of each, new tokens per second, and the speed-up ratio, and checks that greedy
answers agree between the two (left padding must not change a greedy answer, up to rare
floating-point ties, which are counted and printed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _prompts(data: str | None, count: int) -> list[list[dict[str, str]]]:
    from finqlora.core.chat_format import record_to_chat
    from finqlora.evaluate.evaluation import general_texts, load_test_records

    if data:
        records = load_test_records(Path(data), max_samples=count)
        return [record_to_chat(r).messages for r in records][:count]
    return [[{"role": "user", "content": f"用一句话概括：{row['text']}"}] for row in general_texts()[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data", default=None)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="bfloat16 is several times faster on CPUs with AMX")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from finqlora.models.generation import GenerationSettings, generate
    from finqlora.models.loading import load_model

    loaded = load_model(args.model, dtype=args.dtype, progress=False)
    prompts = _prompts(args.data, args.prompts)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    generate(loaded.model, loaded.tokenizer, prompts[:1], settings, batch_size=1, progress=False)  # warm-up

    results = {}
    answers = {}
    for name, batch_size in (("batched", args.batch_size), ("one at a time (baseline)", 1)):
        started = time.perf_counter()
        out = generate(loaded.model, loaded.tokenizer, prompts, settings, batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - started
        tokens = sum(g.new_tokens for g in out)
        answers[name] = [g.text for g in out]
        results[name] = {"batch_size": batch_size, "seconds": round(seconds, 2), "new_tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)}
        print(f"{name:>26}: batch {batch_size}, {seconds:7.1f} s, {tokens} new tokens, {tokens / seconds:6.1f} tokens/s")
    speedup = results["one at a time (baseline)"]["seconds"] / results["batched"]["seconds"]
    same = sum(a == b for a, b in zip(answers["batched"], answers["one at a time (baseline)"]))
    print(f"speed-up of batched generation: {speedup:.2f}x; identical greedy answers: {same}/{len(prompts)}")
    summary = {
        "model": args.model, "dtype": str(loaded.dtype), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "results": results,
        "speedup": round(speedup, 2), "identical_answers": same, "machine": platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
