#!/usr/bin/env python3
"""The guide's QLoRA training script, kept working as a thin entry point to `finqlora train`.

    python scripts/qlora/train_qlora.py --data_path data/qlora/instructions.jsonl \
        --output_dir models/qlora/adapter [--config configs/deepseek-7b-qlora-t4.yaml] \
        [--model_name deepseek-ai/deepseek-llm-7b-chat] [--num_epochs 3] [--batch_size 4] \
        [--learning_rate 2e-4] [--max_length 512] [--resume_from_checkpoint auto]

Every flag maps onto the same training code and run config as `finqlora train` (docs/training.md);
flags not given keep the config's values (or the standard defaults without --config).
"""

from __future__ import annotations

import argparse
import sys

# guide flag -> run-config key (passed as --set)
_CONFIG_FLAGS = {
    "num_epochs": "train.num_epochs",
    "learning_rate": "train.learning_rate",
    "lora_r": "train.lora_r",
    "lora_alpha": "train.lora_alpha",
    "lora_dropout": "train.lora_dropout",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "max_steps": "train.max_steps",
    "seed": "train.seed",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (configs/*.yaml)")
    parser.add_argument("--model_name", "--model_name_or_path", "--model", dest="model", help="base model")
    parser.add_argument("--data_path", "--dataset_path", "--data", dest="data", help="instruction JSONL")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", help="adapter output folder")
    parser.add_argument("--resume_from_checkpoint", help="'auto' or a checkpoint-N folder")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--max_length", type=int)
    parser.add_argument("--num_epochs", "--num_train_epochs", dest="num_epochs", type=float)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--lora_r", type=int)
    parser.add_argument("--lora_alpha", type=int)
    parser.add_argument("--lora_dropout", type=float)
    parser.add_argument("--gradient_accumulation_steps", type=int)
    parser.add_argument("--max_steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key")
    return parser.parse_args(argv)


def to_cli_args(args: argparse.Namespace) -> list[str]:
    cli = ["train", "--no-progress"] if not sys.stderr.isatty() else ["train"]
    for flag, value in (
        ("--config", args.config),
        ("--model", args.model),
        ("--data", args.data),
        ("--output-dir", args.output_dir),
        ("--resume_from_checkpoint", args.resume_from_checkpoint),
        ("--batch_size", args.batch_size),
        ("--max_length", args.max_length),
    ):
        if value is not None:
            cli += [flag, str(value)]
    for name, key in _CONFIG_FLAGS.items():
        value = getattr(args, name)
        if value is not None:
            cli += ["--set", f"{key}={value}"]
    for override in args.set:
        cli += ["--set", override]
    return cli


def main(argv: list[str] | None = None) -> None:
    try:
        from finqlora.cli import main as finqlora_main
    except ImportError:
        sys.exit("finqlora is not installed: run `bash scripts/setup.sh` and use .venv/bin/python")
    finqlora_main(to_cli_args(parse_args(argv)))


if __name__ == "__main__":
    main()
