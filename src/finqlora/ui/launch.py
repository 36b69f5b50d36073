"""Putting `finqlora ui` together: which runs, which model, which token; then serve it."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finqlora.core.errors import FinqloraError
from finqlora.core.safe_input import yaml_load
from finqlora.serve.http_limits import LOOPBACK_HOSTS, allowed_hosts_for  # noqa: F401  (LOOPBACK_HOSTS: imported from here too)
from finqlora.ui.app import UIState, create_ui_app
from finqlora.ui.runs import is_run_folder

if TYPE_CHECKING:  # torch comes with the engine: `--no-model` starts without importing it
    from finqlora.serve.server import ServingEngine



def explicit_runs(folders: Sequence[Path]) -> dict[str, Path]:
    """--run folders by name (the folder's name); they must exist and be run or eval folders."""
    runs: dict[str, Path] = {}
    for folder in folders:
        path = Path(folder).expanduser().resolve()
        if not is_run_folder(path):
            raise FinqloraError(
                f"--run {folder}: not a run folder (no pipeline_state.json, training_info.json or items.jsonl)",
                hint="pass a folder written by `finqlora run`, `finqlora train` or `finqlora eval --output`",
            )
        if path.name in runs:
            raise FinqloraError(f"two --run folders are both named {path.name!r}", hint="rename one of them")
        runs[path.name] = path
    return runs


def base_model_of(run_dir: Path) -> str | None:
    """The base model a run was trained from (its run_config.yaml), if it says."""
    try:
        config = yaml_load((run_dir / "run_config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return None
    model = (config.get("train") or {}).get("model") if isinstance(config, dict) else None
    return str(model) if model else None


def adapters_of(runs: dict[str, Path]) -> dict[str, Path]:
    """The runs that hold a trained adapter, named like the run (its name selects it)."""
    return {name: folder for name, folder in runs.items() if (folder / "adapter_config.json").is_file()}


def base_name_for(adapters: dict[str, Path]) -> str:
    """The name the Compare page asks the base model by: `base`, unless a run folder is named
    so (then `base-model`, `base-model-2`, ...)."""
    candidates = ["base", "base-model", *(f"base-model-{n}" for n in range(2, len(adapters) + 3))]
    return next(name for name in candidates if name not in adapters)


def load_engine(model: str | None, runs: dict[str, Path], **load_options: Any) -> ServingEngine | None:
    """One base with every --run adapter; None when there is no model to load."""
    from finqlora.serve.server import ADAPTER_NAME, ServingEngine, check_adapter_dir

    adapters = adapters_of(runs)
    for name, folder in adapters.items():
        if not ADAPTER_NAME.match(name):  # the adapter is served under its folder's name
            raise FinqloraError(
                f"--run {folder}: the folder's name {name!r} cannot name a model (the Compare page asks the adapter by it)",
                hint="rename the folder to letters, digits, '.', '_' or '-' (at most 64 characters, starting with a letter or digit)",
            )
        check_adapter_dir(name, folder)
    if model is None:
        bases = {base for base in (base_model_of(folder) for folder in adapters.values()) if base}
        if len(bases) > 1:
            raise FinqloraError(
                f"the --run adapters were trained on different base models: {', '.join(sorted(bases))}",
                hint="start one `finqlora ui` per base model, or pass --model to choose the base",
            )
        model = next(iter(bases), None)
    if model is None:
        if adapters:
            raise FinqloraError("cannot tell the adapters' base model (no run_config.yaml)", hint="pass --model")
        return None
    return ServingEngine.load(model, adapters, base_name=base_name_for(adapters), **load_options)


def deepseek_client(env: dict[str, str] | None = None) -> Any:
    """The DeepSeek column's client when DEEPSEEK_API_KEY is set, else None."""
    env = dict(os.environ) if env is None else env
    if not env.get("DEEPSEEK_API_KEY", "").strip():
        return None
    from finqlora.models.client import FinLLMClient

    return FinLLMClient.from_env("deepseek", fallback="none", env=env)


def make_state(
    *,
    runs: Sequence[Path] = (),
    runs_root: Path = Path("runs"),
    engine: ServingEngine | None = None,
    owner_token: str | None = None,
    deepseek: Any = None,
    workdir: Path | None = None,
) -> UIState:
    return UIState(
        owner_token=owner_token or secrets.token_urlsafe(24),
        runs_root=Path(runs_root).resolve(),
        explicit_runs=explicit_runs(runs),
        workdir=(workdir or Path.cwd()).resolve(),
        engine=engine,
        deepseek=deepseek,
    )


def serve_ui(
    state: UIState,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    allowed_hosts: Sequence[str] = (),
    started: float | None = None,
    log: Any = print,
) -> None:
    """Run the app in the foreground until Ctrl+C; prints the owner's login link. `allowed_hosts`
    are extra `Host` names to answer besides loopback and `host` (see `allowed_hosts_for`)."""
    import uvicorn

    from finqlora.serve.server import is_loopback

    if not is_loopback(host):
        log(f"warning: binding {host}: anyone who can reach it and holds a token gets in; prefer 127.0.0.1 and an SSH tunnel")
    app = create_ui_app(state, allowed_hosts=allowed_hosts_for(host, allowed_hosts))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()[1]
        elapsed = f" (ready in {time.perf_counter() - started:.1f} s)" if started is not None else ""
        log(f"finqlora ui{elapsed}: open http://{shown}:{bound}/login?token={state.owner_token}")

    async def main() -> None:
        await asyncio.gather(server.serve(), announce())

    asyncio.run(main())
