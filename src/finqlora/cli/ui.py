"""`finqlora ui`: the local web app (compare, runs, blind rating)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from finqlora.cli.console import make_console, styled

console = make_console()


def ui_command(
    run: list[Path] = typer.Option([], "--run", "-r", help="A run folder (repeatable); its adapter is served under the folder's name."),
    runs_root: Path = typer.Option(Path("runs"), help="Every run folder in here is listed on the Runs page too."),
    model: str | None = typer.Option(None, "--model", "-m", help="Base model (default: the one the --run adapters were trained on)."),
    no_model: bool = typer.Option(False, "--no-model", help="Do not load a model (Runs and rating pages only; starts in about a second)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; keep the default and use an SSH tunnel to reach it from elsewhere."),
    port: int = typer.Option(7860, min=0, max=65535, help="TCP port (0 = any free port)."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="A Host name the app is reached by, besides 127.0.0.1, localhost, ::1 and --host (repeatable; '*' = any). Other names get 400 (DNS rebinding)."),
    owner_token_file: Path | None = typer.Option(None, help="File with the owner's token (default: a new random token each start)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    chat_template: str | None = typer.Option(None, help="'chatml' for base models without a chat template."),
) -> None:
    """Serve the web app: base vs fine-tuned side by side, run progress, blind A/B rating."""
    from finqlora.serve.server import read_api_key
    from finqlora.ui.launch import deepseek_client, explicit_runs, load_engine, make_state, serve_ui

    started = time.perf_counter()
    runs = explicit_runs(run)
    token = read_api_key(owner_token_file) if owner_token_file else None
    engine = None
    if not no_model:
        with console.status("loading the model and adapters ..."):
            engine = load_engine(model, runs, device=device, dtype=dtype, chat_template=chat_template)
        if engine is None:
            console.print(styled(("no model loaded", "yellow"), " (no --model and no --run with an adapter): the Compare page stays empty"))
    state = make_state(runs=run, runs_root=runs_root, engine=engine, owner_token=token, deepseek=deepseek_client())
    serve_ui(state, host=host, port=port, allowed_hosts=allowed_host, started=started, log=lambda line: console.print(line, highlight=False, markup=False))


def register(app: typer.Typer) -> None:
    app.command("ui")(ui_command)
