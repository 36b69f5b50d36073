"""One exception type for every failure a user can fix.

The CLI prints `FinqloraError`s as a red message plus the hint (what to do), without a
traceback, and exits with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FinqloraError(Exception):
    """A problem with the user's input or environment, with a hint on how to fix it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  -> {self.hint}"
