"""Bounded readers for JSON, YAML and CSV that come from outside finqlora.

Python's parsers trust their input. A line of 100k `[` recurses until RecursionError; an
integer of more than 4,300 digits raises a bare ValueError (`sys.int_info`'s default limit,
which stays as it is); a 378-byte YAML alias bomb composes instantly but expands to billions
of nodes as soon as anything walks it (validation, an error message quoting the value); and
`csv` stops at a field over 131,072 characters. Every reader of such input in finqlora goes
through this module, which turns each case into an `InputError`: a ValueError whose text says
in a few words what was wrong, for the caller to wrap in a FinqloraError naming the file and
line.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from finqlora.core.errors import FinqloraError

# Deeper than any record, config or cache finqlora writes or reads (they nest 2-5 levels), and
# far below the interpreter's recursion limit, so walking a parsed value never recurses too deep.
MAX_DEPTH = 64
# Nodes of a YAML document counted with every alias expanded: a run config has about a hundred.
MAX_YAML_NODES = 10_000
# A CSV cell may hold a long article, but not more than this (csv's own default is 131,072).
MAX_CSV_FIELD_CHARS = 16 * 1024 * 1024


# A \uD800-\uDFFF escape: legal JSON, but alone it is half a UTF-16 pair, not text, and
# SQLite and UTF-8 files cannot store it.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class InputError(ValueError):
    """Input that is malformed or over a bound; the text says which, in a few words."""


class YAMLLimitError(yaml.YAMLError):
    """A YAML document over a bound (depth, expanded size, integer digits). A YAMLError, so
    callers that already catch malformed YAML catch this too."""


def _digits_problem(exc: ValueError) -> str | None:
    """The reason for Python's int-digits limit error, else None."""
    if "digits" in str(exc) and "integer" in str(exc):
        return f"an integer of more than {sys.get_int_max_str_digits():,} digits"
    return None


def _too_deep(value: Any, max_depth: int) -> bool:
    """True when lists/dicts in `value` nest deeper than `max_depth` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def json_loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` with the bounds above; any problem is an InputError.

    Its text is the decoder's message with the position (`Expecting value at column 5`),
    `nested deeper than 64 levels`, `an integer of more than 4,300 digits` or `a lone
    surrogate ...` (a \\ud800 escape without its pair).
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}" if exc.lineno > 1 else f"column {exc.colno}"
        raise InputError(f"{exc.msg} at {where}") from None
    except RecursionError:
        raise InputError(f"nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 (byte {exc.start})") from None
    except ValueError as exc:
        raise InputError(_digits_problem(exc) or str(exc)[:120]) from None
    # A count of brackets no larger than the bound cannot nest deeper: skip the walk.
    if isinstance(text, bytes):
        brackets = text.count(b"[") + text.count(b"{")
    else:
        brackets = text.count("[") + text.count("{")
    if brackets > max_depth and _too_deep(value, max_depth):
        raise InputError(f"nested deeper than {max_depth} levels")
    pattern = _SURROGATE_ESCAPE_BYTES if isinstance(text, bytes) else _SURROGATE_ESCAPE
    if pattern.search(text):  # pairs (emoji) decode to one character and pass
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            char = exc.object[exc.start]
            raise InputError(f"a lone surrogate \\u{ord(char):04x} (half of a UTF-16 pair, not text)") from None
    return value


def read_json_file(path: str | Path, *, what: str = "file", hint: str | None = None, max_bytes: int | None = None) -> Any:
    """A whole JSON file, bounded (and at most `max_bytes` long when given); a FinqloraError
    naming the file for anything unreadable."""
    file = Path(path)
    hint = hint or f"fix or replace the {what}"
    try:
        size = file.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise FinqloraError(f"the {what} {file} is {size:,} bytes, more than the {max_bytes:,} allowed", hint=hint)
        data = file.read_bytes()
    except OSError as exc:
        raise FinqloraError(f"cannot read {what} {file}: {exc.strerror or exc}", hint=hint) from None
    try:
        return json_loads(data)
    except InputError as exc:
        raise FinqloraError(f"{file}: not a valid JSON {what} ({exc})", hint=hint) from None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents nested deeper than MAX_DEPTH or larger than
    MAX_YAML_NODES with aliases expanded, before anything is constructed from them."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise YAMLLimitError(f"nested deeper than {MAX_DEPTH} levels (line {line})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node


def _expanded_size(root: yaml.Node) -> int:
    """Nodes under `root` counting each alias as a full copy; YAMLLimitError over the bound.

    Sizes are memoized per node, so a bomb is measured in time linear in its text; depth is
    already bounded by the loader, so the recursion is shallow.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise YAMLLimitError("an alias refers to a node that contains it (a recursive structure)")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > MAX_YAML_NODES:
            raise YAMLLimitError(
                f"expands to more than {MAX_YAML_NODES:,} values (aliases counted in full; an alias bomb?)"
            )
        sizes[key] = total
        return total

    return size(root)


def yaml_load(text: str) -> Any:
    """The one YAML reader of finqlora (configs, --set values, job configs, run folders).

    yaml.safe_load with bounded depth and expanded size. Raises yaml.YAMLError (a
    YAMLLimitError for a bound) for anything unreadable.
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise YAMLLimitError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # the constructor's int(): more than 4,300 digits
        problem = _digits_problem(exc)
        if problem is None:
            raise
        raise YAMLLimitError(problem) from None


def csv_rows(reader: Iterable[Any], file: str | Path, *, hint: str = "fix that line; nothing was stored") -> Iterator[tuple[int, Any]]:
    """(line number, row) for each row of a csv reader (or DictReader), with fields of up to
    MAX_CSV_FIELD_CHARS characters; a csv error is a FinqloraError naming the file and line."""
    csv.field_size_limit(MAX_CSV_FIELD_CHARS)
    iterator = iter(reader)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except csv.Error as exc:
            line = getattr(reader, "line_num", None)
            if "field larger than field limit" in str(exc):
                problem = f"a field of more than {MAX_CSV_FIELD_CHARS:,} characters"
            else:
                problem = f"not valid CSV ({exc})"
            raise FinqloraError(f"{file}, line {line}: {problem}", hint=hint) from None
        yield reader.line_num, row  # type: ignore[attr-defined]
