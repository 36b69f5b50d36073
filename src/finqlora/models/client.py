"""A small client for agent code: the DeepSeek API, the local finqlora server, or any
OpenAI-compatible URL, over the official `openai` SDK.

    from finqlora.models.client import FinLLMClient
    llm = FinLLMClient.from_env()            # FINQLORA_PROVIDER=local|deepseek|kimi|openai|URL
    print(llm.chat([{"role": "user", "content": "美联储宣布加息25个基点，对黄金有何影响？"}]))

Environment (all optional except the key of the provider you use):

==========================  ==================================================================
FINQLORA_PROVIDER           `local` (default), `deepseek`, `kimi`, `openai`, or a base URL
FINQLORA_MODEL              model name for the primary provider (local: the adapter name;
                            default: the server's first adapter, else its base)
FINQLORA_FALLBACK           a second provider used when the first cannot be reached, e.g.
                            `deepseek`; `none` (default) for no fallback
FINQLORA_BASE_URL           the local server (default http://127.0.0.1:8000/v1)
FINQLORA_API_KEY            its key (the content of `finqlora serve --api-key-file`);
                            also the key for a custom URL
FINQLORA_TIMEOUT            seconds per request (default 60)
FINQLORA_MAX_RETRIES        retries per provider (default 3)
DEEPSEEK_API_KEY            DeepSeek's key; DEEPSEEK_BASE_URL / DEEPSEEK_MODEL override
                            https://api.deepseek.com / deepseek-chat
MOONSHOT_API_KEY            Kimi (Moonshot); OPENAI_API_KEY for OpenAI
==========================  ==================================================================

Retries use the SDK's own exponential backoff with jitter (it honours the server's
Retry-After, e.g. on a 429 from a busy finqlora server). When a provider still fails with
a connection error, a timeout, a 429 or a 5xx, the fallback provider is tried; a 4xx such as a
bad request or a wrong key is the caller's problem and is raised at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import openai

from finqlora.core.errors import FinqloraError

LOCAL_BASE_URL = "http://127.0.0.1:8000/v1"
DEEPSEEK_BASE_URL = "https://api.deepseek.com"

# name -> (base URL, its env override, key env var, default model, model env override)
PRESETS: dict[str, tuple[str, str, str, str, str]] = {
    "deepseek": (DEEPSEEK_BASE_URL, "DEEPSEEK_BASE_URL", "DEEPSEEK_API_KEY", "deepseek-chat", "DEEPSEEK_MODEL"),
    "kimi": ("https://api.moonshot.cn/v1", "MOONSHOT_BASE_URL", "MOONSHOT_API_KEY", "moonshot-v1-8k", "MOONSHOT_MODEL"),
    "openai": ("https://api.openai.com/v1", "OPENAI_BASE_URL", "OPENAI_API_KEY", "gpt-4o", "OPENAI_MODEL"),
}
# Failures worth trying another provider for (after the SDK's own retries).
FALLBACK_ERRORS = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError)


@dataclass(frozen=True)
class Provider:
    """One OpenAI-compatible endpoint: where it is, its key, and the model to ask."""

    name: str  # "local", "deepseek", "kimi", "openai" or "custom"
    base_url: str
    api_key: str
    model: str | None  # None: ask the server (/v1/models) once

    def __repr__(self) -> str:  # never print keys in logs or tracebacks
        return f"Provider(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"


def provider_from_spec(spec: str, *, model: str | None = None, env: Mapping[str, str] | None = None) -> Provider:
    """`local`, a preset name (`deepseek`, `kimi`, `openai`) or an http(s) URL -> Provider."""
    env = os.environ if env is None else env
    spec = spec.strip()
    if spec == "local":
        return Provider(
            "local",
            env.get("FINQLORA_BASE_URL") or LOCAL_BASE_URL,
            # The SDK insists on a key; a --no-auth server ignores whatever is sent.
            env.get("FINQLORA_API_KEY") or "no-key",
            model or env.get("FINQLORA_MODEL") or None,
        )
    if spec in PRESETS:
        url, url_env, key_env, default_model, model_env = PRESETS[spec]
        key = env.get(key_env, "").strip()
        if not key:
            raise FinqloraError(
                f"provider {spec!r} needs an API key in the environment variable {key_env}",
                hint=f"export {key_env}=sk-... (or choose another provider with FINQLORA_PROVIDER)",
            )
        return Provider(spec, env.get(url_env) or url, key, model or env.get(model_env) or default_model)
    if spec.startswith(("http://", "https://")):
        return Provider("custom", spec.rstrip("/"), env.get("FINQLORA_API_KEY") or "no-key", model or env.get("FINQLORA_MODEL") or None)
    raise FinqloraError(
        f"unknown provider {spec!r}",
        hint=f"use local, {', '.join(PRESETS)}, or the base URL of an OpenAI-compatible API (https://.../v1)",
    )


class LLMUnavailable(FinqloraError):
    """Every configured provider failed (each one's error is in the message)."""


class FinLLMClient:
    """Chat with the first provider that answers; see the module docstring for the rules."""

    def __init__(self, providers: Sequence[Provider], *, timeout: float = 60.0, max_retries: int = 3) -> None:
        if not providers:
            raise FinqloraError("FinLLMClient needs at least one provider")
        self.providers = list(providers)
        self._clients = {
            id(p): openai.OpenAI(base_url=p.base_url, api_key=p.api_key, timeout=timeout, max_retries=max_retries)
            for p in self.providers
        }
        self._models: dict[int, str] = {id(p): p.model for p in self.providers if p.model}
        self.last_provider: Provider | None = None

    @classmethod
    def from_env(
        cls,
        provider: str | None = None,
        *,
        model: str | None = None,
        fallback: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> FinLLMClient:
        """Build from arguments, falling back to the FINQLORA_* / provider environment variables."""
        env = os.environ if env is None else env
        primary = provider_from_spec(provider or env.get("FINQLORA_PROVIDER") or "local", model=model, env=env)
        providers = [primary]
        fallback = fallback or env.get("FINQLORA_FALLBACK") or "none"
        if fallback != "none":
            providers.append(provider_from_spec(fallback, env=env))
        try:
            timeout = timeout if timeout is not None else float(env.get("FINQLORA_TIMEOUT", 60))
            max_retries = max_retries if max_retries is not None else int(env.get("FINQLORA_MAX_RETRIES", 3))
        except ValueError as exc:
            raise FinqloraError(f"FINQLORA_TIMEOUT / FINQLORA_MAX_RETRIES must be numbers: {exc}") from exc
        return cls(providers, timeout=timeout, max_retries=max_retries)

    def model_for(self, provider: Provider) -> str:
        """The provider's model; for a server that was not told, its first adapter (else its base)."""
        key = id(provider)
        if key not in self._models:
            cards = list(self._clients[key].models.list())
            if not cards:
                raise FinqloraError(f"{provider.base_url} serves no models", hint="set FINQLORA_MODEL")
            adapters = [card.id for card in cards if getattr(card, "parent", None)]
            self._models[key] = adapters[0] if adapters else cards[0].id
        return self._models[key]

    def _each_provider(self) -> Iterator[tuple[Provider, openai.OpenAI]]:
        for provider in self.providers:
            yield provider, self._clients[id(provider)]

    def completion(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Any:
        """The full ChatCompletion object from the first provider that answers.

        `kwargs` go to `chat.completions.create` (temperature, max_tokens, stop, seed, ...);
        `model` there overrides the primary provider's model only.
        """
        response, provider = self.completion_with_provider(messages, **kwargs)
        self.last_provider = provider
        return response

    def completion_with_provider(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> tuple[Any, Provider]:
        """Like `completion`, also saying which provider answered (safe to use from threads)."""
        failures: list[str] = []
        model_override = kwargs.pop("model", None)
        for index, (provider, sdk) in enumerate(self._each_provider()):
            try:
                model = model_override if (model_override and index == 0) else self.model_for(provider)
                return sdk.chat.completions.create(model=model, messages=list(messages), **kwargs), provider
            except FALLBACK_ERRORS as exc:
                failures.append(f"{provider.name} ({provider.base_url}): {type(exc).__name__}: {exc}")
        raise LLMUnavailable(
            "no LLM provider answered: " + "; ".join(failures),
            hint="start the local server (finqlora serve ...) or set FINQLORA_FALLBACK=deepseek with DEEPSEEK_API_KEY",
        )

    def chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        """The answer text of a chat (see `completion` for the arguments)."""
        return self.completion(messages, **kwargs).choices[0].message.content or ""

    def stream(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Iterator[str]:
        """The answer as it is generated. Falls back only before the first piece arrived."""
        failures: list[str] = []
        model_override = kwargs.pop("model", None)
        for index, (provider, sdk) in enumerate(self._each_provider()):
            try:
                model = model_override if (model_override and index == 0) else self.model_for(provider)
                chunks = sdk.chat.completions.create(model=model, messages=list(messages), stream=True, **kwargs)
                iterator = iter(chunks)
                first = next(iterator, None)
            except FALLBACK_ERRORS as exc:
                failures.append(f"{provider.name} ({provider.base_url}): {type(exc).__name__}: {exc}")
                continue
            self.last_provider = provider
            for chunk in [first] if first is not None else []:
                yield from _chunk_text(chunk)
            for chunk in iterator:
                yield from _chunk_text(chunk)
            return
        raise LLMUnavailable(
            "no LLM provider answered: " + "; ".join(failures),
            hint="start the local server (finqlora serve ...) or set FINQLORA_FALLBACK=deepseek with DEEPSEEK_API_KEY",
        )


def _chunk_text(chunk: Any) -> Iterator[str]:
    for choice in chunk.choices or []:
        if choice.delta and choice.delta.content:
            yield choice.delta.content
