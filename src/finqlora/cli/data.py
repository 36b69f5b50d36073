"""`finqlora build` (the instruction dataset) and `finqlora data show` (preview a dataset file)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from finqlora.cli.console import make_console, styled
from finqlora.cli.config_options import CONFIG_OPTION, SET_OPTION, key_option, resolve
from finqlora.core.errors import FinqloraError

data_app = typer.Typer(name="data", help="Inspect instruction datasets.", no_args_is_help=True)
console = make_console()
err_console = make_console(stderr=True)


def _one_each(values: list, count: int, option: str) -> list:
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise FinqloraError(f"{option} was given {len(values)} times for {count} --add-dataset",
                            hint=f"give {option} once (for all) or once per --add-dataset, in the same order")
    return values


def add_sources(paths: list[Path], formats: list[str], samples: list[int]) -> list[dict] | None:
    """--add-dataset/--add-format/--add-samples -> `data.add` entries (None: not given; validated with the config)."""
    if not paths:
        if formats or samples:
            raise FinqloraError("--add-format/--add-samples need --add-dataset", hint="e.g. --add-dataset finfe.json --add-format finfe")
        return None
    if not formats:
        raise FinqloraError("--add-dataset needs --add-format", hint="one of finfe, cfbenchmark, fpb, disc, alpaca, sharegpt")
    formats = _one_each(formats, len(paths), "--add-format")
    counts: list = _one_each(samples, len(paths), "--add-samples") if samples else [None] * len(paths)
    return [{"path": str(p), "format": f, "samples": n} for p, f, n in zip(paths, formats, counts)]


def build(
    config: Path | None = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
    db: str | None = key_option("data.db", "--db", help="Event store (SQLite), or 'sample' for the built-in synthetic one."),
    output: Path | None = key_option("data.output", "--output", "-o", help="Dataset file (JSONL); the card (.card.md), stats (.stats.json) and a LLaMA-Factory dataset_info.json go beside it."),
    num_samples: int | None = key_option("data.num_samples", "--num-samples", "--num_samples", "-n", help="Number of records to build."),
    mix: str | None = key_option("data.mix", "--mix", help="Shares of news_impact, market_analysis, report_qa."),
    split: str | None = key_option("data.split", "--split", help="Shares of train, val, test (by event time)."),
    seed: int | None = key_option("data.seed", "--seed", help="Random seed; the same seed and database give byte-identical files."),
    record_format: str | None = key_option("data.format", "--format", help="alpaca (instruction/input/output), messages (OpenAI chat) or sharegpt (conversations)."),
    templates_only: bool | None = key_option("data.templates_only", "--templates-only/--no-templates-only", help="Ignore the database and use the built-in templates."),
    tokenizer: str | None = key_option("data.tokenizer", "--tokenizer", help="Model whose tokenizer measures lengths (local folder, .gguf, builtin:...); null = train.model's, 'chars' = a character estimate."),
    max_length: int | None = key_option("train.max_length", "--max-length", help="Training max length in tokens; longer inputs are trimmed (outputs are kept)."),
    primary_window: int | None = key_option("data.primary_window", "--primary-window", help="Post-event window (minutes) whose return sets the direction label."),
    primary_ticker: str | None = key_option("data.primary_ticker", "--primary-ticker", help="Ticker whose direction is the record's main label (null: XAUUSD if present, else the one with most returns)."),
    threshold_k: float | None = key_option("data.threshold_k", "--threshold-k", help="Direction threshold = k x robust volatility of the ticker at the window."),
    dedup_threshold: float | None = key_option("data.dedup_threshold", "--dedup-threshold", help="3-gram Jaccard similarity at which two news texts are near-duplicates."),
    embargo_min: int | None = key_option("data.embargo_min", "--embargo-min", help="Leave out events this many minutes after a split boundary."),
    tz: str | None = key_option("data.tz", "--tz", help="Zone of a user database's time column written without one (e.g. Asia/Shanghai)."),
    add_dataset: list[Path] = typer.Option(None, "--add-dataset", help="Public data set to mix in (repeatable; see --add-format) (config data.add).", show_default=False),
    add_format: list[str] = typer.Option(None, "--add-format", help="finfe | finfe-choice | cfbenchmark | fpb | disc | alpaca | sharegpt: one for all --add-dataset, or one each.", show_default=False),
    add_samples: list[int] = typer.Option(None, "--add-samples", help="Rows to take from each --add-dataset (one for all, or one each; default all).", show_default=False),
    decontaminate: list[Path] = typer.Option(None, "--decontaminate", help="Evaluation file whose items no record may duplicate (repeatable) (config data.decontaminate).", show_default=False),
    teacher: str | None = key_option("data.teacher", "--teacher", help="Teacher for richer news-impact analyses: deepseek, kimi, openai, local, or an OpenAI-compatible URL."),
    teacher_model: str | None = key_option("data.teacher_model", "--teacher-model", help="The teacher's model (null: the provider's, e.g. deepseek-chat)."),
    teacher_cache: str | None = key_option("data.teacher_cache", "--teacher-cache", help="Teacher answer cache (null: <output>.teacher_cache.jsonl)."),
    teacher_concurrency: int | None = key_option("data.teacher_concurrency", "--teacher-concurrency", help="Teacher requests in flight at once."),
    teacher_max_tokens: int | None = key_option("data.teacher_max_tokens", "--teacher-max-tokens", help="Longest teacher answer, in tokens."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress spinner or summary table."),
) -> None:
    """Build the instruction dataset (news impact, market analysis, report Q&A) from the event store.

    Every option is a key of the run config's `data` section (or train.max_length): with
    --config the file's values apply, --set and the options override them.
    """
    from finqlora.dataset.build_config import BuildConfig
    from finqlora.dataset.builder import build_dataset
    from finqlora.dataset.teacher import enrich_from_config

    flags = {
        "data.db": db, "data.output": str(output) if output else None, "data.num_samples": num_samples, "data.mix": mix,
        "data.split": split, "data.seed": seed, "data.format": record_format, "data.templates_only": templates_only,
        "data.tokenizer": tokenizer, "train.max_length": max_length, "data.primary_window": primary_window,
        "data.primary_ticker": primary_ticker, "data.threshold_k": threshold_k, "data.dedup_threshold": dedup_threshold,
        "data.embargo_min": embargo_min, "data.tz": tz, "data.add": add_sources(add_dataset or [], add_format or [], add_samples or []),
        "data.decontaminate": [str(p) for p in decontaminate] if decontaminate else None, "data.teacher": teacher,
        "data.teacher_model": teacher_model, "data.teacher_cache": teacher_cache, "data.teacher_concurrency": teacher_concurrency,
        "data.teacher_max_tokens": teacher_max_tokens,
    }
    run = resolve(config, set_, flags)
    data = run.data
    store = _store(data.db, data.seed, Path(data.output), skip=data.templates_only)
    build_config = dataclasses.replace(BuildConfig.from_run(run, db=store, output=Path(data.output)), progress=not quiet)
    result = build_dataset(build_config)
    for notice in result.notices:
        err_console.print(styled(("note:", "yellow"), f" {notice}"), highlight=False)
    if not quiet:
        table = Table(title=f"{len(result.records)} records")
        table.add_column("type")
        for name in ("train", "val", "test", "total"):
            table.add_column(name, justify="right")
        for record_type, total in result.stats["by_type"].items():
            row = [str(result.stats["by_split_and_type"][s].get(record_type, 0)) for s in ("train", "val", "test")]
            table.add_row(record_type, *row, str(total))
        console.print(table)
    console.print(f"wrote {result.output}\n  card  {result.card}\n  stats {result.stats_path}", highlight=False)
    enrich_from_config(result.output, data, progress=not quiet)


def _store(db: str, seed: int, output: Path, *, skip: bool) -> Path | None:
    """The store to read: the user's file, or the synthetic sample (data.db: sample), written beside the dataset.

    Beside the dataset, not in a temporary folder: the card and stats name the store, and the
    same seed must give byte-identical files.
    """
    if skip:
        return None
    if db != "sample":
        return Path(db)
    from finqlora.store.sample_db import build_sample_db

    return build_sample_db(output.parent / "sample.db", seed=seed, overwrite=True)


def _record_panel(record: dict, number: int) -> Panel:
    head = " · ".join(
        str(part) for part in (record.get("id"), record.get("type"), record.get("split"), record.get("event_time")) if part
    )
    # Text, not markup: dataset text may contain brackets that rich would read as styles.
    if isinstance(record.get("messages"), list):
        sections = [
            (str(m.get("role", "?")), str(m.get("content", ""))) if isinstance(m, dict) else ("?", str(m))
            for m in record["messages"]
        ]
    else:
        sections = [(name, str(record.get(name) or "")) for name in ("instruction", "input", "output")]
    if record.get("label"):
        sections.append(("label", json.dumps(record["label"], ensure_ascii=False)))
    body = Text()
    for index, (name, text) in enumerate(s for s in sections if s[1]):
        if index:
            body.append("\n\n")
        body.append(name + "\n", style="bold")
        body.append(text)
    return Panel(body, title=Text(f"#{number} {head}"), title_align="left")


@data_app.command("show")
def show(
    file: Path = typer.Argument(..., help="Dataset JSONL file."),
    n: int = typer.Option(3, "-n", "--num", help="How many records to print."),
) -> None:
    """Print the first records of a dataset file readably."""
    from finqlora.dataset.dataset_file import preview_records

    records = preview_records(file, n)
    if not records:
        raise FinqloraError(f"{file} holds no records", hint="build one with `finqlora build --output FILE`")
    for number, record in enumerate(records, 1):
        console.print(_record_panel(record, number), highlight=False)


def register(app: typer.Typer) -> None:
    """Add `finqlora build` and the `finqlora data` group to the root app."""
    app.command("build")(build)
    app.add_typer(data_app)
