"""Command-line flags as shorthands for run-config keys (one name and one default per setting).

A stage command takes `--config FILE` and `--set key=value` like `finqlora run`; each of its
dedicated flags names one key of the schema (finqlora.core.config) and has no default of its
own: a flag left out leaves the config's value, which is the schema's default unless the file
or a `--set` says otherwise. Given flags are assigned as typed values (no text round trip) and
win over the file and `--set`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from finqlora.core.config import SECTIONS, RunConfig, load_config


def schema_default(key: str) -> Any:
    """The schema's default of a dotted key such as `data.num_samples`."""
    section, name = key.split(".")
    return SECTIONS[section].model_fields[name].get_default(call_default_factory=True)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return "null" if value is None else str(value)


def key_option(key: str, *flags: str, help: str, **options: Any) -> Any:
    """A typer option for config key `key`: no default of its own; the help names the key and the schema's default."""
    return typer.Option(None, *flags, help=f"{help} (config {key}, default {_shown(schema_default(key))})", show_default=False, **options)


CONFIG_OPTION = typer.Option(None, "--config", "-c", help="Run config YAML (`finqlora config init FILE` writes one); the schema's defaults apply without one.")
SET_OPTION = typer.Option([], "--set", help="Override a config key, e.g. --set data.mix=50,30,20 (repeatable).")


def resolve(config: Path | None, overrides: list[str] | None, flags: dict[str, Any]) -> RunConfig:
    """The run config from the file, then `--set`, then the given flags (dotted key -> typed value; None = not given)."""
    return load_config(config, overrides, values={key: value for key, value in flags.items() if value is not None})
