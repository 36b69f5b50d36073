"""Every `finqlora` module path the docs name still exists.

Read at test time: docs/*.md, README.md, README.zh-CN.md and the cells of notebooks/*.ipynb.

The rule for what counts as a module path:
- a dotted name `finqlora.a`, `finqlora.a.b`, ... of Python identifiers, anywhere in the text
  (prose, inline code, code blocks);
- not when the character just before it is a letter, digit, `_`, `.`, `/`, `\\`, `~`, `-`, `@`
  or `:`: that is part of a file path or an address (`data/finqlora.db`,
  `github.com/you/finqlora.git`, `~/.finqlora`);
- not a two-part name whose second part is a file extension (`finqlora.db`, `finqlora.yaml`):
  that is a file name;
- not in the first column of a Markdown table whose first header cell is `old import`
  (docs/architecture.md keeps there, on purpose, the names that were removed).

A path resolves when its longest importable prefix is a module and each remaining part is an
attribute of what precedes it (`finqlora.evaluate.metrics.mcnemar`). In `from finqlora.x import
a, b` each imported name must also be an attribute or submodule of `finqlora.x`.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FILE_EXTENSIONS = {"db", "sqlite", "yaml", "yml", "json", "jsonl", "toml", "md", "txt", "csv", "html", "png", "zip", "gguf", "git", "lock", "log"}
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
DOTTED_PATH = re.compile(rf"(?<![A-Za-z0-9_./\\~\-@:])finqlora(?:\.{_IDENT})+")
FROM_IMPORT = re.compile(rf"\bfrom\s+(finqlora(?:\.{_IDENT})*)\s+import\s+(\([^)]*\)|[^\n#]+)")
OLD_NAMES_HEADER = "old import"


def _doc_texts() -> dict[str, str]:
    """Each documentation file's text by its path relative to the repository."""
    paths = sorted((REPO_ROOT / "docs").glob("*.md")) + [REPO_ROOT / "README.md", REPO_ROOT / "README.zh-CN.md"]
    texts = {str(p.relative_to(REPO_ROOT)): p.read_text(encoding="utf-8") for p in paths if p.exists()}
    for notebook in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        texts[str(notebook.relative_to(REPO_ROOT))] = "\n".join("".join(cell["source"]) for cell in cells)
    return texts


def _without_old_names_column(text: str) -> str:
    """Blank the first cell of each row of a table headed `old import` (names removed on purpose)."""
    lines = text.splitlines()
    in_old_table = False
    for i, line in enumerate(lines):
        cells = line.split("|")
        if not line.lstrip().startswith("|") or len(cells) < 3:
            in_old_table = False
            continue
        if cells[1].strip().lower() == OLD_NAMES_HEADER:
            in_old_table = True
        elif in_old_table:
            lines[i] = "|".join([cells[0], " ", *cells[2:]])
    return "\n".join(lines)


def named_paths(text: str) -> list[tuple[int, str]]:
    """(line number, dotted name) for every module path `text` names, by the rule above."""
    text = _without_old_names_column(text)
    found: list[tuple[int, str]] = []
    for match in DOTTED_PATH.finditer(text):
        parts = match.group(0).split(".")
        if len(parts) == 2 and parts[1] in FILE_EXTENSIONS:
            continue
        found.append((text.count("\n", 0, match.start()) + 1, match.group(0)))
    for match in FROM_IMPORT.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        names = match.group(2).strip("() \t\n").replace("\n", " ")
        for name in (n.strip().split(" as ")[0].strip() for n in names.split(",")):
            if re.fullmatch(_IDENT, name):
                found.append((line, f"{match.group(1)}.{name}"))
    return found


def resolves(path: str) -> bool:
    """Whether `path` is a module, or a module followed by attributes of it."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            target: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise  # the module exists but one of its own imports is missing: a real error
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def test_every_module_path_in_the_docs_resolves() -> None:
    texts = _doc_texts()
    assert "docs/architecture.md" in texts and "README.md" in texts
    stale = [f"{doc}:{line}: {path}" for doc, text in texts.items() for line, path in sorted(named_paths(text)) if not resolves(path)]
    assert not stale, "module paths in the docs that do not exist (name the module as it is now):\n" + "\n".join(stale)


def test_the_rule_flags_a_stale_path_and_skips_file_names() -> None:
    """The checker must catch what it is for, and leave file paths and removed-name records alone."""
    text = (
        "Export with `finqlora.gguf_export` (`finqlora.export.gguf.export_gguf`); the store is data/finqlora.db,\n"
        "or `finqlora.db` in the cwd; clone github.com/you/finqlora.git.\n"
        "from finqlora.evaluate.metrics import mcnemar, no_such_metric\n"
        "\n"
        "| old import | new import |\n"
        "| --- | --- |\n"
        "| `finqlora.metrics` | `finqlora.evaluate.metric` |\n"
    )
    paths = named_paths(text)
    assert [p for _, p in paths] == [
        "finqlora.gguf_export",
        "finqlora.export.gguf.export_gguf",
        "finqlora.evaluate.metrics",
        "finqlora.evaluate.metric",
        "finqlora.evaluate.metrics.mcnemar",
        "finqlora.evaluate.metrics.no_such_metric",
    ]
    assert [line for line, p in paths if p == "finqlora.evaluate.metric"] == [7]
    stale = [p for _, p in paths if not resolves(p)]
    assert stale == ["finqlora.gguf_export", "finqlora.evaluate.metric", "finqlora.evaluate.metrics.no_such_metric"]
