"""`finqlora config`: check a run config, write the defaults, translate a LLaMA-Factory YAML."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer
import yaml
from pydantic import ValidationError
from rich.text import Text

from finqlora.cli.console import make_console, styled
from finqlora.core.config import RunConfig
from finqlora.core.errors import FinqloraError

config_app = typer.Typer(name="config", help="Check, write and translate run configs (YAML).", no_args_is_help=True)
console = make_console()
err_console = make_console(stderr=True)


@config_app.command("check")
def check(
    config: Path = typer.Argument(..., help="Run config YAML."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key as `finqlora run` would (repeatable)."),
) -> None:
    """Print the resolved config (every key, defaults filled in) and its problems; exit 1 if there are any."""
    from finqlora.core.config import apply_overrides, dump_config, read_config_mapping, validation_problems

    raw = apply_overrides(read_config_mapping(config), overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            resolved = RunConfig.model_validate(raw)
            problems, hint = [], None
        except ValidationError as exc:
            resolved = None
            problems, hint = validation_problems(exc)
    problems += _missing_files(resolved) if resolved else []
    console.print(dump_config(resolved) if resolved else yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), highlight=False, markup=False)
    for warning in caught:
        err_console.print(Text.assemble(("deprecated: ", "yellow"), str(warning.message)), highlight=False)
    if problems:
        for problem in problems:
            err_console.print(Text.assemble(("problem: ", "red"), problem), highlight=False, soft_wrap=True)
        if hint:
            err_console.print(Text.assemble(("hint: ", "yellow"), hint), highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    err_console.print(styled(("ok:", "green"), f" {config}"), highlight=False)


def _missing_files(config: RunConfig) -> list[str]:
    """Paths the stages will read that are not there (a stage would fail on them later)."""
    from finqlora.core.records import split_dataset_info

    paths = {"data.db": None if config.data.db == "sample" else config.data.db, "train.dataset": config.train.dataset}
    paths.update({f"data.add[{i}].path": entry.path for i, entry in enumerate(config.data.add)})
    paths.update({f"data.decontaminate[{i}]": path for i, path in enumerate(config.data.decontaminate)})
    paths.update({f"eval.benchmarks[{i}].path": entry.path for i, entry in enumerate(config.eval.benchmarks)})
    problems = []
    for key, path in paths.items():
        named = split_dataset_info(path) if path else None
        if path and not (named[0] if named else Path(path)).exists():
            problems.append(f"{key}: {path} does not exist")
    return problems


@config_app.command("init")
def init(
    file: Path = typer.Argument(..., help="Where to write the config (YAML)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Write a run config with every key at its default (edit it, then `finqlora run --config FILE`)."""
    from finqlora.core.config import dump_config
    from finqlora.core.fileio import atomic_write_text

    if file.exists() and not force:
        raise FinqloraError(f"{file} exists", hint="pass --force to replace it, or choose another file name")
    header = "# finqlora run config: every key at its default (docs/training.md describes each).\n"
    atomic_write_text(file, header + dump_config(RunConfig()))
    console.print(styled(("wrote", "green"), f" {file}"), highlight=False)


@config_app.command("from-llamafactory")
def from_llamafactory_command(
    file: Path = typer.Argument(..., help="LLaMA-Factory training YAML (e.g. examples/train_lora/llama3_lora_sft.yaml)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write our run config here (default: print it)."),
) -> None:
    """Translate a LLaMA-Factory training YAML into a finqlora run config; list what has no equivalent."""
    from finqlora.core.config import config_from_mapping, dump_config, read_config_mapping
    from finqlora.core.fileio import atomic_write_text
    from finqlora.core.llamafactory import from_llamafactory

    mapping, missing = from_llamafactory(read_config_mapping(file))
    config = config_from_mapping(mapping, origin=f"translated from {file}")
    lines = [f"# Translated from the LLaMA-Factory config {file.name} by `finqlora config from-llamafactory`."]
    lines += ["# No equivalent here (left out):"] + [f"#   {line}" for line in missing] if missing else []
    text = "\n".join(lines) + "\n" + dump_config(config)
    if output is None:
        console.print(text, highlight=False, markup=False)
    else:
        atomic_write_text(output, text)
        console.print(styled(("wrote", "green"), f" {output}"), highlight=False)
    for line in missing:
        err_console.print(Text.assemble(("no equivalent: ", "yellow"), line), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app)
