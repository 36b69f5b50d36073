"""Peak resident memory and time of choice scoring with a frozen model, without and with the
contiguous head input (models/loading.py, `_contiguous_head_input`).

    python benchmarks/frozen_head_memory.py --dataset DIR/instructions.jsonl [--items 16] [--repeats 2]

Every adapter load freezes the base (PEFT sets requires_grad False), and so do merge_and_unload
and the evaluation's base_only. With logits_to_keep=1 the head gets the strided view
hidden[:, -1:, :]; torch.matmul copied the frozen 151,936 x 896 head once per batch row for it.
Each run is its own process (the kernel's ru_maxrss of the child is that run's peak): it loads
the model with `load_model`, freezes every parameter, and scores the dataset's first `--items`
test items by choice in one batch. The baseline replaces the pre-hook with one that passes the
input through unchanged (what loading did before); the candidate is the code as shipped.
Alternating pairs; prints each run, the ratios, and checks that both picked the same options
with the same log-likelihoods.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
import finqlora.models.loading as loading
if sys.argv[1] == "strided head input":
    loading._contiguous_head_input = lambda module, args: args
from finqlora.evaluate.choice import score_choices
from finqlora.evaluate.evaluation import build_items
rows = [json.loads(line) for line in open(sys.argv[2], encoding="utf-8")]
items = [i for i in build_items([r for r in rows if r.get("split") == "test"]) if "choice" in i][: int(sys.argv[3])]
loaded = loading.load_model(sys.argv[4], device="cpu", dtype="bfloat16", progress=False)
for parameter in loaded.model.parameters():
    parameter.requires_grad_(False)
started = time.perf_counter()
results = score_choices(loaded.model, loaded.tokenizer, [(i["messages"], i["choice"]["options"]) for i in items],
                        batch_size=len(items), answer_prefixes=[i["choice"].get("answer_prefix", "") for i in items])
print(json.dumps({"score_s": time.perf_counter() - started, "picks": [r.choice for r in results],
                  "logprobs": [r.token_logprobs for r in results]}))
"""
RUNS = ("strided head input", "contiguous head input")


def run(label: str, dataset: Path, items: int, model: str) -> dict:
    with tempfile.TemporaryFile(mode="w+") as errors:
        child = subprocess.Popen([sys.executable, "-c", CHILD, label, str(dataset), str(items), model],
                                 stdout=subprocess.PIPE, stderr=errors, text=True)
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(f"{label}: scoring failed\n{errors.read()[-2000:]}")
    return {"run": label, "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2), **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="a finqlora build output (its test split is scored)")
    parser.add_argument("--items", type=int, default=16, help="test items, scored as one batch")
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--repeats", type=int, default=2, help="alternating pairs")
    opts = parser.parse_args()
    rows = []
    for _ in range(opts.repeats):
        for label in RUNS:
            rows.append(run(label, opts.dataset, opts.items, opts.model))
            print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in rows[-1].items() if k not in ("picks", "logprobs")}), flush=True)
    baseline = [r for r in rows if r["run"] == RUNS[0]]
    candidate = [r for r in rows if r["run"] == RUNS[1]]
    for key in ("peak_rss_gb", "score_s"):
        ratio = sum(r[key] for r in candidate) / sum(r[key] for r in baseline)
        print(f"{key}: contiguous / strided = {ratio:.2f}")
    same = all(r["picks"] == rows[0]["picks"] and r["logprobs"] == rows[0]["logprobs"] for r in rows)
    print("same picks and log-likelihoods in every run:", same)
    if not same:
        raise SystemExit("the runs disagree: the head input's layout changed the scores")


if __name__ == "__main__":
    main()
