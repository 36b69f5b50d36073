"""The API's routes: module-level functions on one `APIRouter`.

The engine and the API key come from the app (`app.state`, set by `create_app`) through FastAPI
dependencies, so the same router serves any engine. Prompt text is counted before it is
tokenized (a prompt longer than `BatchLimits.prompt_chars_limit` characters is refused
without tokenizing it), and rendering and tokenizing run in the thread pool, so a large
prompt never stalls the event loop that answers `/health` and every other request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from finqlora.serve.api_errors import APIError, error_responses, error_type
from finqlora.serve.batching import Event, Failed, Finished, GenerationJob, LimitExceeded, QueueFull, SamplingParams, TextDelta
from finqlora.serve.engine import ServingEngine
from finqlora.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    ErrorDetail,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)

DISCONNECT_POLL_S = 0.5
# What a chat template adds around each message, counted against --max-prompt-chars so that many
# empty messages cannot pass as a short prompt: ChatML's `<|im_start|>user\n` + `<|im_end|>\n` is
# 28 characters (5 tokens, which the 16-characters-a-token bound allows 80, so no prompt that
# fits --max-prompt-tokens is refused for it).
MESSAGE_OVERHEAD_CHARS = 28


# ---------------------------------------------------------------------------------------------
# Dependencies


def get_engine(request: Request) -> ServingEngine:
    return request.app.state.engine


async def authorize(request: Request) -> None:
    """Require `Authorization: Bearer <key>` when the app has a key (`api_key=None`: no auth)."""
    api_key: str | None = request.app.state.api_key
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


Engine = Annotated[ServingEngine, Depends(get_engine)]
router = APIRouter()
GENERATION_ERRORS = error_responses(400, 401, 404, 408, 413, 415, 429, 503, 504)


def _streamed(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry for a 200 that is JSON, or with `stream: true` server-sent events
    (the chunk's schema is added to the document by `refine_openapi`)."""
    return {
        200: {
            "description": "the answer; with `stream: true`, server-sent events, one chunk per `data:` line, then `data: [DONE]`",
            "content": {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}},
        }
    }


def refine_openapi(app: FastAPI) -> None:
    """Make the app's OpenAPI document say what the server does: add the SSE chunk models (FastAPI
    collects only the models routes return as JSON) and drop FastAPI's default 422, since
    validation errors are answered 400 with OpenAI's error body."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = default_openapi()
            for operations in document["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            for model in (ChatCompletionChunk, CompletionChunk):
                definition = model.model_json_schema(mode="serialization", ref_template="#/components/schemas/{model}")
                for name, nested in definition.pop("$defs", {}).items():
                    schemas.setdefault(name, nested)
                schemas[model.__name__] = definition
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------
# Routes


@router.get("/health", response_model=Health)
async def health(engine: Engine) -> Health:
    return Health(models=engine.model_names, queued=engine.batcher.queued, stats=dataclasses.replace(engine.batcher.stats))


@router.get("/v1/models", dependencies=[Depends(authorize)], response_model=ModelList, response_model_exclude_none=True, responses=error_responses(401))
async def list_models(engine: Engine) -> ModelList:
    return ModelList(data=[_model_card(engine, name) for name in engine.model_names])


@router.get(
    "/v1/models/{model_id}", dependencies=[Depends(authorize)], response_model=ModelCard, response_model_exclude_none=True, responses=error_responses(401, 404)
)
async def get_model(model_id: str, engine: Engine) -> ModelCard:
    engine.adapter_for(model_id)
    return _model_card(engine, model_id)


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(authorize)],
    response_model=ChatCompletion,
    responses={**_streamed(ChatCompletionChunk), **GENERATION_ERRORS},
)
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: Engine) -> ChatCompletion | StreamingResponse:
    adapter = engine.adapter_for(body.model)
    if body.tools:
        raise APIError(400, "tools / function calling is not supported by this server", param="tools")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    _check_prompt_chars(engine, sum(len(m["content"]) + MESSAGE_OVERHEAD_CHARS for m in messages), param="messages",
                        counted=f" (with {MESSAGE_OVERHEAD_CHARS} per message for the chat template's markers, {len(messages)} messages)")
    params = _sampling(engine, body, body.max_completion_tokens or body.max_tokens)
    prompt_ids, stops = await run_in_threadpool(engine.chat_prompt, adapter, messages)
    if body.stream:
        job, events = _submit(engine, prompt_ids, params, adapter, stops, stream=True)
        return StreamingResponse(
            _chat_stream(job, events, body),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    job, events = _submit(engine, prompt_ids, params, adapter, stops, stream=False)
    result = await _wait(request, job, events)
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        choices=[ChatChoice(index=0, message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
        usage=_usage([result]),
    )


@router.post(
    "/v1/completions",
    dependencies=[Depends(authorize)],
    response_model=Completion,
    responses={**_streamed(CompletionChunk), **GENERATION_ERRORS},
)
async def completions(body: CompletionRequest, request: Request, engine: Engine) -> Completion | StreamingResponse:
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
    for prompt in prompts:
        _check_prompt_chars(engine, len(prompt), param="prompt")
    encoded = await run_in_threadpool(engine.text_prompts, prompts)
    if not all(encoded):
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
    choices = [
        CompletionChoice(index=i, text=(prompts[i] if body.echo else "") + result.text, finish_reason=result.finish_reason)
        for i, result in enumerate(results)
    ]
    return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=choices, usage=_usage(results))


# ---------------------------------------------------------------------------------------------
# Helpers


def _model_card(engine: ServingEngine, name: str) -> ModelCard:
    parent = engine.base_name if name != engine.base_name else None
    return ModelCard(id=name, created=engine.created, parent=parent)


def _check_prompt_chars(engine: ServingEngine, chars: int, *, param: str, counted: str = "") -> None:
    limit = engine.batcher.limits.prompt_chars_limit
    if chars > limit:
        raise APIError(
            400,
            f"the prompt has {chars} characters{counted}, more than this server accepts ({limit}); shorten the {param}",
            param=param,
            code="context_length_exceeded",
        )


def _sampling(engine: ServingEngine, body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    limits = engine.batcher.limits
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop strings are allowed", param="stop")
    return SamplingParams(
        max_new_tokens=max_tokens or min(limits.default_max_new_tokens, limits.max_new_tokens),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=tuple(s for s in stops if s),
    )


def _submit(
    engine: ServingEngine,
    prompt_ids: list[int],
    params: SamplingParams,
    adapter: str | None,
    stops: Sequence[int],
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


def _usage(results: Sequence[Finished]) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(chunk: BaseModel) -> str:
    # exclude_unset: a chunk carries exactly the fields it was built with (OpenAI's shape).
    return f"data: {json.dumps(chunk.model_dump(exclude_unset=True), ensure_ascii=False)}\n\n"


def _error_line(event: Failed) -> str:
    error = ErrorDetail(message=event.message, type=error_type(event.status), param=None, code=event.code)
    return _sse(ErrorResponse(error=error))


async def _chat_stream(job: GenerationJob, events: asyncio.Queue[Event], body: ChatCompletionRequest) -> AsyncIterator[str]:
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()), "model": body.model}

    def chunk(delta: ChunkDelta, finish_reason: str | None = None) -> str:
        choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason, logprobs=None)
        return _sse(ChatCompletionChunk(**head, choices=[choice]))

    try:
        yield chunk(ChunkDelta(role="assistant", content=""))
        while True:
            event = await events.get()
            if isinstance(event, TextDelta):
                yield chunk(ChunkDelta(content=event.text))
            elif isinstance(event, Finished):
                yield chunk(ChunkDelta(), event.finish_reason)
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse(ChatCompletionChunk(**head, choices=[], usage=_usage([event])))
                yield "data: [DONE]\n\n"
                return
            else:
                yield _error_line(event)
                return
    finally:
        # The client disconnected (the stream was closed early) or we are done: in both cases
        # the job must not keep generating. Cancelling a finished job does nothing.
        job.cancel()


async def _completion_stream(job: GenerationJob, events: asyncio.Queue[Event], body: CompletionRequest, prompt: str) -> AsyncIterator[str]:
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": body.model}

    def chunk(text: str, finish_reason: str | None = None) -> str:
        choice = CompletionChunkChoice(index=0, text=text, finish_reason=finish_reason, logprobs=None)
        return _sse(CompletionChunk(**head, choices=[choice]))

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
                yield _error_line(event)
                return
    finally:
        job.cancel()
