"""`finqlora doctor [--json]`: check this machine for training and serving (library: finqlora.doctor.checks)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from finqlora.cli.console import make_console, styled

_MARKS = {"ok": ("✓", "green"), "warn": ("!", "yellow"), "fail": ("✗", "red"), "info": ("·", "blue")}


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts and notebooks)."),
    output_dir: Path = typer.Option(Path("."), "--output-dir", help="Where you will write runs (its free disk space is checked)."),
    no_network: bool = typer.Option(False, "--no-network", help="Skip the Hugging Face hub probe."),
) -> None:
    """Can training and serving run here? One line per check, with the command that fixes it.

    Exits 1 when training cannot run as intended (a red line), 0 otherwise.
    """
    from finqlora.doctor.checks import run_doctor

    report = run_doctor(output_dir, check_network=not no_network)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
        raise typer.Exit(report.exit_code)

    from rich.table import Table

    console = make_console()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True, style="bold")
    table.add_column(overflow="fold")
    for check in report.checks:
        text = styled(check.summary)
        if check.fix and check.status in ("fail", "warn"):
            text = styled(check.summary, "\n", ("fix:", "dim"), " ", (check.fix, "cyan"))
        table.add_row(styled(_MARKS[check.status]), check.name, text)
    console.print(table, highlight=False)
    console.print()
    console.print(styled(("mode:", "bold"), f" {report.training_mode}"), highlight=False)
    console.print(styled(("works here:", "bold"), " " + "; ".join(report.works)), highlight=False)
    if report.does_not_work:
        console.print(styled(("not here:", "bold"), " " + "; ".join(report.does_not_work)), highlight=False)
    if not report.can_serve:
        console.print(styled(("serving (finqlora serve) cannot run: see the lines above", "yellow")))
    if report.can_train:
        console.print(styled(("training can run on this machine", "green")))
    else:
        console.print(styled(("training cannot run as intended: fix the red lines above", "red")))
    raise typer.Exit(report.exit_code)


def register(app: typer.Typer) -> None:
    """Add `finqlora doctor` to the root app."""
    app.command("doctor")(doctor)
