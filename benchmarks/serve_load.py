"""Load benchmark of `finqlora serve`: batched vs one-at-a-time serving, in the same run.

Loads the model once, then serves it twice on loopback -- with dynamic batching
(--max-batch-size, default 16) and with batch size 1 (one request at a time, the baseline)
-- and drives each with 1, 4 and 16 concurrent clients using the official openai SDK. Every
client sends --requests-per-client chat requests (greedy, max_tokens --max-tokens) drawn from
a fixed list of finance questions. Reported per setting: completion tokens/s (all completion
tokens / wall time), requests/s, p50 and p95 request latency; and the ratio of batched to
one-at-a-time throughput at 16 clients.

Bounded: a fixed number of requests per level, and --time-budget seconds overall (a level
that would start after the budget is spent is skipped and reported as such). Loopback only.

    .venv/bin/python benchmarks/serve_load.py --model builtin:smollm2-135m-instruct
    .venv/bin/python benchmarks/serve_load.py --requests-per-client 1 --max-tokens 16 --threads 1  # busy shared CPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import statistics
import sys
import time
from typing import Any

import openai
import torch

from finqlora.serve.batching import Batcher, BatchLimits
from finqlora.models.loading import load_model
from finqlora.serve.server import ServingEngine, create_app, start_in_thread

QUESTIONS = [
    "美联储宣布加息25个基点，对黄金价格有何影响？",
    "What usually happens to gold when the US dollar strengthens sharply?",
    "央行下调存款准备金率0.5个百分点，对A股银行板块意味着什么？",
    "Explain in two sentences how higher oil prices affect inflation expectations.",
    "非农就业数据大幅超预期，美元和美债收益率通常如何反应？",
    "A company's gross margin fell from 40% to 35%. What questions should an analyst ask?",
    "人民币汇率快速贬值时，出口企业和进口企业分别受到什么影响？",
    "Why do bond prices fall when interest rates rise?",
]
API_KEY = "benchmark-key-0123456789"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run_level(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict[str, Any]:
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=600)

    def one_client(client_index: int) -> list[tuple[float, int]]:
        results = []
        for i in range(requests_per_client):
            question = QUESTIONS[(client_index * requests_per_client + i) % len(QUESTIONS)]
            started = time.perf_counter()
            response = sdk.chat.completions.create(
                model="base", messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
            )
            results.append((time.perf_counter() - started, response.usage.completion_tokens))
        return results

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        per_client = list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - started
    latencies = [latency for results in per_client for latency, _ in results]
    tokens = sum(count for results in per_client for _, count in results)
    return {
        "clients": clients,
        "requests": len(latencies),
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(statistics.median(latencies), 2),
        "p95_s": round(percentile(latencies, 0.95), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--time-budget", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is faster on a CPU shared with other jobs)")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    run_started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"loading {args.model} ...", file=sys.stderr)
    loaded = load_model(args.model, device="auto", progress=False)
    results: dict[str, list[dict[str, Any]]] = {}
    for mode, batch_size in (("batched", args.max_batch_size), ("one_at_a_time", 1)):
        limits = BatchLimits(max_batch_size=batch_size, max_queue=max(levels) * 2, max_new_tokens=args.max_tokens, request_timeout_s=args.time_budget)
        engine = ServingEngine(
            batcher=Batcher(loaded.model, loaded.tokenizer, limits),
            tokenizer=loaded.tokenizer,
            base_name="base",
            adapters={},
            prompt_tokenizers={None: loaded.tokenizer},
        )
        server = start_in_thread(create_app(engine, api_key=API_KEY))
        try:
            run_level(server.url, 1, 1, 4)  # warm-up (first-call allocations), not measured
            results[mode] = []
            for clients in levels:
                if time.perf_counter() - run_started > args.time_budget:
                    results[mode].append({"clients": clients, "skipped": "time budget spent"})
                    continue
                level = run_level(server.url, clients, args.requests_per_client, args.max_tokens)
                level["largest_batch"] = engine.batcher.stats.largest_batch
                results[mode].append(level)
                print(f"{mode:>14} clients={clients:>2}: {level['tokens_per_s']:7.1f} tok/s  p50 {level['p50_s']:.2f}s  p95 {level['p95_s']:.2f}s", file=sys.stderr)
        finally:
            server.stop()

    print(f"\nServing load: {args.model}, max_tokens={args.max_tokens}, {args.requests_per_client} requests per client, greedy")
    print(f"machine: {platform.machine()} {torch.get_num_threads()} torch threads, device {loaded.device}; torch {torch.__version__}")
    print("| mode | clients | requests | completion tokens | tokens/s | requests/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, levels_done in results.items():
        for level in levels_done:
            if "skipped" in level:
                print(f"| {mode} | {level['clients']} | skipped ({level['skipped']}) | | | | | |")
                continue
            print(f"| {mode} | {level['clients']} | {level['requests']} | {level['completion_tokens']} | {level['tokens_per_s']} | "
                  f"{level['requests_per_s']} | {level['p50_s']} | {level['p95_s']} |")
    by_clients = {mode: {lv["clients"]: lv for lv in lvs if "skipped" not in lv} for mode, lvs in results.items()}
    top = max(levels)
    if top in by_clients["batched"] and top in by_clients["one_at_a_time"]:
        ratio = by_clients["batched"][top]["tokens_per_s"] / by_clients["one_at_a_time"][top]["tokens_per_s"]
        print(f"\nbatched / one-at-a-time throughput at {top} clients: {ratio:.2f}x")
        results["ratio_at_max_clients"] = round(ratio, 2)  # type: ignore[assignment]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
