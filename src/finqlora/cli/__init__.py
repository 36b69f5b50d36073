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
from finqlora.cli.console import make_console, styled
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import WRITE_ERRNOS, write_error

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
    err = make_console(stderr=True)
    try:
        app(args=argv, standalone_mode=True)
    except OSError as exc:
        # A folder that cannot be written or a full disk anywhere below (run folders, -o
        # paths, exports): the user's to fix, so an error naming the path, not a traceback.
        if exc.errno not in WRITE_ERRNOS:
            raise
        _print_error(err, write_error(exc, exc.filename))
        sys.exit(2)
    except FinqloraError as exc:
        _print_error(err, exc)
        sys.exit(2)


def _print_error(err: Console, exc: FinqloraError) -> None:
    # soft_wrap: no line breaks inserted, so a long file path in the message stays one piece
    # (copyable, and findable by scripts) however narrow the terminal. The message quotes
    # data (paths, values, YAML): printed as text, never as markup.
    err.print(styled(("error:", "bold red"), " ", exc.message), highlight=False, soft_wrap=True)
    if exc.hint:
        err.print(styled(("hint:", "yellow"), " ", exc.hint), highlight=False, soft_wrap=True)
