"""The CLI's consoles: printed data is never read as rich markup.

News sources, tickers, ids, paths, reasons and error messages come from users' files and
arguments. rich reads `[/x]` in a printed string as a closing tag (a MarkupError: a traceback)
and `[red]` as a style, so every console of the CLI is made here with markup off, and styles
are given as separate pieces with `styled`, never inside the text.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text


def make_console(*, stderr: bool = False) -> Console:
    """A console that prints strings as they are (markup off; highlighting stays on)."""
    return Console(stderr=stderr, markup=False)


def styled(*parts: str | tuple[str, str]) -> Text:
    """Text from pieces: a plain string, or (text, style) such as ("error:", "bold red")."""
    return Text.assemble(*parts)
