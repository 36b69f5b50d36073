"""FinLLMClient against real local servers: one stands for `finqlora serve`, a second one
(whose base model is named deepseek-chat) stands in for the DeepSeek API."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import openai
import pytest
import torch

from finqlora.serve.batching import BatchLimits
from finqlora.models.client import FinLLMClient, LLMUnavailable, Provider, provider_from_spec
from finqlora.core.errors import FinqloraError
from finqlora.serve.server import ServingEngine, create_app, start_in_thread

LOCAL_KEY = "local-key-12345678"
DEEPSEEK_KEY = "deepseek-standin-key-1234"
QUESTION = [{"role": "user", "content": "美联储宣布加息25个基点，对黄金有何影响？"}]
LIMITS = BatchLimits(max_new_tokens=32, default_max_new_tokens=8)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("client-adapter")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def local_engine(tiny_model_dir: Path, adapter_dir: Path):
    engine = ServingEngine.load(str(tiny_model_dir), {"fin": adapter_dir}, limits=LIMITS, device="cpu")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def local_server(local_engine):
    running = start_in_thread(create_app(local_engine, api_key=LOCAL_KEY, shutdown_engine=False))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def deepseek_standin(tiny_model_dir: Path):
    engine = ServingEngine.load(str(tiny_model_dir), limits=LIMITS, base_name="deepseek-chat", device="cpu")
    running = start_in_thread(create_app(engine, api_key=DEEPSEEK_KEY))
    yield running
    running.stop()


def local_env(url: str, **extra: str) -> dict[str, str]:
    return {"FINQLORA_BASE_URL": url + "/v1", "FINQLORA_API_KEY": LOCAL_KEY, "FINQLORA_MAX_RETRIES": "0", **extra}


def test_local_provider_picks_the_servers_adapter(local_server) -> None:
    client = FinLLMClient.from_env(env=local_env(local_server.url))
    answer = client.chat(QUESTION, max_tokens=6)
    assert isinstance(answer, str)
    assert client.last_provider.name == "local"
    assert client.model_for(client.providers[0]) == "fin"
    response = client.completion(QUESTION, max_tokens=6, model="base")
    assert response.model == "base"


def test_streaming_gives_the_same_answer(local_server) -> None:
    client = FinLLMClient.from_env(env=local_env(local_server.url))
    streamed = "".join(client.stream(QUESTION, max_tokens=8, temperature=0))
    assert streamed == client.chat(QUESTION, max_tokens=8, temperature=0)


def test_fallback_to_deepseek_when_the_local_server_is_down(deepseek_standin) -> None:
    env = local_env(
        f"http://127.0.0.1:{free_port()}",  # nothing listens there
        FINQLORA_FALLBACK="deepseek",
        DEEPSEEK_API_KEY=DEEPSEEK_KEY,
        DEEPSEEK_BASE_URL=deepseek_standin.url + "/v1",
    )
    client = FinLLMClient.from_env(env=env)
    response = client.completion(QUESTION, max_tokens=6)
    assert client.last_provider.name == "deepseek"
    assert response.model == "deepseek-chat"  # DeepSeek's default model name was sent
    assert list(client.stream(QUESTION, max_tokens=4)) is not None and client.last_provider.name == "deepseek"


def test_no_provider_answers(deepseek_standin) -> None:
    client = FinLLMClient.from_env(env=local_env(f"http://127.0.0.1:{free_port()}", FINQLORA_MODEL="fin"))
    with pytest.raises(LLMUnavailable, match="127.0.0.1") as info:
        client.chat(QUESTION)
    assert "FINQLORA_FALLBACK" in info.value.hint


def test_client_errors_are_not_hidden_by_the_fallback(local_server, deepseek_standin) -> None:
    env = local_env(
        local_server.url,
        FINQLORA_API_KEY="wrong-key-000000",
        FINQLORA_MODEL="fin",
        FINQLORA_FALLBACK="deepseek",
        DEEPSEEK_API_KEY=DEEPSEEK_KEY,
        DEEPSEEK_BASE_URL=deepseek_standin.url + "/v1",
    )
    client = FinLLMClient.from_env(env=env)
    with pytest.raises(openai.AuthenticationError):
        client.chat(QUESTION)
    right_key = FinLLMClient.from_env(env={**env, "FINQLORA_API_KEY": LOCAL_KEY})
    with pytest.raises(openai.NotFoundError):
        right_key.chat(QUESTION, model="no-such-adapter")
    assert right_key.last_provider is None


def test_retries_with_backoff_until_the_server_is_up(local_engine) -> None:
    """The server comes up ~1.5 s after the first attempt; the SDK's backoff retries reach it."""
    port = free_port()
    client = FinLLMClient.from_env(env=local_env(f"http://127.0.0.1:{port}", FINQLORA_MODEL="fin", FINQLORA_MAX_RETRIES="5"))
    servers = []

    def start_later() -> None:
        time.sleep(1.5)
        servers.append(start_in_thread(create_app(local_engine, api_key=LOCAL_KEY, shutdown_engine=False), port=port))

    starter = threading.Thread(target=start_later)
    started = time.monotonic()
    starter.start()
    try:
        answer = client.chat(QUESTION, max_tokens=4)
        assert isinstance(answer, str)
        assert time.monotonic() - started >= 1.5
    finally:
        starter.join()
        for server in servers:
            server.stop()
    no_retry = FinLLMClient.from_env(env=local_env(f"http://127.0.0.1:{free_port()}", FINQLORA_MODEL="fin"))
    with pytest.raises(LLMUnavailable):
        no_retry.chat(QUESTION)


def test_provider_specs_and_keys() -> None:
    with pytest.raises(FinqloraError, match="DEEPSEEK_API_KEY"):
        provider_from_spec("deepseek", env={})
    deepseek = provider_from_spec("deepseek", env={"DEEPSEEK_API_KEY": "sk-secret-value"})
    assert (deepseek.base_url, deepseek.model) == ("https://api.deepseek.com", "deepseek-chat")
    assert "sk-secret-value" not in repr(deepseek)
    custom = provider_from_spec("https://llm.example.com/v1/", model="qwen", env={"FINQLORA_API_KEY": "k"})
    assert custom == Provider("custom", "https://llm.example.com/v1", "k", "qwen")
    assert provider_from_spec("local", env={}).base_url == "http://127.0.0.1:8000/v1"
    with pytest.raises(FinqloraError, match="unknown provider"):
        provider_from_spec("ftp://x", env={})
