"""Peak resident memory of CPU training, without and with the heap trim after every step.

    python benchmarks/cpu_train_memory.py --dataset DIR/instructions.jsonl [--steps 30]

Runs `finqlora train --config configs/demo-cpu.yaml` on the same data and steps, one process
each, alternating: the baseline with the training callback's `trim_heap` turned into a no-op
(glibc keeps the freed, fragmented heap), the candidate as shipped (`malloc_trim(0)` after every
step and evaluation: core/hardware.py). Prints each run's peak RSS (the kernel's ru_maxrss of
the child), wall time, validation loss, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY = {
    "no trim": "import sys; import finqlora.train.callbacks as c; c.trim_heap = lambda: False; from finqlora.cli import main; main(sys.argv[1:])",
    "trim after each step": "import sys; from finqlora.cli import main; main(sys.argv[1:])",
}


def run(label: str, dataset: Path, steps: int, out: Path) -> dict:
    args = ["train", "--config", str(REPO / "configs" / "demo-cpu.yaml"), "--data", str(dataset), "--output-dir", str(out),
            "--set", f"train.max_steps={steps}", "--set", "train.eval_steps=null", "--no-progress"]
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", ENTRY[label], *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label}: training failed\n{child.stderr.read().decode()[-2000:]}")
    info = json.loads((out / "training_info.json").read_text(encoding="utf-8"))
    return {"run": label, "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2), "wall_s": round(time.perf_counter() - started, 1),
            "val_loss": (info.get("val_losses") or [{}])[-1].get("loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1, help="alternating pairs")
    opts = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(opts.repeats):
            for number, label in enumerate(ENTRY):
                rows.append(run(label, opts.dataset, opts.steps, Path(tmp) / f"{repeat}-{number}"))
                print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    base = [r for r in rows if r["run"] == "no trim"]
    fixed = [r for r in rows if r["run"] != "no trim"]
    for key in ("peak_rss_gb", "wall_s"):
        ratio = sum(r[key] for r in fixed) / sum(r[key] for r in base)
        print(f"{key}: trim / no trim = {ratio:.2f}")


if __name__ == "__main__":
    main()
