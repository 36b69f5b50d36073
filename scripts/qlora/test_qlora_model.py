#!/usr/bin/env python3
"""Ask a QLoRA fine-tuned model a few questions (the guide's original entry point).

    python scripts/qlora/test_qlora_model.py --adapter_path models/qlora/adapter \
        --test_cases "美联储宣布加息25个基点"

It runs the same code as `finqlora ask --adapter ... --compare` (finqlora.models.loading +
finqlora.models.generation): the base model is the one recorded in the adapter unless --base_model
says otherwise, and with --compare the base model's answers are shown next to the fine-tuned
ones. Errors (missing adapter, wrong base, no network) are printed with what to do.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter_path", required=True, help="LoRA adapter folder (the --output-dir of training)")
    parser.add_argument("--test_cases", nargs="+", required=True, help="one or more news texts to analyse")
    parser.add_argument("--base_model", default=None, help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--instruction", default=None, help="instruction placed before each test case")
    parser.add_argument("--compare", action="store_true", help="also show the base model's answers")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print JSON instead of formatted text")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from finqlora.cli.models import err_console, load_from_options, print_answers
    from finqlora.core.errors import FinqloraError
    from finqlora.models.generation import GenerationSettings, ask_prompts

    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        loaded = load_from_options(
            model=args.base_model,
            adapter=args.adapter_path,
            device=args.device,
            dtype="auto",
            load_in_4bit=None,
            trust_remote_code=False,
            chat_template=None,
            allow_pickle_adapter=False,
            ignore_base_mismatch=False,
        )
        answers = ask_prompts(loaded, args.test_cases, settings, instruction=args.instruction, compare=args.compare)
    except FinqloraError as exc:
        err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
        return 2
    print_answers(answers, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
