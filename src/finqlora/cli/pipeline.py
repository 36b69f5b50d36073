"""`finqlora run`: the whole workflow, database to report, in one run folder."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from finqlora.cli.console import make_console, styled
from finqlora.pipeline.engine import STAGES, RunResult, run_pipeline
from finqlora.pipeline.stages import headline, make_stages

console = make_console()


def _print_summary(result: RunResult) -> None:
    table = Table(title=f"run '{result.config.name}' in {result.paths.root}", show_lines=False)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for outcome in result.stages:
        style = "green" if outcome.status == "ran" else "dim"
        table.add_row(outcome.name, styled((outcome.status, style)), f"{outcome.seconds:.1f}")
    console.print(table)

    root = result.paths.root
    where = {
        "adapter": root / "adapter_model.safetensors",
        "loss curve": root / "loss.png",
        "report": result.paths.report_dir / "report.html",
        "metrics": result.paths.eval_dir / "metrics.json",
    }
    for label, path in where.items():
        if path.exists():
            console.print(f"  {label:<11} {path}")
    if result.headline:
        numbers = Table(title="before -> after fine-tuning (test split)")
        for column in ("metric", "base", "fine-tuned", "delta", "verdict"):
            numbers.add_column(column)
        for row in result.headline.values():
            numbers.add_row(
                str(row.get("name", row.get("key"))),
                _fmt(row.get("base")),
                _fmt(row.get("finetuned")),
                _fmt(row.get("delta"), signed=True),
                str(row.get("verdict", "")),
            )
        console.print(numbers)


def _fmt(value: object, *, signed: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def run_command(
    config: Path = typer.Option(Path("configs/demo-cpu.yaml"), "--config", "-c", help="Run config (YAML): data, train and eval sections."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set train.num_epochs=1 (repeatable)."),
    start: str | None = typer.Option(None, "--from", help=f"Rerun this stage and every later one ({', '.join(STAGES)})."),
    only: str | None = typer.Option(None, "--only", help="Run just this stage (it must have its inputs)."),
    force: bool = typer.Option(False, "--force", help="Rerun every stage even if its inputs are unchanged."),
) -> None:
    """Run the whole workflow: database -> check -> build -> eval base -> train -> eval fine-tuned -> report.

    Stages whose inputs did not change are skipped; an interrupted training resumes.
    """
    from finqlora.core.config import load_config

    cfg = load_config(config, overrides)
    result = run_pipeline(
        cfg,
        make_stages,
        start=start,
        only=only,
        force=force,
        log=lambda line: console.print(line, highlight=False, markup=False),
        headline=headline,
    )
    _print_summary(result)


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
