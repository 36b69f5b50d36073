"""The `finqlora` command line: a thin layer over the library.

Each area of the tool has its own module in this package with a `register(app)` function
that adds its commands; this module only assembles them and turns `FinqloraError` into a
readable message and exit status 2.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from finqlora import __version__
from finqlora.core.errors import FinqloraError

# Order is the order of `finqlora --help`: the pipeline's stages first, then tools.
AREAS = ("pipeline", "db", "data", "train", "evaluate", "models", "serve", "ui", "export", "config", "doctor")

app = typer.Typer(
    name="finqlora",
    help="Finance news database -> instruction dataset -> QLoRA fine-tune -> evaluation -> OpenAI-compatible API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"finqlora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
) -> None:
    """finqlora: fine-tune a finance LLM from your own news and market-event database."""


for _area in AREAS:
    importlib.import_module(f"finqlora.cli.{_area}").register(app)


def main(argv: list[str] | None = None) -> None:
    err = Console(stderr=True)
    try:
        app(args=argv, standalone_mode=True)
    except FinqloraError as exc:
        # soft_wrap: no line breaks inserted, so a long file path in the message stays one piece
        # (copyable, and findable by scripts) however narrow the terminal.
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        if exc.hint:
            err.print(f"[yellow]hint:[/] {exc.hint}", highlight=False, soft_wrap=True)
        sys.exit(2)
