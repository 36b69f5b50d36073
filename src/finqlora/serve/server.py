"""An OpenAI-compatible API over one base model with several LoRA adapters.

`create_app(engine, api_key=...)` builds the FastAPI app; `ServingEngine.load(...)` loads the
base once (through `finqlora.models.loading.load_model`), attaches every configured adapter with
peft's multi-adapter support, and starts the `finqlora.serve.batching.Batcher` worker that owns
the model. The request's `model` field picks the adapter by its configured name, or the
plain base by the base name; nothing else is accepted, so a request can never make the
server read a path.

Endpoints: `POST /v1/chat/completions` (plain and SSE streaming), `POST /v1/completions`,
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`. Every error, including malformed
JSON and wrong types, is answered with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` and a 4xx status (5xx only for bugs and
out-of-memory).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from finqlora.serve.batching import (
    Batcher,
    BatchLimits,
    Event,
    Failed,
    Finished,
    GenerationJob,
    LimitExceeded,
    QueueFull,
    SamplingParams,
    TextDelta,
)
from finqlora.core.chat_format import render_prompt, stop_token_ids
from finqlora.core.errors import FinqloraError

log = logging.getLogger(__name__)

# Adapter names appear in URLs and JSON; keep them plain so they can never be a path.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DISCONNECT_POLL_S = 0.5


# ---------------------------------------------------------------------------------------------
# Request and response bodies (the subset of OpenAI's schema this server implements)


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: 10 and 10.0 are both integers; 10.5 is not (strict check follows)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Strict types: a JSON `true` is not silently taken as n=1, nor "5" as max_tokens=5.
# (Constraints before the validator, so the OpenAPI document shows them as `minimum`/`maximum`.)
JsonInt = Annotated[int, BeforeValidator(_json_integer)]
PositiveJsonInt = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None  # None (e.g. an assistant turn) renders as ""
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _SamplingFields(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send extras).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, max_length=200)
    max_tokens: PositiveJsonInt | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Annotated[int, Field(ge=1, le=1), BeforeValidator(_json_integer)] = Field(1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: JsonInt | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop strings are allowed", param="stop")
        return tuple(s for s in stops if s)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveJsonInt | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(description="a prompt or a list of prompts (answered in one batch)")
    echo: bool = False


# ---------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "server_overloaded",
    504: "timeout_error",
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", first.get("msg"))), None
    where = ".".join(loc)
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{where}: {first.get('msg')}" if where else str(first.get("msg"))) + more, (loc[0] if loc else None)


# ---------------------------------------------------------------------------------------------
# The engine: model + adapters + batcher


@dataclass
class ServingEngine:
    """A loaded base model with its adapters, served by one batcher."""

    batcher: Batcher
    tokenizer: Any
    base_name: str
    adapters: dict[str, str]  # name -> folder it was loaded from (for /v1/models)
    # Adapters may ship the chat template they were trained with; prompts for an adapter
    # are rendered with its own template (the vocabulary is the base's).
    prompt_tokenizers: dict[str | None, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def load(
        cls,
        model: str,
        adapters: Mapping[str, str | Path] | None = None,
        *,
        limits: BatchLimits | None = None,
        base_name: str = "base",
        device: str = "auto",
        dtype: str = "auto",
        load_in_4bit: bool | None = None,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        ignore_base_mismatch: bool = False,
    ) -> ServingEngine:
        from finqlora.models.loading import check_adapter_matches_base, load_model, load_tokenizer

        adapter_dirs = {name: check_adapter_dir(name, path) for name, path in (adapters or {}).items()}
        if base_name in adapter_dirs:
            raise FinqloraError(
                f"adapter name {base_name!r} is also the base model's name",
                hint="rename the adapter (--adapter NAME=PATH) or the base (--base-name)",
            )
        loaded = load_model(
            model,
            device=device,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            trust_remote_code=trust_remote_code,
            chat_template=chat_template,
        )
        for folder in adapter_dirs.values():
            check_adapter_matches_base(loaded.model, folder, loaded.resolved, ignore_base_mismatch=ignore_base_mismatch)
        peft_model = attach_adapters(loaded.model, adapter_dirs)
        peft_model.eval()
        prompt_tokenizers: dict[str | None, Any] = {None: loaded.tokenizer}
        for name, folder in adapter_dirs.items():
            # The adapter's own tokenizer files carry the chat template it was trained with.
            prompt_tokenizers[name] = load_tokenizer(loaded.resolved, adapter=folder, chat_template=chat_template)
        max_context = getattr(getattr(peft_model, "config", None), "max_position_embeddings", None)
        batcher = Batcher(peft_model, loaded.tokenizer, limits, max_context_tokens=max_context)
        return cls(
            batcher=batcher,
            tokenizer=loaded.tokenizer,
            base_name=base_name,
            adapters={name: str(folder) for name, folder in adapter_dirs.items()},
            prompt_tokenizers=prompt_tokenizers,
        )

    @property
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def adapter_for(self, model_name: str) -> str | None:
        """The adapter a request's `model` names (None = the base); anything else is a 404."""
        if model_name == self.base_name:
            return None
        if model_name in self.adapters:
            return model_name
        raise APIError(
            404,
            f"model {model_name!r} does not exist on this server; available: {', '.join(self.model_names)}",
            param="model",
            code="model_not_found",
        )

    def shutdown(self) -> None:
        self.batcher.shutdown()


def check_adapter_dir(name: str, path: str | Path) -> Path:
    """Validate an adapter's name and folder before anything is loaded."""
    if not ADAPTER_NAME.match(name):
        raise FinqloraError(
            f"adapter name {name!r} is not allowed",
            hint="use letters, digits, '.', '_' or '-' (at most 64 characters), e.g. --adapter fin=runs/x",
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FinqloraError(f"adapter {name!r}: {folder} is not a folder", hint="pass the training output folder (it holds adapter_config.json)")
    if not (folder / "adapter_config.json").is_file():
        raise FinqloraError(
            f"adapter {name!r}: {folder} has no adapter_config.json",
            hint="pass the folder written by `finqlora train --output-dir` (or one of its checkpoint-N folders)",
        )
    if not (folder / "adapter_model.safetensors").is_file():
        found = "adapter_model.bin (a pickle, which can run code when loaded)" if (folder / "adapter_model.bin").exists() else "no weights"
        raise FinqloraError(
            f"adapter {name!r}: {folder} has no adapter_model.safetensors ({found})",
            hint="the server loads safetensors only; re-save the adapter with save_pretrained(safe_serialization=True)",
        )
    return folder.resolve()


def attach_adapters(model: Any, adapter_dirs: Mapping[str, Path]) -> Any:
    """Load every adapter onto the one base (peft multi-adapter); switching is then free."""
    if not adapter_dirs:
        return model
    from peft import PeftModel

    items = list(adapter_dirs.items())
    try:
        first_name, first_dir = items[0]
        peft_model = PeftModel.from_pretrained(model, str(first_dir), adapter_name=first_name, is_trainable=False)
        for name, folder in items[1:]:
            peft_model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise FinqloraError(
            f"could not attach the adapters to this base model: {exc}",
            hint="an adapter only fits the base it was trained on; check base_model_name_or_path in its adapter_config.json",
        ) from exc
    return peft_model


# ---------------------------------------------------------------------------------------------
# The app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(engine: ServingEngine, *, api_key: str | None, shutdown_engine: bool = True) -> FastAPI:
    """The FastAPI app over a loaded engine. `api_key=None` means no auth (loopback only,
    which the runner enforces); `shutdown_engine` stops the batcher when the app stops."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if shutdown_engine:
            engine.shutdown()

    app = FastAPI(
        title="finqlora OpenAI-compatible API",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param=param, code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, "internal server error; see the server log", code="internal_error").response()

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key; send 'Authorization: Bearer <key>' (the key in the server's --api-key-file)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = engine.batcher.stats
        return {
            "status": "ok",
            "models": engine.model_names,
            "queued": engine.batcher.queued,
            "stats": stats.__dict__.copy(),
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine, name) for name in engine.model_names]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str) -> dict[str, Any]:
        engine.adapter_for(model_id)
        return _model_card(engine, model_id)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        adapter = engine.adapter_for(body.model)
        if body.tools:
            raise APIError(400, "tools / function calling is not supported by this server", param="tools")
        tokenizer = engine.prompt_tokenizers.get(adapter, engine.tokenizer)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = render_prompt(tokenizer, messages)
        except FinqloraError as exc:
            raise APIError(400, exc.message, param="messages") from exc
        except Exception as exc:  # the chat template rejected the conversation (e.g. role order)
            raise APIError(400, f"the model's chat template cannot render these messages: {exc}", param="messages") from exc
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = _sampling(engine, body, max_tokens)
        stops = stop_token_ids(tokenizer)
        if body.stream:
            job, events = _submit(engine, prompt_ids, params, adapter, stops, stream=True)
            return StreamingResponse(
                _chat_stream(job, events, body),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        job, events = _submit(engine, prompt_ids, params, adapter, stops, stream=False)
        result = await _wait(request, job, events)
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(result),
            }
        )

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        adapter = engine.adapter_for(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        if len(prompts) > engine.batcher.limits.max_batch_size:
            raise APIError(400, f"at most {engine.batcher.limits.max_batch_size} prompts per request", param="prompt")
        if body.stream and len(prompts) != 1:
            raise APIError(400, "streaming supports one prompt per request", param="stream")
        params = _sampling(engine, body, body.max_tokens)
        stops = [engine.tokenizer.eos_token_id] if engine.tokenizer.eos_token_id is not None else []
        encoded = [engine.tokenizer.encode(p) for p in prompts]
        for ids in encoded:
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
        if body.stream:
            job, events = _submit(engine, encoded[0], params, adapter, stops, stream=True)
            return StreamingResponse(_completion_stream(job, events, body, prompts[0]), media_type="text/event-stream")
        submitted = []
        try:
            for ids in encoded:
                submitted.append(_submit(engine, ids, params, adapter, stops, stream=False))
        except APIError:
            for job, _ in submitted:
                job.cancel()
            raise
        results = await asyncio.gather(*(_wait(request, job, events) for job, events in submitted))
        return JSONResponse(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [
                    {
                        "index": i,
                        "text": (prompts[i] if body.echo else "") + result.text,
                        "finish_reason": result.finish_reason,
                        "logprobs": None,
                    }
                    for i, result in enumerate(results)
                ],
                "usage": {
                    "prompt_tokens": sum(r.prompt_tokens for r in results),
                    "completion_tokens": sum(r.completion_tokens for r in results),
                    "total_tokens": sum(r.prompt_tokens + r.completion_tokens for r in results),
                },
            }
        )

    return app


def _model_card(engine: ServingEngine, name: str) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": engine.created, "owned_by": "finqlora"}
    if name != engine.base_name:
        card["parent"] = engine.base_name
    return card


def _sampling(engine: ServingEngine, body: _SamplingFields, max_tokens: int | None) -> SamplingParams:
    limits = engine.batcher.limits
    return SamplingParams(
        max_new_tokens=max_tokens or min(limits.default_max_new_tokens, limits.max_new_tokens),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_strings(),
    )


def _submit(
    engine: ServingEngine,
    prompt_ids: list[int],
    params: SamplingParams,
    adapter: str | None,
    stops: list[int],
    *,
    stream: bool,
) -> tuple[GenerationJob, asyncio.Queue[Event]]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(event: Event) -> None:  # called from the batcher's thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    job = GenerationJob(prompt_ids, params, adapter, stops, deliver, stream=stream)
    try:
        engine.batcher.submit(job)
    except LimitExceeded as exc:
        raise APIError(400, str(exc), param=exc.param, code=exc.code) from exc
    except QueueFull as exc:
        raise APIError(
            429,
            f"{exc}; the server queues at most {engine.batcher.limits.max_queue} requests",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from exc
    except RuntimeError as exc:
        raise APIError(503, "the server is shutting down", code="server_shutting_down") from exc
    return job, events


async def _wait(request: Request, job: GenerationJob, events: asyncio.Queue[Event]) -> Finished:
    """The final result of a non-streaming job; cancels it when the client goes away."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise APIError(499, "client disconnected", code="client_disconnected") from None
                continue
            if isinstance(event, Finished):
                return event
            if isinstance(event, Failed):
                raise APIError(event.status, event.message, code=event.code)
    except asyncio.CancelledError:
        job.cancel()
        raise


def _usage(result: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _chat_stream(job: GenerationJob, events: asyncio.Queue[Event], body: ChatCompletionRequest) -> AsyncIterator[str]:
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        return _sse(
            {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            }
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, TextDelta):
                yield chunk({"content": event.text})
            elif isinstance(event, Finished):
                yield chunk({}, event.finish_reason)
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": body.model, "choices": [], "usage": _usage(event)})
                yield "data: [DONE]\n\n"
                return
            else:
                yield _sse({"error": {"message": event.message, "type": _ERROR_TYPES.get(event.status, "server_error"), "param": None, "code": event.code}})
                return
    finally:
        # The client disconnected (the stream was closed early) or we are done: in both cases
        # the job must not keep generating. Cancelling a finished job does nothing.
        job.cancel()


async def _completion_stream(job: GenerationJob, events: asyncio.Queue[Event], body: CompletionRequest, prompt: str) -> AsyncIterator[str]:
    chunk_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish_reason: str | None = None) -> str:
        return _sse(
            {
                "id": chunk_id,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            }
        )

    try:
        if body.echo:
            yield chunk(prompt)
        while True:
            event = await events.get()
            if isinstance(event, TextDelta):
                yield chunk(event.text)
            elif isinstance(event, Finished):
                yield chunk("", event.finish_reason)
                yield "data: [DONE]\n\n"
                return
            else:
                yield _sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": event.code}})
                return
    finally:
        job.cancel()


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


def read_api_key(path: str | Path) -> str:
    file = Path(path).expanduser()
    try:
        key = file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise FinqloraError(f"cannot read the API key file {file}: {exc.strerror}", hint="create it, e.g. `python -c \"import secrets; print(secrets.token_urlsafe(32))\" > KEY`") from exc
    if len(key) < 8 or any(c.isspace() for c in key):
        raise FinqloraError(
            f"the API key in {file} is empty, shorter than 8 characters or contains whitespace",
            hint="put one long random token on one line, e.g. `python -c \"import secrets; print(secrets.token_urlsafe(32))\" > KEY`",
        )
    return key


def serve(engine: ServingEngine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None) -> None:
    """Run the API in the foreground until Ctrl+C."""
    import uvicorn

    check_bind(host, api_key)
    app = create_app(engine, api_key=api_key)
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
