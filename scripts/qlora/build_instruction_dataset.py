#!/usr/bin/env python3
"""The guide's dataset step, kept working as a thin entry point over `finqlora build`.

    python scripts/qlora/build_instruction_dataset.py --db finance_analysis.db \
        --output data/qlora/instructions.jsonl --num_samples 300

Every option of `finqlora build` is accepted (`--num_samples` and `--num-samples` both work);
run with --help to list them. Needs the finqlora package (`bash scripts/setup.sh`).
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from finqlora.cli import main as finqlora_main
    except ImportError:
        sys.exit(
            "finqlora is not installed in this Python: run `bash scripts/setup.sh` and then "
            "`.venv/bin/python scripts/qlora/build_instruction_dataset.py ...`"
        )
    finqlora_main(["build", *sys.argv[1:]])


if __name__ == "__main__":
    main()
