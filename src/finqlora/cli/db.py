"""`finqlora db ...`: create, check, fill and summarise the event store."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from finqlora.cli.console import make_console, styled
from finqlora.core.errors import FinqloraError

db_app = typer.Typer(
    name="db",
    help="The event store: a SQLite database of news events, price bars and event impacts.",
    no_args_is_help=True,
)
console = make_console()

DB_OPTION = typer.Option(..., "--db", help="Path of the SQLite database.", show_default=False)


def _parse_int_list(text: str, option: str) -> list[int]:
    if not text.strip():
        return []
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise FinqloraError(f"{option} expects comma-separated whole minutes, got {text!r}", hint=f"e.g. {option} 5,10,15,30,120") from None


def _parse_mapping(pairs: list[str], option: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise FinqloraError(f"{option} expects FIELD=COLUMN, got {pair!r}", hint=f"e.g. {option} content=text")
        name, column = pair.split("=", 1)
        mapping[name.strip()] = column.strip()
    return mapping


def _print_skipped(skipped: list, what: str) -> None:
    if not skipped:
        return
    console.print(styled((f"skipped {len(skipped)} {what}", "yellow"), " (first ones below)"))
    for row in skipped[:5]:
        console.print(f"  {row.file}, line {row.line}: {row.reason}", highlight=False)


@db_app.command("init")
def init(db: Path = DB_OPTION) -> None:
    """Create a new, empty store (events, event_impacts, prices, schema version)."""
    from finqlora.store.db import init_db

    init_db(db)
    console.print(f"created store {db}")


@db_app.command("check")
def check(
    db: Path = DB_OPTION,
    migrate: bool = typer.Option(False, "--migrate", help="Add what is missing (after making a backup next to the file)."),
    tz: str = typer.Option(None, "--tz", help="With --migrate: zone of a time column written without one (e.g. Asia/Shanghai)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Validate any database: list missing tables/columns and what each disables.

    Exits with status 1 when the pipeline cannot run on the database. The file is never
    changed unless --migrate is given, and then a backup is made first.
    """
    from finqlora.store.db import check_db, migrate_db

    report = check_db(db)
    if migrate and report.migratable:
        result = migrate_db(db, tz=tz)
        console.print(f"backup written to {result.backup}")
        for item in result.added:
            console.print(f"  added {item}")
        if result.times_filled:
            console.print(f"  filled ts_utc/published_at of {result.times_filled} events")
        report = check_db(db)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "path": report.path,
                    "ok": report.ok,
                    "schema_version": report.schema_version,
                    "time_column": report.time_column,
                    "counts": report.counts,
                    "problems": [p.__dict__ for p in report.problems],
                },
                ensure_ascii=False,
                indent=2,
            )
        )
    else:
        counts = ", ".join(f"{table}: {n:,}" for table, n in report.counts.items()) or "no tables"
        if report.damaged:
            console.print(f"{db}: damaged")
        else:
            console.print(f"{db}: {counts}; schema version {report.schema_version or 'none (not a finqlora store yet)'}")
        if report.time_column:
            console.print(f"publication time read from events.{report.time_column}")
        for problem in report.problems:
            colour = "red" if problem.severity == "fatal" else "yellow"
            console.print(styled((problem.severity, colour), f": {problem.describe()}"), highlight=False)
        if not report.problems:
            console.print(styled(("ok", "green"), ": everything finqlora needs is there"))
        elif not migrate and report.migratable:
            console.print(f"run `finqlora db check --db {db} --migrate` to add what is missing (a backup is made first)")
    if not report.ok:
        raise typer.Exit(1)


@db_app.command("ingest-news")
def ingest_news(
    files: list[Path] = typer.Argument(..., help="News files (.jsonl, .jsonl.gz, .csv).", show_default=False),
    db: Path = DB_OPTION,
    fmt: str = typer.Option("cls", "--format", help="cls (CLS slim/raw JSONL; also 东方财富/同花顺 slim files), jsonl or csv."),
    tz: str = typer.Option(None, "--tz", help="Zone of times written without one (e.g. Asia/Shanghai); required for such times."),
    mapping: list[str] = typer.Option([], "--map", help="FIELD=COLUMN for jsonl/csv (fields: id, time, content, title, source, star, importance, subjects, url, stocks). Repeatable."),
    source: str = typer.Option(None, "--source", help="Source name for jsonl/csv files without a source column."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed lines (counted and listed) instead of stopping."),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Link the same event told by several sources."),
    dedup_window: int = typer.Option(10, "--dedup-window", help="Minutes within which re-told events are looked for."),
    dedup_threshold: float = typer.Option(0.6, "--dedup-threshold", help="Text overlap (0-1) from which two flashes are the same event."),
) -> None:
    """Add news events; re-ingesting a file adds nothing."""
    from finqlora.store import ingest

    report = ingest.ingest_news(
        db,
        files,
        fmt=fmt,
        tz=tz,
        mapping=_parse_mapping(mapping, "--map"),
        source=source,
        skip_bad=skip_bad,
        dedup=dedup,
        dedup_window_min=dedup_window,
        dedup_threshold=dedup_threshold,
        progress=True,
    )
    sources = ", ".join(f"{name}: {n:,}" for name, n in sorted(report.by_source.items()))
    console.print(
        f"read {report.read:,} events ({sources}) from {len(report.files)} file(s): "
        f"{report.inserted:,} new, {report.already_present:,} already stored, {report.linked_duplicates:,} linked as cross-source duplicates"
    )
    _print_skipped(report.skipped, "lines")


@db_app.command("ingest-prices")
def ingest_prices(
    files: list[Path] = typer.Argument(..., help="OHLCV CSV files.", show_default=False),
    db: Path = DB_OPTION,
    ticker: str = typer.Option(..., "--ticker", help="Ticker the bars belong to, e.g. XAUUSD.", show_default=False),
    tz: str = typer.Option(None, "--tz", help="Zone of bar times written without one (e.g. UTC)."),
    columns: list[str] = typer.Option([], "--col", help="FIELD=COLUMN (fields: time, open, high, low, close, volume). Repeatable."),
) -> None:
    """Add OHLCV bars; re-ingesting a file adds nothing."""
    from finqlora.store import ingest
    from finqlora.store.db import iso_utc

    report = ingest.ingest_prices(db, ticker, files, tz=tz, columns=_parse_mapping(columns, "--col"), progress=True)
    span = f"{iso_utc(report.first_ts)} .. {iso_utc(report.last_ts)}" if report.first_ts is not None else "none"
    console.print(
        f"read {report.read:,} {ticker} bars from {len(report.files)} file(s): {report.inserted:,} new, "
        f"{report.already_present:,} already stored; stored span {span}"
    )
    _print_skipped(report.skipped, "rows (bad prices or repeated bars)")


@db_app.command("impacts")
def impacts(
    db: Path = DB_OPTION,
    tickers: str = typer.Option("", "--tickers", help="Comma-separated tickers (default: every ticker with bars)."),
    windows: str = typer.Option("5,10,15,30,120", "--windows", help="Post-event windows in minutes (stored as window_min = w)."),
    pre_windows: str = typer.Option("120", "--pre-windows", help="Pre-event windows in minutes (stored as window_min = -w); '' for none."),
    t0_tolerance: float = typer.Option(5, "--t0-tolerance", help="Max minutes between the event and its t0 bar."),
    end_tolerance: float = typer.Option(1, "--end-tolerance", help="Max minutes a window-end bar may lie before the window end."),
    recompute: bool = typer.Option(False, "--recompute", help="Recompute every event, not only new ones."),
) -> None:
    """Compute event-study returns (ret is a fraction: 0.0012 = +0.12%)."""
    from finqlora.store.impacts import compute_impacts

    report = compute_impacts(
        db,
        tickers=[t for t in tickers.replace(" ", "").split(",") if t] or None,
        windows=_parse_int_list(windows, "--windows"),
        pre_windows=_parse_int_list(pre_windows, "--pre-windows"),
        t0_tolerance_min=t0_tolerance,
        end_tolerance_min=end_tolerance,
        recompute=recompute,
        progress=True,
    )
    table = Table(title=f"event impacts ({report.seconds:.1f} s)")
    table.add_column("ticker")
    table.add_column("computed")
    table.add_column("already done")
    for window in report.windows:
        table.add_column(f"{window:+d} min" if window < 0 else f"{window} min", justify="right")
    for ticker in report.tickers:
        known = report.known_returns.get(ticker, {})
        table.add_row(ticker, f"{report.computed_events[ticker]:,}", f"{report.skipped_events[ticker]:,}", *(f"{known.get(w, 0):,}" for w in report.windows))
    console.print(table)
    for ticker, refreshed in report.refreshed_events.items():
        if refreshed:
            console.print(f"{ticker}: recomputed {refreshed:,} events whose windows reach bars ingested after their impacts were computed")
    console.print("cells: events with a known return; the others have ret NULL and a status (see `finqlora db stats`)")


@db_app.command("stats")
def stats(
    db: Path = DB_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Events by source, star and month; impact coverage; return distribution per window."""
    from finqlora.store.stats import store_stats

    result = store_stats(db)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return
    marker = (" (SYNTHETIC sample data)", "bold magenta") if result.synthetic else ""
    console.print(styled((str(db), "bold"), marker))
    console.print(
        f"{result.events:,} events ({result.primaries:,} primaries, {result.linked_duplicates:,} linked duplicates), "
        f"{result.first_event or '-'} .. {result.last_event or '-'}"
    )
    overview = Table(title="events")
    overview.add_column("by source")
    overview.add_column("n", justify="right")
    overview.add_column("by star")
    overview.add_column("n", justify="right")
    overview.add_column("by month")
    overview.add_column("n", justify="right")
    columns = [list(result.by_source.items()), list(result.by_star.items()), list(result.by_month.items())]
    for i in range(max((len(c) for c in columns), default=0)):
        cells: list[str] = []
        for column in columns:
            cells += [str(column[i][0]), f"{column[i][1]:,}"] if i < len(column) else ["", ""]
        overview.add_row(*cells)
    console.print(overview)
    for ticker, info in result.prices.items():
        console.print(f"prices {ticker}: {info['bars']:,} bars, {info['first']} .. {info['last']}")
    for ticker, windows in result.coverage.items():
        table = Table(title=f"impacts {ticker}: ret in % (stored as a fraction); negative window = pre-event")
        for name in ("window", "known", "coverage", "mean", "std", "p05", "median", "p95", "up"):
            table.add_column(name, justify="left" if name == "window" else "right")
        reasons = Table(title=f"impacts {ticker}: why a return is unknown (ret NULL)")
        statuses = sorted({s for entry in windows.values() for s in entry["by_status"] if s != "ok"})
        reasons.add_column("window")
        for status in statuses:
            reasons.add_column(status, justify="right")
        for window, entry in windows.items():
            dist = result.returns.get(ticker, {}).get(window)
            label = f"{window:+d}" if window < 0 else str(window)
            numbers = (
                (f"{dist.mean * 100:+.3f}", f"{dist.std * 100:.3f}", f"{dist.p05 * 100:+.3f}", f"{dist.median * 100:+.3f}", f"{dist.p95 * 100:+.3f}", f"{dist.share_up:.0%}")
                if dist
                else ("-",) * 6
            )
            table.add_row(label, f"{entry['known']:,}", f"{entry['coverage']:.1%}", *numbers)
            reasons.add_row(label, *(f"{entry['by_status'].get(s, 0):,}" for s in statuses))
        console.print(table)
        if statuses:
            console.print(reasons)
    console.print("no_t0_bar: no bar within the t0 tolerance before the event (market closed); no_end_bar: gap at the window end; pending: window ends after the last stored bar")


@db_app.command("sample")
def sample(
    db: Path = DB_OPTION,
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same database)."),
    events: int = typer.Option(420, "--events", help="Number of events of the main feed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Write a small deterministic SYNTHETIC sample store (news, XAUUSD/XAGUSD bars, impacts)."""
    from finqlora.store.sample_db import build_sample_db
    from finqlora.store.stats import store_stats

    build_sample_db(db, seed=seed, events=events, overwrite=overwrite)
    result = store_stats(db)
    console.print(
        f"wrote SYNTHETIC sample store {db}: {result.events:,} events ({result.linked_duplicates} linked duplicates), "
        + ", ".join(f"{t} {i['bars']:,} bars" for t, i in result.prices.items())
    )


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.add_typer(db_app)
