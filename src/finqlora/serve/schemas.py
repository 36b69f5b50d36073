"""Request and response bodies of the API: the subset of OpenAI's schema this server implements.

The response models are what the OpenAPI document (`/openapi.json`, `/docs`) shows for each
route, and what the routes return; the streaming chunk models build each SSE `data:` line.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from finqlora.serve.batching import BatcherStats
from finqlora.serve.text_fields import UnicodeText


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: 10 and 10.0 are both integers; 10.5 is not (strict check follows)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Strict types: a JSON `true` is not silently taken as n=1, nor "5" as max_tokens=5.
# (Constraints before the validator, so the OpenAPI document shows them as `minimum`/`maximum`.)
JsonInt = Annotated[int, BeforeValidator(_json_integer)]
PositiveJsonInt = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]
FinishReason = Literal["stop", "length", "cancelled"]


# ---------------------------------------------------------------------------------------------
# Requests


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: UnicodeText


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: UnicodeText | list[TextPart] | None = None  # None (e.g. an assistant turn) renders as ""
    name: UnicodeText | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields chat and text completions share."""

    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send extras).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: UnicodeText = Field(min_length=1, max_length=200)
    max_tokens: PositiveJsonInt | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Annotated[int, Field(ge=1, le=1), BeforeValidator(_json_integer)] = Field(1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: UnicodeText | list[UnicodeText] | None = Field(None, description="up to 4 stop strings")
    seed: JsonInt | None = None
    user: UnicodeText | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveJsonInt | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(SamplingFields):
    prompt: UnicodeText | list[UnicodeText] = Field(description="a prompt or a list of prompts (answered in one batch)")
    echo: bool = False


# ---------------------------------------------------------------------------------------------
# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(description="chatcmpl-...")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time in seconds")
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(description="cmpl-...")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` line of a streamed chat completion (the last one, with `stream_options.include_usage`,
    has no choices and the usage)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class CompletionChunk(BaseModel):
    """One `data:` line of a streamed text completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "finqlora"
    parent: str | None = Field(None, description="the base model, for an adapter (absent for the base)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    models: list[str]
    queued: int = Field(description="requests waiting for the model")
    stats: BatcherStats


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, answered with every 4xx and 5xx (and sent as an SSE line when a stream fails)."""

    error: ErrorDetail
