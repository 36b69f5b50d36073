"""Peak memory of the evaluation's answer perplexity: one forward over the whole batch vs logits in slices.

`finqlora.evaluate.metrics.token_nll` used to run the model over a whole evaluation batch at
once; with Qwen's 151,936-token vocabulary, 8 rows x ~430 tokens of fp32 logits are ~2 GB, and
the loss needed as much again. It now runs the rows in slices whose logits fit
`NLL_LOGITS_BUDGET_BYTES`. This script measures both in the same run, each in a fresh process
(peak RSS is per process), on the demo's shapes, and checks that the NLLs are the same:

    .venv/bin/python benchmarks/nll_memory.py                      # builtin Qwen 0.5B, fp32, CPU
    .venv/bin/python benchmarks/nll_memory.py --model builtin:smollm2-135m-instruct

Results and the machine: docs/benchmarks.md, "CPU demo memory".
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

_CHILD = r"""
import json, re, sys, time
from finqlora.evaluate import metrics as M
from finqlora.models.loading import load_model

model_spec, budget, rows, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if budget > 0:
    M.NLL_LOGITS_BUDGET_BYTES = budget
loaded = load_model(model_spec, device="cpu", dtype="auto", progress=False)
text = "市场 行业 公司 利润 增长 " * 95
records = [{"messages": [{"role": "user", "content": text[: 300 + 10 * i]}, {"role": "assistant", "content": text[:180]}]}
           for i in range(rows)]
started = time.perf_counter()
nll = M.answer_nll(loaded.model, loaded.tokenizer, records, max_length=512, batch_size=batch)
seconds = time.perf_counter() - started
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) // 1024
print(json.dumps({"peak_rss_mb": hwm, "seconds": round(seconds, 1), "nll": [v for v, _ in nll], "tokens": [c for _, c in nll]}))
"""


def _measure(model: str, budget: int, rows: int, batch: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, model, str(budget), str(rows), str(batch)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--rows", type=int, default=8, help="records scored (the demo: 24 in batches of 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="eval.batch_size of the demo")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("this benchmark reads peak RSS from /proc (Linux only)")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    whole = _measure(args.model, 1 << 62, args.rows, args.batch_size)  # budget never reached: the old single forward
    sliced = _measure(args.model, 0, args.rows, args.batch_size)  # 0 = the shipped NLL_LOGITS_BUDGET_BYTES
    same = max(abs(a - b) for a, b in zip(whole["nll"], sliced["nll"]))
    print(f"{started}, {args.model}, {args.rows} records, batch {args.batch_size}")
    print(f"whole-batch forward : peak RSS {whole['peak_rss_mb']:>6} MB, {whole['seconds']} s")
    print(f"sliced logits       : peak RSS {sliced['peak_rss_mb']:>6} MB, {sliced['seconds']} s")
    print(f"ratio (sliced / whole) peak RSS: {sliced['peak_rss_mb'] / whole['peak_rss_mb']:.2f}; "
          f"largest NLL difference {same:.3g} (tokens {sliced['tokens'] == whole['tokens'] and 'equal' or 'DIFFER'})")


if __name__ == "__main__":
    main()
