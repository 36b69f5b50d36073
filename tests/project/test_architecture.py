"""The package's shape stays as docs/architecture.md draws it.

Checked with `ast` over src/finqlora, function-local imports included:
- every import between stage subpackages points down the layer order (so there are no cycles);
- the whole module graph has no cycle;
- no function or method is longer than 120 lines, and classes live at module level;
- no module outside `cli/` imports typer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "src" / "finqlora"

# Lower layers never import higher ones; a subpackage may import from itself and any lower layer.
LAYERS = {
    "core": 0,
    "store": 1,
    "models": 1,
    "dataset": 2,
    "doctor": 2,
    "train": 3,
    "evaluate": 3,
    "serve": 3,
    "export": 3,
    "report": 4,
    "pipeline": 5,
    "ui": 6,
    "cli": 7,
}
# Top-level modules: only the package's own __init__ and __main__.
TOP_LEVEL_RANK = 8
MAX_FUNCTION_LINES = 120


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _imported_modules(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Every finqlora module `name` imports, at any depth of the file, resolved to a known module."""
    package = name if name in known and _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("finqlora") and target != name:
                found.add(target)
    return found


def _is_package(name: str) -> bool:
    return (PACKAGE_ROOT.parent / Path(*name.split(".")) / "__init__.py").exists()


def _rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP_LEVEL_RANK + 1  # the package itself: only __version__ is imported from it
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return TOP_LEVEL_RANK


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imported_modules(name, tree, known) for name, tree in modules.items()}


def test_every_module_sits_in_a_stage_subpackage() -> None:
    """The old flat names (and their five compatibility aliases) were removed: docs/architecture.md."""
    allowed_top = {"finqlora", "finqlora.__main__"}
    stray = [m for m in _modules() if m.count(".") == 1 and m.split(".")[1] not in LAYERS and m not in allowed_top]
    assert not stray, f"modules outside the stage subpackages: {stray}"


def test_imports_only_point_down_the_layers() -> None:
    upward = []
    for module, imported in _graph().items():
        for target in imported:
            if target == "finqlora":
                continue  # `from finqlora import __version__`
            same_package = module.split(".")[:2] == target.split(".")[:2]
            if not same_package and _rank(target) >= _rank(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_counting_function_local_imports() -> None:
    graph = _graph()
    graph = {m: {t for t in deps if t != "finqlora"} for m, deps in graph.items()}
    # A package's __init__ importing its own submodules is not a cycle of the design.
    visiting: set[str] = set()
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        visiting.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in visiting:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack)
        stack.pop()
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _imports_typer(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "typer" for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "typer":
            return True
    return False


def test_no_typer_below_the_cli() -> None:
    """Only `cli/` builds typer commands and options; every other module takes plain values."""
    below = [name for name, tree in _modules().items() if name.split(".")[:2] != ["finqlora", "cli"] and _imports_typer(tree)]
    assert not below, f"modules outside finqlora.cli that import typer: {sorted(below)}"
    # The check must see what it is for, function-local imports included.
    assert _imports_typer(ast.parse("def options():\n    import typer\n"))
    assert _imports_typer(ast.parse("from typer.models import OptionInfo\n"))
    assert not _imports_typer(ast.parse("from finqlora.cli import typer_help\n"))


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("limit", [MAX_FUNCTION_LINES])
def test_no_function_is_longer_than_the_limit(limit: int) -> None:
    long = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in _functions(tree):
            length = fn.end_lineno - fn.lineno + 1
            if length > limit:
                long.append(f"{path.relative_to(PACKAGE_ROOT)}:{fn.lineno} {fn.name} ({length} lines)")
    assert not long, f"functions over {limit} lines:\n" + "\n".join(long)


def test_classes_are_defined_at_module_level() -> None:
    nested = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in _functions(tree):
            for inner in ast.walk(fn):
                if isinstance(inner, ast.ClassDef):
                    nested.append(f"{path.relative_to(PACKAGE_ROOT)}:{inner.lineno} {inner.name} inside {fn.name}")
    assert not nested, "classes defined inside functions:\n" + "\n".join(nested)


def test_the_checker_sees_a_function_local_upward_import(tmp_path: Path) -> None:
    """The checker itself must catch what it is for: an import hidden inside a function."""
    code = "def f():\n    from finqlora.report import report\n"
    tree = ast.parse(code)
    known = {"finqlora.report.report", "finqlora.evaluate.evaluation"}
    assert _imported_modules("finqlora.evaluate.evaluation", tree, known) == {"finqlora.report.report"}
    assert _rank("finqlora.report.report") > _rank("finqlora.evaluate.evaluation")


ARCHITECTURE_DOC = PACKAGE_ROOT.parents[1] / "docs" / "architecture.md"


def test_the_pipeline_engine_imports_no_stage() -> None:
    """The engine is given its stages (`run_pipeline(config, make_stages)`): it imports only core and its own package."""
    imported = _graph()["finqlora.pipeline.engine"]
    stray = sorted(t for t in imported if t != "finqlora" and not t.startswith(("finqlora.core", "finqlora.pipeline")))
    assert "finqlora.pipeline.stages" not in imported and not stray, f"pipeline.engine imports {stray or 'pipeline.stages'}"


def test_the_architecture_page_names_every_subpackage() -> None:
    doc = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    for package in LAYERS:
        assert (PACKAGE_ROOT / package / "__init__.py").exists(), f"LAYERS names {package}, which is not a subpackage"
        assert f"`{package}/`" in doc, f"docs/architecture.md does not place {package}/ in its table"


def test_the_checker_finds_a_cycle_and_a_nested_class() -> None:
    """The cycle and nested-class checks must fail on what they are for."""
    tree = ast.parse("def factory():\n    class Inner:\n        pass\n    return Inner\n")
    assert [n.name for fn in _functions(tree) for n in ast.walk(fn) if isinstance(n, ast.ClassDef)] == ["Inner"]
    known = {"finqlora.pipeline.engine", "finqlora.pipeline.stages"}
    engine = ast.parse("def run():\n    from finqlora.pipeline import stages\n")
    stages = ast.parse("from finqlora.pipeline.engine import Stage\n")
    assert _imported_modules("finqlora.pipeline.engine", engine, known) == {"finqlora.pipeline.stages"}
    assert _imported_modules("finqlora.pipeline.stages", stages, known) == {"finqlora.pipeline.engine"}
