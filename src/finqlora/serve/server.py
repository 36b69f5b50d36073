"""An OpenAI-compatible API over one base model with several LoRA adapters.

`create_app(engine, api_key=...)` builds the FastAPI app over a `ServingEngine`
(`finqlora.serve.engine`: the base loaded once, every adapter attached, one batcher). The
routes live in `finqlora.serve.routes`, the request and response bodies in
`finqlora.serve.schemas`, the body size and time limits in `finqlora.serve.http_limits`.

Endpoints: `POST /v1/chat/completions` (plain and SSE streaming), `POST /v1/completions`,
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`. Every error, including malformed
JSON, wrong types and over-large or late bodies, is answered with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` and a 4xx status (5xx only for bugs and
out-of-memory).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from finqlora.core.errors import FinqloraError
from finqlora.serve.api_errors import APIError, install_error_handlers
from finqlora.serve.engine import ADAPTER_NAME, ServingEngine, attach_adapters, check_adapter_dir
from finqlora.serve.http_limits import LOOPBACK_HOSTS, HostGuard, HTTPLimits, RequestBodyGuard, allowed_hosts_for
from finqlora.serve.routes import refine_openapi, router
from finqlora.serve.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest

# Imported by users and the UI from here since before the split into modules.
__all__ = [
    "ADAPTER_NAME", "APIError", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "HTTPLimits",
    "RunningServer", "ServingEngine", "attach_adapters", "check_adapter_dir", "check_api_key", "check_bind", "create_app",
    "is_loopback", "read_api_key", "serve", "start_in_thread", "vllm_command",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    if app.state.shutdown_engine:
        app.state.engine.shutdown()


def create_app(
    engine: ServingEngine,
    *,
    api_key: str | None,
    shutdown_engine: bool = True,
    http_limits: HTTPLimits | None = None,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
) -> FastAPI:
    """The FastAPI app over a loaded engine. `api_key=None` means no auth (loopback only,
    which the runner enforces); `shutdown_engine` stops the batcher when the app stops;
    `http_limits` bounds each request's body size and arrival time (defaults: 1 MiB, 30 s);
    `allowed_hosts` are the `Host` names answered (default: loopback; `allowed_hosts_for`
    gives them for a bind address; None = any, for an app mounted in one that checks)."""
    app = FastAPI(
        title="finqlora OpenAI-compatible API",
        version="1",
        lifespan=_lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.engine = engine
    app.state.api_key = api_key
    app.state.shutdown_engine = shutdown_engine
    install_error_handlers(app)
    app.include_router(router)
    refine_openapi(app)
    app.add_middleware(RequestBodyGuard, limits=http_limits or HTTPLimits())
    if allowed_hosts is not None:
        app.add_middleware(HostGuard, allowed_hosts=allowed_hosts)  # outermost: checked before the body is read
    return app


# ---------------------------------------------------------------------------------------------
# Running it


@dataclass
class RunningServer:
    """A uvicorn server in a background thread (tests, benchmarks, notebooks)."""

    server: Any
    thread: threading.Thread
    url: str  # e.g. http://127.0.0.1:8123 (the OpenAI base_url is url + "/v1")

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, startup_timeout: float = 60.0) -> RunningServer:
    """Start uvicorn on `host:port` (0 = a free port) in a thread and wait until it listens."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="finqlora-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server on {host}:{port} failed to start (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server on {host}:{port} did not start within {startup_timeout:g} s")
        time.sleep(0.05)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server=server, thread=thread, url=f"http://{host}:{bound_port}")


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to serve without an API key anywhere but on the loopback interface."""
    if api_key is None and not is_loopback(host):
        raise FinqloraError(
            f"--no-auth is only allowed on a loopback address, not {host}",
            hint="give an --api-key-file, or bind to 127.0.0.1 and reach the server through an SSH tunnel",
        )


MIN_API_KEY_CHARS = 8
_NEW_KEY = "`python -c \"import secrets; print(secrets.token_urlsafe(32))\" > KEY`"


def check_api_key(key: str, source: str) -> str:
    """The one rule for every key and token the servers accept (`source` says where it came from):
    at least MIN_API_KEY_CHARS printable ASCII characters, no whitespace."""
    if len(key) < MIN_API_KEY_CHARS or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise FinqloraError(
            f"the API key in {source} is empty, shorter than {MIN_API_KEY_CHARS} characters, or not one word of printable ASCII",
            hint=f"use one long random token, e.g. {_NEW_KEY}",
        )
    return key


def read_api_key(path: str | Path) -> str:
    file = Path(path).expanduser()
    try:
        key = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise FinqloraError(f"cannot read the API key file {file}: {reason}", hint=f"create it, e.g. {_NEW_KEY}") from exc
    return check_api_key(key, str(file))


def serve(
    engine: ServingEngine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None,
    http_limits: HTTPLimits | None = None,
    allowed_hosts: Sequence[str] = (),
) -> None:
    """Run the API in the foreground until Ctrl+C; `allowed_hosts` are extra `Host` names to
    answer besides loopback and `host` (see `allowed_hosts_for`)."""
    import uvicorn

    check_bind(host, api_key)
    app = create_app(engine, api_key=api_key, http_limits=http_limits, allowed_hosts=allowed_hosts_for(host, allowed_hosts))
    uvicorn.run(app, host=host, port=port, log_level="info")


# ---------------------------------------------------------------------------------------------
# vLLM, for serving at scale with the same adapters

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts


def vllm_command(
    model_path: str,
    adapters: Mapping[str, str | Path],
    *,
    base_name: str = "base",
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "auto",
    max_model_len: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The command line that starts vLLM's OpenAI server with the same names as ours.

    The API key is not on the command line (where `ps` would show it): vLLM reads it from
    the VLLM_API_KEY environment variable, which `finqlora serve --engine vllm` sets.
    """
    import sys

    folders = {name: check_adapter_dir(name, path) for name, path in adapters.items()}
    command = [
        python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", base_name,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
    ]  # fmt: skip
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if folders:
        ranks = [int(json.loads((f / "adapter_config.json").read_text(encoding="utf-8")).get("r", 8)) for f in folders.values()]
        needed = max(ranks)
        max_rank = next((r for r in VLLM_LORA_RANKS if r >= needed), needed)
        command += ["--enable-lora", "--max-loras", str(len(folders)), "--max-lora-rank", str(max_rank), "--lora-modules"]
        command += [f"{name}={folder}" for name, folder in folders.items()]
    return command
