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


@eval_app.callback(invoke_without_command=True)
def eval_main(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: builtin:..., a local folder, a .gguf file or a hub id. Default: the base recorded in the adapter."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="The fine-tuned adapter folder (output of `finqlora train`)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset JSONL from `finqlora build`; records of --split are evaluated."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for generations, metrics.json and the report (re-running resumes from its cache)."),
    split: str = typer.Option("test", help="Which split of --data to evaluate (all records if the file has no splits)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Evaluate at most this many records (seeded sample, stratified by type)."),
    benchmark: list[Path] = typer.Option([], "--benchmark", help="External benchmark file/folder (repeatable)."),
    benchmark_format: list[str] = typer.Option([], "--benchmark-format", help="finfe | cfbenchmark | fpb | jsonl (one, or one per --benchmark)."),
    label_map: Optional[str] = typer.Option(None, "--label-map", help='Benchmark label mapping, e.g. "0=利空,1=中性,2=利好", or a JSON file.'),
    benchmark_split: Optional[str] = typer.Option(None, "--benchmark-split", help="Split of a CFBenchmark datasets folder (default: test, or the only one)."),
    benchmark_limit: Optional[int] = typer.Option(None, "--benchmark-limit", min=1, help="Score a seeded random sample of this many benchmark rows."),
    max_new_tokens: int = typer.Option(256, help="Generation length limit (same for both models)."),
    temperature: float = typer.Option(0.0, help="0 = greedy decoding (deterministic, recommended for evaluation)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling (only with temperature > 0)."),
    repetition_penalty: float = typer.Option(1.0, help="1.0 = off."),
    batch_size: int = typer.Option(8, min=1, help="Prompts generated together (batched, left-padded)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    load_in_4bit: Optional[bool] = typer.Option(None, "--load-in-4bit/--no-load-in-4bit", help="Default: 4-bit on CUDA, full precision elsewhere."),
    chat_template: Optional[str] = typer.Option(None, help="Fallback chat template (chatml) for a tokenizer without one."),
    perplexity: bool = typer.Option(True, "--perplexity/--no-perplexity", help="Perplexity of the reference answers."),
    forgetting: bool = typer.Option(True, "--forgetting/--no-forgetting", help="Perplexity on the shipped general-domain text (forgetting)."),
    bootstrap: int = typer.Option(1000, min=100, help="Bootstrap resamples for the confidence intervals."),
    seed: int = typer.Option(0, help="Seed for sampling, bootstrap and example selection."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html / report.md after the metrics."),
    base_only: bool = typer.Option(False, "--base-only", help="Only generate the base model's answers (e.g. before training); the full run reuses them."),
) -> None:
    """Run base and fine-tuned on the same prompts; cache generations; write metrics.json + report.

    Example: finqlora eval --adapter runs/demo/adapter --data data/instructions.jsonl --output runs/demo/eval
    """
    if ctx.invoked_subcommand is not None:
        return
    from finqlora.evaluate.evaluation import BenchmarkSpec, EvalOptions, evaluate

    if output is None:
        raise FinqloraError("--output is required", hint="finqlora eval --adapter ADAPTER --data test.jsonl --output runs/NAME/eval")
    if benchmark and not benchmark_format:
        raise FinqloraError("--benchmark needs --benchmark-format", hint="one of finfe, cfbenchmark, fpb, jsonl")
    if benchmark_format and len(benchmark_format) not in (1, len(benchmark)):
        raise FinqloraError(f"{len(benchmark)} --benchmark but {len(benchmark_format)} --benchmark-format", hint="give one format for all, or one per benchmark")
    formats = benchmark_format * len(benchmark) if len(benchmark_format) == 1 else benchmark_format
    specs = [BenchmarkSpec(str(path), fmt, label_map, benchmark_split, benchmark_limit) for path, fmt in zip(benchmark, formats)]
    options = EvalOptions(
        output=output, model=model, adapter=str(adapter) if adapter else None, data=data, split=split, max_samples=max_samples,
        benchmarks=specs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
        seed=seed, batch_size=batch_size, device=device, dtype=dtype, load_in_4bit=load_in_4bit, chat_template=chat_template,
        perplexity=perplexity, forgetting=forgetting, bootstrap_resamples=bootstrap, report=report,
        variants=("base",) if base_only else ("base", "finetuned"),
    )
    metrics = evaluate(options)
    if base_only:
        console.print(f"[green]cached[/] the base model's answers in {output}; run again with --adapter for the comparison")
        return
    _print_table(metrics)
    console.print(f"[green]wrote[/] {output / 'metrics.json'}" + (f", {output / 'report.html'}, {output / 'report.md'}" if report else ""))


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
    from finqlora.evaluate.evaluation import read_cache
    from finqlora.evaluate.human_eval import make_sheet
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
    """Rebuild report.html / report.md / metrics.json from cached generations (no model is run)."""
    from finqlora.report.report import build_report

    if output is None and (run / "pipeline_state.json").exists():
        output = run / "report"  # where `finqlora run` puts it
    paths = build_report(run, output, training_dir=training_dir, examples_per_group=examples, seed=seed)
    console.print(f"[green]wrote[/] {paths.html}, {paths.markdown}, {paths.metrics}" + "".join(f", {p}" for p in paths.images.values()))


def register(app: typer.Typer) -> None:
    """Add `finqlora eval ...` and `finqlora report` to the root app."""
    app.add_typer(eval_app, name="eval")
    app.command("report")(report_command)
