"""`finqlora eval` (before/after evaluation, human A/B sheets) and `finqlora report`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from finqlora.cli.console import make_console, styled
from finqlora.cli.config_options import CONFIG_OPTION, SET_OPTION, key_option, resolve
from finqlora.core.errors import FinqloraError

console = make_console()

eval_app = typer.Typer(
    help="Evaluate the base and the fine-tuned model on the same held-out prompts (and external benchmarks).",
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_table(metrics: dict) -> None:
    from finqlora.report.report import format_delta, format_delta_interval, format_p, format_value

    table = Table(title="base vs fine-tuned", show_lines=False)
    for column in ("metric", "n", "base", "fine-tuned", "delta [95% CI] (rates: pp)", "p", "verdict"):
        table.add_column(column, overflow="fold")
    for row in metrics["table"]:
        table.add_row(
            row["name"], str(row["n"]), format_value(row, row["base"]), format_value(row, row["finetuned"]),
            f"{format_delta(row, row['delta'], 'en')} {format_delta_interval(row, row['delta_ci'], 'en')}",
            format_p(row.get("p_value")), row["verdict"],
        )
    console.print(table)


def _report_lang() -> str:
    """The report language's one default: the run config's eval.report_lang."""
    from finqlora.core.config import EvalConfig

    return EvalConfig.model_fields["report_lang"].default


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
        console.print(styled((f"judge {verdict['judge_model']}: none of {verdict['judgements']} answers named A, B or tie", "yellow")))
        return
    console.print(
        f"judge {verdict['judge_model']}: fine-tuned wins {verdict['win_rate']:.1%} [{verdict['win_ci_low']:.1%}, {verdict['win_ci_high']:.1%}] "
        f"of {verdict['parsed']} judgements ({verdict['pairs']} pairs, both orders; ties {verdict['ties']}, losses {verdict['losses']}, "
        f"unparsed {verdict['unparsed']}); position consistency "
        + ("n/a" if verdict["position_consistency"] is None else f"{verdict['position_consistency']:.1%}"))
    for entry in verdict["agreement_with_raters"]:
        console.print(f"  vs raters of round {entry['round']}: mean Cohen's kappa {entry['mean_cohen_kappa']:.3f}")


def _default(name: str):
    """The default of an option that is not a config key: EvalOptions' (one set of defaults for the CLI, the pipeline and the API)."""
    from dataclasses import fields

    from finqlora.evaluate.evaluation import EvalOptions

    return next(f.default for f in fields(EvalOptions) if f.name == name)


@eval_app.callback(invoke_without_command=True)
def eval_main(
    ctx: typer.Context,
    config: Optional[Path] = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: builtin:..., a local folder, a .gguf file or a hub id (config train.model). Default: train.model with --config, else the base recorded in the adapter."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="The fine-tuned adapter folder (output of `finqlora train`)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset JSONL from `finqlora build`; records of --split are evaluated."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for generations, metrics.json and the report (re-running resumes from its cache)."),
    split: Optional[str] = key_option("eval.split", "--split", help="Which split of --data to evaluate (all records if the file has no splits)."),
    max_samples: Optional[int] = key_option("eval.max_samples", "--max-samples", min=1, help="Evaluate at most this many records (seeded sample, stratified by type)."),
    benchmark: list[str] = typer.Option([], "--benchmark", help="External benchmark, FORMAT:PATH (e.g. finfe:train_list.json) or PATH with --benchmark-format (repeatable; replaces eval.benchmarks)."),
    benchmark_format: list[str] = typer.Option([], "--benchmark-format", help="finfe | cfbenchmark | fpb | jsonl (one, or one per --benchmark given as a plain PATH)."),
    label_map: Optional[str] = typer.Option(None, "--label-map", help='Benchmark label mapping, e.g. "0=利空,1=中性,2=利好", or a JSON file.'),
    benchmark_split: Optional[str] = typer.Option(None, "--benchmark-split", help="Split of a CFBenchmark datasets folder (default: test, or the only one)."),
    benchmark_limit: Optional[int] = typer.Option(None, "--benchmark-limit", min=1, help="Score a seeded random sample of this many benchmark rows."),
    # A name for the eval.suite section (its sets come with --suite-set), not a scalar key of it.
    suite_name: Optional[str] = typer.Option(None, "--suite", help="Score a suite of public finance sets by choice, one table (finance-zh; docs/evaluation.md)."),
    suite_set: list[str] = typer.Option([], "--suite-set", help="A suite set's location, NAME=PATH (local copy in its published format) or NAME=hf:DATASET_ID[@SPLIT] (repeatable)."),
    suite_limit: Optional[int] = typer.Option(None, "--suite-limit", min=1, help="Score a seeded random sample of this many items per suite set."),
    scoring: Optional[str] = key_option("eval.scoring", "--scoring", help="Closed-option tasks: choice (option log-likelihood) | generate (parsed answers) | both."),
    showcase_samples: Optional[int] = key_option("eval.showcase_samples", "--showcase-samples", min=0, help="With --scoring choice: closed-label items per task also generated (example answers, repetition rate)."),
    max_new_tokens: Optional[int] = key_option("eval.max_new_tokens", "--max-new-tokens", help="Generation length limit (same for both models)."),
    temperature: Optional[float] = key_option("eval.temperature", "--temperature", help="0 = greedy decoding (deterministic, recommended for evaluation)."),
    top_p: Optional[float] = key_option("eval.top_p", "--top-p", help="Nucleus sampling (only with temperature > 0)."),
    repetition_penalty: Optional[float] = key_option("eval.repetition_penalty", "--repetition-penalty", help="Penalty on tokens already in the answer (1.0 = off)."),
    no_repeat_ngram_size: Optional[int] = key_option("eval.no_repeat_ngram_size", "--no-repeat-ngram-size", min=0, help="No n-gram of this many tokens twice in an answer (0 = off)."),
    batch_size: Optional[int] = key_option("eval.batch_size", "--batch-size", min=1, help="Prompts generated (or perplexity-scored) together."),
    choice_batch_size: Optional[int] = key_option("eval.choice_batch_size", "--choice-batch-size", min=1, help="Closed-option items choice-scored together."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps (default: train.device).", show_default=False),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 (default: from train.compute_dtype).", show_default=False),
    load_in_4bit: Optional[bool] = key_option("train.load_in_4bit", "--load-in-4bit/--no-load-in-4bit", help="4-bit base; null = on CUDA, full precision elsewhere."),
    chat_template: Optional[str] = key_option("train.chat_template", "--chat-template", help="Fallback chat template (chatml) for a tokenizer without one."),
    perplexity: Optional[bool] = key_option("eval.perplexity", "--perplexity/--no-perplexity", help="Perplexity of the reference answers."),
    forgetting: Optional[bool] = key_option("eval.forgetting", "--forgetting/--no-forgetting", help="Perplexity on the shipped general-domain text (forgetting)."),
    merge_adapter: Optional[bool] = key_option("eval.merge_adapter", "--merge-adapter/--no-merge-adapter", help="Merge the adapter into unquantized weights for the fine-tuned work (base speed, same logits)."),
    bootstrap: Optional[int] = key_option("eval.bootstrap_resamples", "--bootstrap", min=100, help="Bootstrap resamples for the confidence intervals."),
    seed: Optional[int] = key_option("eval.seed", "--seed", help="Seed for sampling, bootstrap and example selection."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Also compare base and fine-tuned answers pairwise with an LLM judge: local | deepseek | kimi | openai | an OpenAI-compatible base URL."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="The judge's model name (default: the provider's)."),
    judge_limit: Optional[int] = typer.Option(None, "--judge-limit", min=1, help="Judge a seeded sample of this many pairs (each in both orders)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html / report.md after the metrics."),
    lang: Optional[str] = key_option("eval.report_lang", "--lang", help="Report language: zh | en."),
    base_only: bool = typer.Option(False, "--base-only", help="Only score the base model (e.g. before training); the full run reuses its outputs."),
) -> None:
    """Run base and fine-tuned on the same prompts; cache outputs; write metrics.json + report.

    Options that name a config key (see --help) override --config and --set.
    Example: finqlora eval --adapter runs/demo/adapter --data data/instructions.jsonl --output runs/demo/eval
    """
    if ctx.invoked_subcommand is not None:
        return
    from finqlora.core.config import BENCHMARK_FORMATS
    from finqlora.evaluate.evaluation import VARIANTS, BenchmarkSpec, EvalOptions, SuiteSpec, evaluate
    from finqlora.evaluate.suite import check_sets, parse_set_arguments

    if output is None:
        raise FinqloraError("--output is required", hint="finqlora eval --adapter ADAPTER --data test.jsonl --output runs/NAME/eval")
    run = resolve(config, set_, {
        "train.model": model, "eval.split": split, "eval.max_samples": max_samples, "eval.scoring": scoring,
        "eval.showcase_samples": showcase_samples,
        "eval.max_new_tokens": max_new_tokens, "eval.temperature": temperature, "eval.top_p": top_p, "eval.batch_size": batch_size,
        "eval.choice_batch_size": choice_batch_size, "train.load_in_4bit": load_in_4bit, "train.chat_template": chat_template,
        "eval.perplexity": perplexity, "eval.forgetting": forgetting, "eval.merge_adapter": merge_adapter,
        "eval.bootstrap_resamples": bootstrap, "eval.seed": seed, "eval.repetition_penalty": repetition_penalty,
        "eval.no_repeat_ngram_size": no_repeat_ngram_size, "eval.report_lang": lang,
    })
    plain = [text for text in benchmark if text.partition(":")[0] not in BENCHMARK_FORMATS]  # not FORMAT:PATH
    if benchmark_format and len(benchmark_format) not in (1, len(plain)):
        raise FinqloraError(f"{len(plain)} --benchmark PATH but {len(benchmark_format)} --benchmark-format", hint="give one format for all, or one per plain PATH")
    formats = iter(benchmark_format * len(plain) if len(benchmark_format) == 1 else benchmark_format)
    extra = {"label_map": label_map, "split": benchmark_split, "limit": benchmark_limit}
    specs = [BenchmarkSpec.parse(text, next(formats, None) if text in plain else None, **extra) for text in benchmark]
    if suite_set and suite_name is None:
        raise FinqloraError("--suite-set needs --suite", hint="finqlora eval --suite finance-zh --suite-set fineval=PATH ...")
    suite_spec = None
    if suite_name is not None:
        sets = parse_set_arguments(suite_set)
        check_sets(suite_name, sets)
        suite_spec = SuiteSpec(suite_name, sets, suite_limit)
    options = EvalOptions.from_run(run, output=output, data=data, adapter=str(adapter) if adapter else None,
                                   variants=("base",) if base_only else VARIANTS)
    # Without --model or a config naming one, the base is the one recorded in the adapter.
    named_model = model or config or any(text.split("=", 1)[0].strip() in ("train.model", "model") for text in set_)
    options = dataclasses.replace(
        options, model=run.train.model if named_model else None, benchmarks=specs or options.benchmarks,
        device=device or options.device, suite=suite_spec or options.suite, dtype=dtype or options.dtype,
    )
    metrics = evaluate(options)
    if base_only:
        console.print(styled(("cached", "green"), f" the base model's outputs in {output}; run again with --adapter for the comparison"))
        return
    _print_table(metrics)
    if metrics.get("suite"):
        _print_suite(metrics["suite"])
    written = [output / "metrics.json"]
    if judge:
        from finqlora.evaluate.judge import run_judge
        from finqlora.models.client import FinLLMClient

        verdict = run_judge(output, FinLLMClient.from_env(judge, model=judge_model), model=judge_model, limit=judge_limit, seed=options.seed)
        _print_judge(verdict)
        written.append(output / "judge" / "judge.json")
    if report:
        from finqlora.report.report import build_report

        paths = build_report(output, output, seed=options.seed, lang=run.eval.report_lang)
        written += [paths.html, paths.markdown]
    console.print(styled(("wrote", "green"), " " + ", ".join(str(path) for path in written)))


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
    console.print(styled(("wrote", "green"), f" {output} ({count} rows; give each rater a copy) and the key {key} (keep it apart)"))


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
        console.print(styled(("wrote", "green"), f" {output}"))


def report_command(
    run: Path = typer.Option(..., "--run", help="Evaluation folder, or a run folder that holds one (e.g. runs/NAME)."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Where to write the report (default: RUN/report for a `finqlora run` folder, else the evaluation folder)."
    ),
    training_dir: Optional[Path] = typer.Option(None, "--training-dir", help="Training output folder (default: the evaluated adapter's)."),
    examples: int = typer.Option(2, min=0, help="Examples shown per group (win / loss / tie)."),
    seed: int = typer.Option(0, help="Seed of the example draw."),
    lang: str = typer.Option(_report_lang(), "--lang", help="Report language: zh (Chinese) | en (English); config eval.report_lang."),
) -> None:
    """Rebuild report.html / report.md and its charts from metrics.json and the caches (no model is run)."""
    from finqlora.report.report import build_report

    if output is None and (run / "pipeline_state.json").exists():
        output = run / "report"  # where `finqlora run` puts it
    paths = build_report(run, output, training_dir=training_dir, examples_per_group=examples, seed=seed, lang=lang)
    console.print(styled(("wrote", "green"), f" {paths.html}, {paths.markdown}" + "".join(f", {p}" for p in paths.images.values())))


def register(app: typer.Typer) -> None:
    """Add `finqlora eval ...` and `finqlora report` to the root app."""
    app.add_typer(eval_app, name="eval")
    app.command("report")(report_command)
