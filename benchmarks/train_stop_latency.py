"""SIGTERM during training: seconds from the signal to the process's exit, against one step's time.

    python benchmarks/train_stop_latency.py --data data/qlora/instructions.jsonl \
        [--model builtin:smollm2-135m-instruct] [--batch-size 2] [--max-length 256]

Runs `finqlora train` as a subprocess (LoRA on the CPU, a checkpoint at every step), times two
optimizer steps from training_log.jsonl as they land (the baseline: before finqlora stopped
within a step, SIGTERM waited for the rest of the step, up to one whole step, then saved), sends
SIGTERM half-way through the next step and times the exit (abandon the step at the next block
hook, save the last complete step, write training_info.json and loss.png). Prints both and their
ratio; exit code 1 if the process did not exit with 128 + SIGTERM or left no verified checkpoint.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from finqlora.train.checkpoints import find_latest_checkpoint  # noqa: E402


def _loss_lines(log: Path) -> int:
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text(encoding="utf-8").splitlines() if '"loss"' in line)


def _wait_for_lines(process: subprocess.Popen, log: Path, count: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"training exited early ({process.returncode}):\n{process.communicate()[1][-3000:]}")
        if _loss_lines(log) >= count:
            return time.monotonic()
        time.sleep(0.05)
    raise SystemExit(f"no {count} logged steps within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="instruction JSONL")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the first steps")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="finqlora-stop-")) / "run"
    command = [
        sys.executable, "-m", "finqlora", "train", "--data", args.data, "--model", args.model, "--output-dir", str(out),
        "--batch_size", str(args.batch_size), "--max_length", str(args.max_length), "--no-progress",
        "--set", "train.device=cpu", "--set", "train.load_in_4bit=false", "--set", "train.max_steps=1000",
        "--set", "train.eval_steps=1000", "--set", "train.logging_steps=1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "training_log.jsonl"
    first = _wait_for_lines(process, log, 1, args.timeout)
    second = _wait_for_lines(process, log, 2, args.timeout)
    step_seconds = second - first
    time.sleep(step_seconds / 2)  # half-way through step 3
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=max(600.0, 3 * step_seconds))
    exit_seconds = time.monotonic() - sent
    info = json.loads((out / "training_info.json").read_text(encoding="utf-8"))
    latest, _ = find_latest_checkpoint(out)
    ok = process.returncode == 128 + signal.SIGTERM and latest is not None
    print(f"model {args.model}, batch {args.batch_size} x {args.max_length} tokens, CPU")
    print(f"one optimizer step (baseline: the old wait, up to a whole step, before saving): {step_seconds:.1f} s")
    print(f"SIGTERM half-way through step {info['global_step'] + 1} -> exit: {exit_seconds:.1f} s "
          f"(ratio to one step {exit_seconds / step_seconds:.2f}); checkpoint {latest.name if latest else None}, "
          f"exit code {process.returncode}")
    if not ok:
        print(stderr[-3000:], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
