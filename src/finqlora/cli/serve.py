"""`finqlora serve`: the OpenAI-compatible API (native engine, or vLLM for scale)."""

from __future__ import annotations

import importlib.util
import os
import shlex
from pathlib import Path

import typer
from rich.console import Console

from finqlora.cli.console import make_console, styled
from finqlora.cli.config_options import CONFIG_OPTION, SET_OPTION, key_option, resolve
from finqlora.core.errors import FinqloraError


def _parse_adapters(values: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise FinqloraError(
                f"--adapter {value!r} is not NAME=PATH",
                hint="e.g. --adapter fin=runs/demo (the name is what clients send as `model`)",
            )
        if name in adapters:
            raise FinqloraError(f"adapter name {name!r} is given twice", hint="give each --adapter a different name")
        adapters[name] = path
    return adapters


def _api_key(api_key_file: Path | None, no_auth: bool) -> str | None:
    from finqlora.serve.server import check_api_key, read_api_key

    if no_auth:
        if api_key_file is not None:
            raise FinqloraError("--no-auth and --api-key-file contradict each other", hint="pass only one of them")
        return None
    if api_key_file is not None:
        return read_api_key(api_key_file)
    env_key = os.environ.get("FINQLORA_API_KEY", "").strip()
    if env_key:
        return check_api_key(env_key, "FINQLORA_API_KEY")
    raise FinqloraError(
        "the server needs an API key",
        hint="pass --api-key-file KEY (one random token on one line), set FINQLORA_API_KEY, "
        "or --no-auth for a loopback-only server",
    )


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command("serve")
    def serve_command(
        config: Path | None = CONFIG_OPTION,
        set_: list[str] = SET_OPTION,
        model: str | None = key_option("train.model", "--model", "-m", help="Base model: builtin:NAME, a local folder, a .gguf file or a hub id."),
        adapter: list[str] = typer.Option([], "--adapter", "-a", help="NAME=PATH of a LoRA adapter (repeatable); clients select it with model=NAME (config serve.adapters)."),
        base_name: str | None = key_option("serve.base_name", "--base-name", help="The `model` name that selects the plain base model."),
        host: str | None = key_option("serve.host", "--host", help="Interface to bind; keep the default unless the API must be reachable from other machines."),
        port: int | None = key_option("serve.port", "--port", help="TCP port."),
        api_key_file: Path | None = typer.Option(None, help="File holding the Bearer API key clients must send (or set FINQLORA_API_KEY)."),
        no_auth: bool = typer.Option(False, "--no-auth", help="Serve without an API key (only allowed on a loopback address)."),
        allowed_host: list[str] = typer.Option([], "--allowed-host", help="A Host name clients reach the server by, besides 127.0.0.1, localhost, ::1 and --host (repeatable; '*' = any). Other names get 400 (DNS rebinding)."),
        engine: str | None = key_option("serve.engine", "--engine", help="native (this process, dynamic batching) or vllm (exec vLLM's OpenAI server)."),
        print_command: bool = typer.Option(False, "--print-command", help="With --engine vllm: print the vLLM command line and exit."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
        dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
        load_in_4bit: bool | None = key_option("train.load_in_4bit", "--load-in-4bit/--no-load-in-4bit", help="4-bit NF4 base (null: on CUDA only)."),
        chat_template: str | None = key_option("train.chat_template", "--chat-template", help="'chatml' for base models without a chat template."),
        max_batch_size: int | None = key_option("serve.max_batch_size", "--max-batch-size", help="Requests decoded together in one batch."),
        max_queue: int | None = key_option("serve.max_queue", "--max-queue", help="Requests allowed to wait; more are answered 429 with Retry-After."),
        batch_window_ms: float | None = key_option("serve.batch_window_ms", "--batch-window-ms", help="How long the oldest request waits for others to batch with."),
        max_prompt_tokens: int | None = key_option("serve.max_prompt_tokens", "--max-prompt-tokens", help="Longest prompt accepted (longer: 400 context_length_exceeded)."),
        max_tokens: int | None = key_option("serve.max_tokens", "--max-tokens", help="Largest max_tokens a request may ask for."),
        default_max_tokens: int | None = key_option("serve.default_max_tokens", "--default-max-tokens", help="max_tokens when a request does not set it."),
        request_timeout: float | None = key_option("serve.request_timeout", "--request-timeout", help="Seconds a request may take (queue + generation) before a 504."),
        max_prompt_chars: int | None = key_option("serve.max_prompt_chars", "--max-prompt-chars", help="Longest prompt text accepted, in characters, checked before tokenizing (null: 16 x --max-prompt-tokens)."),
        max_body_bytes: int | None = key_option("serve.max_body_bytes", "--max-body-bytes", help="Largest request body accepted (larger: 413, before any parsing)."),
        body_timeout: float | None = key_option("serve.body_timeout", "--body-timeout", help="Seconds a request's body may take to arrive (later: 408, connection closed)."),
        threads: int | None = key_option("serve.threads", "--threads", help="CPU threads for torch (null: torch's choice; fewer can be faster on a shared CPU)."),
        ignore_base_mismatch: bool = typer.Option(False, "--ignore-base-mismatch", help="Attach adapters whose recorded base has another name (same weights elsewhere)."),
    ) -> None:
        """Serve the model and its adapters through an OpenAI-compatible API.

        Example: finqlora serve --model builtin:qwen2.5-coder-0.5b-instruct --adapter fin=runs/demo --api-key-file KEY
        """
        from finqlora.serve.server import check_bind

        run = resolve(config, set_, {
            "train.model": model, "serve.adapters": adapter or None, "serve.base_name": base_name, "serve.host": host,
            "serve.port": port, "serve.engine": engine, "train.load_in_4bit": load_in_4bit, "train.chat_template": chat_template,
            "serve.max_batch_size": max_batch_size, "serve.max_queue": max_queue, "serve.batch_window_ms": batch_window_ms,
            "serve.max_prompt_tokens": max_prompt_tokens, "serve.max_tokens": max_tokens, "serve.default_max_tokens": default_max_tokens,
            "serve.request_timeout": request_timeout, "serve.max_prompt_chars": max_prompt_chars,
            "serve.max_body_bytes": max_body_bytes, "serve.body_timeout": body_timeout, "serve.threads": threads,
        })
        cfg, model, base_name, host, port, engine = run.serve, run.train.model, run.serve.base_name, run.serve.host, run.serve.port, run.serve.engine
        adapters = _parse_adapters(cfg.adapters)
        if print_command and engine != "vllm":
            raise FinqloraError("--print-command only applies to --engine vllm", hint="add --engine vllm")
        console = make_console(stderr=True)

        if engine == "vllm":
            if allowed_host:
                raise FinqloraError("--allowed-host applies to the native engine; vLLM's server does not check the Host header",
                                    hint="drop --allowed-host, and give vLLM a key (--api-key-file) rather than --no-auth")
            _run_vllm(model, adapters, base_name, host, port, dtype, api_key_file, no_auth, print_command, console)
            return

        api_key = _api_key(api_key_file, no_auth)
        check_bind(host, api_key)
        from finqlora.serve.batching import BatchLimits
        from finqlora.serve.http_limits import HTTPLimits
        from finqlora.serve.server import ServingEngine, serve

        try:
            limits = BatchLimits(
                max_batch_size=cfg.max_batch_size,
                max_queue=cfg.max_queue,
                batch_window_ms=cfg.batch_window_ms,
                max_prompt_tokens=cfg.max_prompt_tokens,
                max_new_tokens=cfg.max_tokens,
                default_max_new_tokens=min(cfg.default_max_tokens, cfg.max_tokens),
                request_timeout_s=cfg.request_timeout,
                max_prompt_chars=cfg.max_prompt_chars,
            )
            http_limits = HTTPLimits(max_body_bytes=cfg.max_body_bytes, body_timeout_s=cfg.body_timeout)
        except ValueError as exc:
            raise FinqloraError(str(exc), hint="see finqlora serve --help for the allowed values") from exc
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        with console.status(f"loading {model} and {len(adapters)} adapter(s)..."):
            loaded = ServingEngine.load(
                model,
                adapters,
                limits=limits,
                base_name=base_name,
                device=device,
                dtype=dtype,
                load_in_4bit=run.train.load_in_4bit,
                chat_template=run.train.chat_template,
                ignore_base_mismatch=ignore_base_mismatch,
            )
        console.print(styled(("serving", "green"), f" {', '.join(loaded.model_names)} at http://{host}:{port}/v1 "
                             f"({'API key required' if api_key else 'no auth, loopback only'})"), highlight=False)
        serve(loaded, host=host, port=port, api_key=api_key, http_limits=http_limits, allowed_hosts=allowed_host)


def _run_vllm(
    model: str,
    adapters: dict[str, str],
    base_name: str,
    host: str,
    port: int,
    dtype: str,
    api_key_file: Path | None,
    no_auth: bool,
    print_command: bool,
    console: Console,
) -> None:
    from finqlora.models.loading import resolve_model
    from finqlora.serve.server import check_bind, vllm_command

    have_vllm = importlib.util.find_spec("vllm") is not None
    if not have_vllm and not print_command:
        raise FinqloraError(
            "--engine vllm needs vLLM, which is not installed in this environment",
            hint="on a Linux machine with an NVIDIA GPU: pip install vllm (in its own virtualenv is safest); "
            "or use --engine native; --print-command shows the command line without vLLM",
        )
    api_key = None if print_command else _api_key(api_key_file, no_auth)
    check_bind(host, None if no_auth else "required")
    resolved = resolve_model(model)
    command = vllm_command(resolved.path, adapters, base_name=base_name, host=host, port=port, dtype=dtype)
    shown = ("" if no_auth else "VLLM_API_KEY=<your key> ") + shlex.join(command)
    if print_command:
        typer.echo(shown)
        return
    console.print(styled(("starting vLLM:", "green"), f" {shown}"), highlight=False)
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    os.execvpe(command[0], command, env)
