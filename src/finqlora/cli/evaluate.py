"""`finqlora eval` (before/after evaluation, human A/B sheets) and `finqlora report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from finqlora.core.errors import FinqloraError

console = Console()

eval_app = typer.Typer(
    help="Evaluate the base and the fine-tuned model on the same held-out prompts (and external benchmarks).",
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_table(metrics: dict) -> None:
    from finqlora.report.report import format_interval, format_p, format_value

    table = Table(title="base vs fine-tuned", show_lines=False)
    for column in ("metric", "n", "base", "fine-tuned", "delta [95% CI]", "p", "verdict"):
        table.add_column(column, overflow="fold")
    for row in metrics["table"]:
        table.add_row(
            row["name"], str(row["n"]), format_value(row, row["base"]), format_value(row, row["finetuned"]),
            f"{format_value(row, row['delta'], signed=True)} {format_interval(row, row['delta_ci'], signed=True)}",
            format_p(row.get("p_value")), row["verdict"],
        )
    console.print(table)


def _print_suite(suite: dict) -> None:
    def points(value: float | None) -> str:
        return "-" if value is None else f"{value * 100:.1f}"

    def interval(values: list | None) -> str:
        return "" if not values or None in values else f"[{values[0] * 100:+.1f}, {values[1] * 100:+.1f}]"

    table = Table(title=f"suite {suite['name']}: accuracy (%), choice scoring")
    for column in ("set", "n", "base", "fine-tuned", "diff (points) [95% CI]", "McNemar p", "majority"):
        table.add_column(column)
    for row in suite["sets"]:
        if not row["evaluated"]:
            table.add_row(row["set"], "-", "not given", "", "", "", "")
            continue
        p = row.get("p_value")
        table.add_row(row["set"], str(row["n"]), points(row["base"]), points(row["finetuned"]),
                      f"{row['delta'] * 100:+.1f} {interval(row['delta_ci'])}", "-" if p is None else f"{p:.3g}", points(row.get("majority")))
    average = suite.get("average")
    if average:
        table.add_row("average", str(average["n"]), points(average["base"]), points(average["finetuned"]),
                      f"{average['delta'] * 100:+.1f} {interval(average['delta_ci'])}", "", "")
    console.print(table)


def _print_judge(verdict: dict) -> None:
    if verdict["win_rate"] is None:
        console.print(f"[yellow]judge {verdict['judge_model']}: none of {verdict['judgements']} answers named A, B or tie[/]")
        return
    console.print(
        f"judge {verdict['judge_model']}: fine-tuned wins {verdict['win_rate']:.1%} [{verdict['win_ci_low']:.1%}, {verdict['win_ci_high']:.1%}] "
        f"of {verdict['parsed']} judgements ({verdict['pairs']} pairs, both orders; ties {verdict['ties']}, losses {verdict['losses']}, "
        f"unparsed {verdict['unparsed']}); position consistency "
        + ("n/a" if verdict["position_consistency"] is None else f"{verdict['position_consistency']:.1%}"))
    for entry in verdict["agreement_with_raters"]:
        console.print(f"  vs raters of round {entry['round']}: mean Cohen's kappa {entry['mean_cohen_kappa']:.3f}")


def _default(name: str):
    """The option's default is EvalOptions' (one set of defaults for the CLI, the pipeline and the API)."""
    from dataclasses import fields

    from finqlora.evaluate.evaluation import EvalOptions

    return next(f.default for f in fields(EvalOptions) if f.name == name)


@eval_app.callback(invoke_without_command=True)
def eval_main(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: builtin:..., a local folder, a .gguf file or a hub id. Default: the base recorded in the adapter."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="The fine-tuned adapter folder (output of `finqlora train`)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset JSONL from `finqlora build`; records of --split are evaluated."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for generations, metrics.json and the report (re-running resumes from its cache)."),
    split: str = typer.Option(_default("split"), help="Which split of --data to evaluate (all records if the file has no splits)."),
    max_samples: Optional[int] = typer.Option(_default("max_samples"), "--max-samples", min=1, help="Evaluate at most this many records (seeded sample, stratified by type)."),
    benchmark: list[str] = typer.Option([], "--benchmark", help="External benchmark, FORMAT:PATH (e.g. finfe:train_list.json) or PATH with --benchmark-format (repeatable)."),
    benchmark_format: list[str] = typer.Option([], "--benchmark-format", help="finfe | cfbenchmark | fpb | jsonl (one, or one per --benchmark given as a plain PATH)."),
    label_map: Optional[str] = typer.Option(None, "--label-map", help='Benchmark label mapping, e.g. "0=利空,1=中性,2=利好", or a JSON file.'),
    benchmark_split: Optional[str] = typer.Option(None, "--benchmark-split", help="Split of a CFBenchmark datasets folder (default: test, or the only one)."),
    benchmark_limit: Optional[int] = typer.Option(None, "--benchmark-limit", min=1, help="Score a seeded random sample of this many benchmark rows."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Score a suite of public finance sets by choice, one table (finance-zh; docs/evaluation.md)."),
    suite_set: list[str] = typer.Option([], "--suite-set", help="A suite set's location, NAME=PATH (local copy in its published format) or NAME=hf:DATASET_ID[@SPLIT] (repeatable)."),
    suite_limit: Optional[int] = typer.Option(None, "--suite-limit", min=1, help="Score a seeded random sample of this many items per suite set."),
    scoring: str = typer.Option(_default("scoring"), help="Closed-option tasks: choice (option log-likelihood) | generate (parsed answers) | both."),
    max_new_tokens: int = typer.Option(_default("max_new_tokens"), help="Generation length limit (same for both models)."),
    temperature: float = typer.Option(_default("temperature"), help="0 = greedy decoding (deterministic, recommended for evaluation)."),
    top_p: float = typer.Option(_default("top_p"), help="Nucleus sampling (only with temperature > 0)."),
    repetition_penalty: float = typer.Option(_default("repetition_penalty"), help="1.0 = off."),
    batch_size: int = typer.Option(_default("batch_size"), min=1, help="Prompts generated (or perplexity-scored) together."),
    choice_batch_size: int = typer.Option(_default("choice_batch_size"), min=1, help="Closed-option items choice-scored together."),
    device: str = typer.Option(_default("device"), help="auto | cpu | cuda | cuda:N | mps"),
    dtype: str = typer.Option(_default("dtype"), help="auto | float32 | bfloat16 | float16"),
    load_in_4bit: Optional[bool] = typer.Option(_default("load_in_4bit"), "--load-in-4bit/--no-load-in-4bit", help="Default: 4-bit on CUDA, full precision elsewhere."),
    chat_template: Optional[str] = typer.Option(_default("chat_template"), help="Fallback chat template (chatml) for a tokenizer without one."),
    perplexity: bool = typer.Option(_default("perplexity"), "--perplexity/--no-perplexity", help="Perplexity of the reference answers."),
    forgetting: bool = typer.Option(_default("forgetting"), "--forgetting/--no-forgetting", help="Perplexity on the shipped general-domain text (forgetting)."),
    merge_adapter: bool = typer.Option(_default("merge_adapter"), "--merge-adapter/--no-merge-adapter", help="Merge the adapter into unquantized weights for the fine-tuned work (base speed, same logits)."),
    bootstrap: int = typer.Option(_default("bootstrap_resamples"), min=100, help="Bootstrap resamples for the confidence intervals."),
    seed: int = typer.Option(_default("seed"), help="Seed for sampling, bootstrap and example selection."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Also compare base and fine-tuned answers pairwise with an LLM judge: local | deepseek | kimi | openai | an OpenAI-compatible base URL."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="The judge's model name (default: the provider's)."),
    judge_limit: Optional[int] = typer.Option(None, "--judge-limit", min=1, help="Judge a seeded sample of this many pairs (each in both orders)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html / report.md after the metrics."),
    base_only: bool = typer.Option(False, "--base-only", help="Only score the base model (e.g. before training); the full run reuses its outputs."),
) -> None:
    """Run base and fine-tuned on the same prompts; cache outputs; write metrics.json + report.

    Example: finqlora eval --adapter runs/demo/adapter --data data/instructions.jsonl --output runs/demo/eval
    """
    if ctx.invoked_subcommand is not None:
        return
    from finqlora.core.config import BENCHMARK_FORMATS
    from finqlora.evaluate.evaluation import VARIANTS, BenchmarkSpec, EvalOptions, SuiteSpec, evaluate
    from finqlora.evaluate.suite import check_sets, parse_set_arguments

    if output is None:
        raise FinqloraError("--output is required", hint="finqlora eval --adapter ADAPTER --data test.jsonl --output runs/NAME/eval")
    plain = [text for text in benchmark if text.partition(":")[0] not in BENCHMARK_FORMATS]  # not FORMAT:PATH
    if benchmark_format and len(benchmark_format) not in (1, len(plain)):
        raise FinqloraError(f"{len(plain)} --benchmark PATH but {len(benchmark_format)} --benchmark-format", hint="give one format for all, or one per plain PATH")
    formats = iter(benchmark_format * len(plain) if len(benchmark_format) == 1 else benchmark_format)
    extra = {"label_map": label_map, "split": benchmark_split, "limit": benchmark_limit}
    specs = [BenchmarkSpec.parse(text, next(formats, None) if text in plain else None, **extra) for text in benchmark]
    if suite_set and suite is None:
        raise FinqloraError("--suite-set needs --suite", hint="finqlora eval --suite finance-zh --suite-set fineval=PATH ...")
    suite_spec = None
    if suite is not None:
        sets = parse_set_arguments(suite_set)
        check_sets(suite, sets)
        suite_spec = SuiteSpec(suite, sets, suite_limit)
    options = EvalOptions(
        output=output, model=model, adapter=str(adapter) if adapter else None, data=data, split=split, max_samples=max_samples,
        benchmarks=specs, suite=suite_spec, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
        seed=seed, batch_size=batch_size, choice_batch_size=choice_batch_size, device=device, dtype=dtype, load_in_4bit=load_in_4bit, chat_template=chat_template,
        perplexity=perplexity, forgetting=forgetting, bootstrap_resamples=bootstrap, scoring=scoring, merge_adapter=merge_adapter,
        variants=("base",) if base_only else VARIANTS,
    )
    metrics = evaluate(options)
    if base_only:
        console.print(f"[green]cached[/] the base model's outputs in {output}; run again with --adapter for the comparison")
        return
    _print_table(metrics)
    if metrics.get("suite"):
        _print_suite(metrics["suite"])
    written = [output / "metrics.json"]
    if judge:
        from finqlora.evaluate.judge import run_judge
        from finqlora.models.client import FinLLMClient

        verdict = run_judge(output, FinLLMClient.from_env(judge, model=judge_model), model=judge_model, limit=judge_limit, seed=seed)
        _print_judge(verdict)
        written.append(output / "judge" / "judge.json")
    if report:
        from finqlora.report.report import build_report

        paths = build_report(output, output, seed=seed)
        written += [paths.html, paths.markdown]
    console.print("[green]wrote[/] " + ", ".join(str(path) for path in written))


@eval_app.command("human-sheet")
def human_sheet(
    run: Path = typer.Option(..., "--run", help="Evaluation folder (the --output of `finqlora eval`)."),
    output: Path = typer.Option(Path("human_sheet.csv"), "--output", "-o", help="The blind sheet for raters (CSV, UTF-8 with BOM for Excel)."),
    key: Path = typer.Option(Path("human_key.csv"), "--key", help="Which answer is which model: keep it away from raters."),
    limit: Optional[int] = typer.Option(None, min=1, help="Put a seeded random sample of this many items on the sheet."),
    task: Optional[str] = typer.Option(None, help="Only items of this task (news_impact, report_qa, market_analysis, ...)."),
    seed: int = typer.Option(0, help="Seed for the per-row A/B order and the sample."),
) -> None:
    """Export a blind A/B sheet (random order per row) and its separate key."""
    from finqlora.evaluate.human_eval import make_sheet
    from finqlora.evaluate.scoring import read_cache
    from finqlora.report.report import question_text, find_eval_dir

    eval_dir = find_eval_dir(run)
    items = read_cache(eval_dir / "items.jsonl")
    outputs = {v: {row["id"]: row["output"] for row in read_cache(eval_dir / f"generations_{v}.jsonl")} for v in ("base", "finetuned")}
    rows = [
        {"id": item["id"], "question": question_text(item), "base": outputs["base"][item["id"]], "finetuned": outputs["finetuned"][item["id"]]}
        for item in items
        if (task is None or item["task"] == task) and item["id"] in outputs["base"] and item["id"] in outputs["finetuned"]
    ]
    if not rows:
        raise FinqloraError(f"{eval_dir}: no items with both generations" + (f" for task {task!r}" if task else ""), hint="run `finqlora eval` first")
    count = make_sheet(rows, output, key, seed=seed, limit=limit)
    console.print(f"[green]wrote[/] {output} ({count} rows; give each rater a copy) and the key {key} (keep it apart)")


@eval_app.command("human-score")
def human_score(
    sheets: list[Path] = typer.Argument(..., help="Filled sheets, one per rater (the file name is the rater's name)."),
    key: Path = typer.Option(..., "--key", help="The key written with the sheet."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the scores as JSON."),
) -> None:
    """Decode filled A/B sheets: win/tie/loss of the fine-tuned model and rater agreement."""
    from finqlora.core.fileio import atomic_write_json
    from finqlora.evaluate.human_eval import score_sheets

    score = score_sheets(sheets, key)
    table = Table(title="fine-tuned vs base (human preference)")
    for column in ("rater", "judged", "win", "tie", "loss", "unfilled"):
        table.add_column(column)
    for rater in score.raters:
        r = score.per_rater[rater]
        table.add_row(rater, str(r["n"]), f"{r['win_rate']:.1%}", f"{r['tie_rate']:.1%}", f"{r['loss_rate']:.1%}", str(score.unfilled[rater]))
    p = score.pooled
    table.add_row("all", str(p["n"]), f"{p['win_rate']:.1%}", f"{p['tie_rate']:.1%}", f"{p['loss_rate']:.1%}", str(sum(score.unfilled.values())))
    console.print(table)
    for pair, kappa in score.cohen.items():
        console.print(f"Cohen's kappa {pair}: {kappa:.3f}")
    if score.fleiss is not None:
        console.print(f"Fleiss' kappa ({len(score.raters)} raters, {score.items_rated_by_all} items rated by all): {score.fleiss:.3f}")
    if output:
        atomic_write_json(output, json.loads(json.dumps(score.to_dict(), default=str)))
        console.print(f"[green]wrote[/] {output}")


def report_command(
    run: Path = typer.Option(..., "--run", help="Evaluation folder, or a run folder that holds one (e.g. runs/NAME)."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Where to write the report (default: RUN/report for a `finqlora run` folder, else the evaluation folder)."
    ),
    training_dir: Optional[Path] = typer.Option(None, "--training-dir", help="Training output folder (default: the evaluated adapter's)."),
    examples: int = typer.Option(2, min=0, help="Examples shown per group (win / loss / tie)."),
    seed: int = typer.Option(0, help="Seed of the example draw."),
) -> None:
    """Rebuild report.html / report.md and its charts from metrics.json and the caches (no model is run)."""
    from finqlora.report.report import build_report

    if output is None and (run / "pipeline_state.json").exists():
        output = run / "report"  # where `finqlora run` puts it
    paths = build_report(run, output, training_dir=training_dir, examples_per_group=examples, seed=seed)
    console.print(f"[green]wrote[/] {paths.html}, {paths.markdown}" + "".join(f", {p}" for p in paths.images.values()))


def register(app: typer.Typer) -> None:
    """Add `finqlora eval ...` and `finqlora report` to the root app."""
    app.add_typer(eval_app, name="eval")
    app.command("report")(report_command)
