"""`finqlora build` (the instruction dataset) and `finqlora data show` (preview a dataset file)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from finqlora.cli.console import make_console, styled
from finqlora.core.errors import FinqloraError

data_app = typer.Typer(name="data", help="Inspect instruction datasets.", no_args_is_help=True)
console = make_console()
err_console = make_console(stderr=True)


def parse_shares(text: str, option: str) -> tuple[float, float, float]:
    """'60,20,20' or '0.6,0.2,0.2' -> three shares."""
    try:
        parts = tuple(float(p) for p in text.replace(" ", "").replace("/", ",").split(",") if p)
    except ValueError:
        raise FinqloraError(f"{option} expects three comma-separated numbers, got {text!r}", hint=f"e.g. {option} 60,20,20") from None
    if len(parts) != 3:
        raise FinqloraError(f"{option} expects three numbers, got {len(parts)} in {text!r}", hint=f"e.g. {option} 60,20,20")
    return parts  # type: ignore[return-value]


def _one_each(values: list, count: int, option: str) -> list:
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise FinqloraError(f"{option} was given {len(values)} times for {count} --add-dataset",
                            hint=f"give {option} once (for all) or once per --add-dataset, in the same order")
    return values


def add_sources(paths: list[Path], formats: list[str], samples: list[int]) -> tuple:
    """--add-dataset/--add-format/--add-samples -> AddSource tuples (validated by the builder)."""
    from finqlora.dataset.mixture import AddSource

    if not paths:
        if formats or samples:
            raise FinqloraError("--add-format/--add-samples need --add-dataset", hint="e.g. --add-dataset finfe.json --add-format finfe")
        return ()
    if not formats:
        raise FinqloraError("--add-dataset needs --add-format", hint="one of finfe, cfbenchmark, fpb, disc, alpaca")
    formats = _one_each(formats, len(paths), "--add-format")
    counts: list = _one_each(samples, len(paths), "--add-samples") if samples else [None] * len(paths)
    return tuple(AddSource(Path(p), f, n) for p, f, n in zip(paths, formats, counts))


def build(
    db: Path = typer.Option(None, "--db", help="Event store (SQLite). Omit it to build from the built-in templates only.", show_default=False),
    output: Path = typer.Option(Path("data/qlora/instructions.jsonl"), "--output", "-o", help="Dataset file (JSONL); the card (.card.md) and stats (.stats.json) go beside it."),
    num_samples: int = typer.Option(300, "--num-samples", "--num_samples", "-n", help="Number of records to build."),
    mix: str = typer.Option("60,20,20", "--mix", help="Shares of news_impact, market_analysis, report_qa."),
    split: str = typer.Option("80,10,10", "--split", help="Shares of train, val, test (by event time)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed and database give byte-identical files."),
    output_format: str = typer.Option("alpaca", "--format", help="alpaca (instruction/input/output) or messages (OpenAI chat)."),
    templates_only: bool = typer.Option(False, "--templates-only", help="Ignore the database and use the built-in templates."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Model whose tokenizer measures lengths (local folder, .gguf, builtin:...); default: a character-based estimate.", show_default=False),
    max_length: int = typer.Option(512, "--max-length", help="Training max length in tokens; longer inputs are trimmed (outputs are kept)."),
    primary_window: int = typer.Option(15, "--primary-window", help="Post-event window (minutes) whose return sets the direction label."),
    primary_ticker: str = typer.Option(None, "--primary-ticker", help="Ticker whose direction is the record's main label (default XAUUSD if present, else the one with most returns).", show_default=False),
    threshold_k: float = typer.Option(0.5, "--threshold-k", help="Direction threshold = k x robust volatility of the ticker at the window."),
    dedup_threshold: float = typer.Option(0.7, "--dedup-threshold", help="3-gram Jaccard similarity at which two news texts are near-duplicates."),
    embargo_min: int = typer.Option(120, "--embargo-min", help="Leave out events this many minutes after a split boundary."),
    tz: str = typer.Option(None, "--tz", help="Zone of a user database's time column written without one (e.g. Asia/Shanghai).", show_default=False),
    add_dataset: list[Path] = typer.Option(None, "--add-dataset", help="Public data set to mix in (repeatable; see --add-format).", show_default=False),
    add_format: list[str] = typer.Option(None, "--add-format", help="finfe | cfbenchmark | fpb | disc | alpaca: one for all --add-dataset, or one each.", show_default=False),
    add_samples: list[int] = typer.Option(None, "--add-samples", help="Rows to take from each --add-dataset (one for all, or one each; default all).", show_default=False),
    decontaminate: list[Path] = typer.Option(None, "--decontaminate", help="Evaluation file whose items no record may duplicate (repeatable).", show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress spinner or summary table."),
) -> None:
    """Build the instruction dataset (news impact, market analysis, report Q&A) from the event store."""
    from finqlora.dataset.builder import BuildConfig, build_dataset
    from finqlora.dataset.labels import LabelRules

    config = BuildConfig(
        output=output,
        db=db,
        num_samples=num_samples,
        mix=parse_shares(mix, "--mix"),
        split=parse_shares(split, "--split"),
        seed=seed,
        output_format=output_format,
        templates_only=templates_only,
        tokenizer=tokenizer,
        max_length=max_length,
        rules=LabelRules(primary_window=primary_window, threshold_k=threshold_k),
        primary_ticker=primary_ticker,
        dedup_threshold=dedup_threshold,
        embargo_min=embargo_min,
        naive_tz=tz,
        progress=not quiet,
        add=add_sources(add_dataset or [], add_format or [], add_samples or []),
        decontaminate=tuple(decontaminate or ()),
    )
    result = build_dataset(config)
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
    from finqlora.dataset.builder import preview_records

    records = preview_records(file, n)
    if not records:
        raise FinqloraError(f"{file} holds no records", hint="build one with `finqlora build --output FILE`")
    for number, record in enumerate(records, 1):
        console.print(_record_panel(record, number), highlight=False)


def register(app: typer.Typer) -> None:
    """Add `finqlora build` and the `finqlora data` group to the root app."""
    from finqlora.dataset.teacher import add_teacher_options  # --teacher/--teacher-model (serving area)

    app.command("build")(add_teacher_options(build))
    app.add_typer(data_app)
