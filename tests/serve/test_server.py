"""Integration tests of `finqlora serve`: the real server on loopback, called with the openai SDK.

The model is the tiny random Llama of `tiny_model_dir` (SmolLM2's real tokenizer and chat
template) with two LoRA adapters made here with peft; their B matrices are randomized so
each adapter really changes the answers. One slow test does the same with the SmolLM2
built-in.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.conftest import wait_until_healthy
from finqlora.serve.batching import Batcher, BatchLimits, Finished, GenerationJob, SamplingParams
from finqlora.core.errors import FinqloraError
from finqlora.serve.server import ServingEngine, check_bind, create_app, start_in_thread, vllm_command

API_KEY = "test-key-0123456789"
QUESTION = [{"role": "user", "content": "美联储宣布加息25个基点，对黄金价格有何影响？"}]


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter for `base_dir` whose weights visibly change the model's answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.8)
    peft_model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)  # as `finqlora train` does
    return out


@pytest.fixture(scope="module")
def sharp_base_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_model_dir with larger random weights, so greedy answers are varied text, not blanks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    out = tmp_path_factory.mktemp("sharp-llama")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(sharp_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "fin": make_adapter(sharp_base_dir, root / "fin", seed=11),
        "fin2": make_adapter(sharp_base_dir, root / "fin2", seed=22),
    }


@pytest.fixture(scope="module")
def engine(sharp_base_dir: Path, adapters: dict[str, Path]) -> ServingEngine:
    limits = BatchLimits(max_batch_size=8, max_queue=32, max_prompt_tokens=256, max_new_tokens=64, default_max_new_tokens=16)
    loaded = ServingEngine.load(str(sharp_base_dir), adapters, limits=limits, device="cpu")
    yield loaded
    loaded.shutdown()


@pytest.fixture(scope="module")
def server(engine: ServingEngine):
    running = start_in_thread(create_app(engine, api_key=API_KEY, shutdown_engine=False))
    yield running
    running.stop()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def chat(client: openai.OpenAI, model: str, max_tokens: int = 12, messages=QUESTION) -> str:
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return response.choices[0].message.content


def test_models_are_the_base_and_the_configured_adapters(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == ["base", "fin", "fin2"]
    assert client.models.retrieve("fin").id == "fin"


def test_plain_chat_completion(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="fin", messages=QUESTION, max_tokens=10)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert response.usage.completion_tokens <= 10
    assert response.usage.prompt_tokens > 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streaming_chat_equals_the_plain_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fin", messages=QUESTION, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1, "the answer should arrive in several pieces"
    assert "".join(pieces) == chat(client, "fin", max_tokens=12)
    assert finish in {"stop", "length"}
    assert usage is not None and usage.completion_tokens >= 1


def test_adapter_selection_changes_answers_without_reloading(client: openai.OpenAI) -> None:
    base_before = chat(client, "base")
    fin = chat(client, "fin")
    fin2 = chat(client, "fin2")
    base_after = chat(client, "base")
    assert len({base_before, fin, fin2}) == 3, (base_before, fin, fin2)
    assert base_after == base_before, "switching adapters must not leave the base changed"
    assert chat(client, "fin") == fin


def test_concurrent_requests_for_different_adapters(client: openai.OpenAI) -> None:
    expected = {name: chat(client, name) for name in ("base", "fin", "fin2")}
    names = ["base", "fin", "fin2"] * 4
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda name: chat(client, name), names))
    assert answers == [expected[name] for name in names]


def test_text_completions_single_and_batched(client: openai.OpenAI) -> None:
    one = client.completions.create(model="base", prompt="Gold prices rose because", max_tokens=8, temperature=0)
    assert one.choices[0].text and one.usage.completion_tokens <= 8
    many = client.completions.create(model="base", prompt=["Gold prices rose because", "Oil fell after"], max_tokens=8, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == one.choices[0].text
    streamed = client.completions.create(model="base", prompt="Gold prices rose because", max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == one.choices[0].text


def test_stop_strings_cut_the_answer(client: openai.OpenAI) -> None:
    full = chat(client, "fin", max_tokens=20)
    stop = full[5:8]
    assert stop.strip(), full
    cut = client.chat.completions.create(model="fin", messages=QUESTION, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_auth_is_required(server) -> None:
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="base", messages=QUESTION, max_tokens=4)
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": "base", "messages": QUESTION})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # health needs no key


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        ({"model": "base"}, 400, "messages"),
        ({"model": "base", "messages": []}, 400, "messages"),
        ({"model": "base", "messages": "hi"}, 400, "messages"),
        ({"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        ({"model": "base", "messages": QUESTION, "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "base", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "base", "messages": QUESTION, "max_tokens": 100000}, 400, "max_tokens"),
        ({"model": "base", "messages": QUESTION, "temperature": 7}, 400, "temperature"),
        ({"model": "base", "messages": QUESTION, "n": 2}, 400, "n"),
        ({"model": "base", "messages": [{"role": "user", "content": "金价 " * 400}]}, 400, "messages"),
        ({"model": "no-such-model", "messages": QUESTION}, 404, "model"),
        ({"model": "../../etc/passwd", "messages": QUESTION}, 404, "model"),
        ({"model": "/tmp", "messages": QUESTION}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_style_4xx(server, body, status: int, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        server.url + "/v1/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param


def test_over_long_prompt_is_a_context_length_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "base", messages=[{"role": "user", "content": "黄金 " * 400}])
    assert info.value.code == "context_length_exceeded"


def test_overload_answers_429_with_retry_after(sharp_base_dir: Path) -> None:
    limits = BatchLimits(max_batch_size=1, max_queue=2, batch_window_ms=0, max_new_tokens=64)
    engine = ServingEngine.load(str(sharp_base_dir), limits=limits, device="cpu")
    running = start_in_thread(create_app(engine, api_key=None))
    body = {"model": "base", "messages": QUESTION, "max_tokens": 64}
    try:
        with httpx.Client(timeout=120) as http, concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: http.post(running.url + "/v1/chat/completions", json=body), range(12)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 3 and set(statuses) == {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        # The SDK surfaces the same refusal as RateLimitError (retries off to see it).
        sdk = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(sdk.chat.completions.create, **body) for _ in range(8)]
            errors = [f.exception() for f in futures]
        assert any(isinstance(e, openai.RateLimitError) for e in errors)
    finally:
        running.stop()


def test_client_disconnect_cancels_the_generation(server) -> None:
    stats_before = httpx.get(server.url + "/health").json()["stats"]
    body = {"model": "fin", "messages": QUESTION, "max_tokens": 64, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # The stream was closed after its first chunk: the batcher must drop the job.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = httpx.get(server.url + "/health").json()["stats"]
        if stats["cancelled"] > stats_before["cancelled"]:
            break
        time.sleep(0.1)
    assert stats["cancelled"] == stats_before["cancelled"] + 1


def test_batched_greedy_decoding_matches_one_at_a_time(sharp_base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finqlora.core.chat_format import render_prompt, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(sharp_base_dir)
    model = AutoModelForCausalLM.from_pretrained(sharp_base_dir).eval()
    prompts = ["hi", "美联储宣布加息25个基点", "Explain in detail what a rate hike usually does to gold and the dollar."]
    ids = [tokenizer.encode(render_prompt(tokenizer, [{"role": "user", "content": p}]), add_special_tokens=False) for p in prompts]
    results: dict[int, Finished] = {}
    batcher = Batcher(model, tokenizer, BatchLimits(max_batch_size=8, batch_window_ms=200))
    try:
        for i, prompt_ids in enumerate(ids):
            batcher.submit(GenerationJob(prompt_ids, SamplingParams(max_new_tokens=12), None, stop_token_ids(tokenizer), lambda e, i=i: results.__setitem__(i, e)))
        deadline = time.monotonic() + 60
        while len(results) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        batcher.shutdown()
    assert batcher.stats.largest_batch == 3
    for i, prompt_ids in enumerate(ids):
        reference = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(reference[0, len(prompt_ids) :], skip_special_tokens=True)
        assert results[i].text == expected


def test_no_auth_only_on_loopback() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "key")
    with pytest.raises(FinqloraError, match="loopback"):
        check_bind("0.0.0.0", None)
    with pytest.raises(FinqloraError, match="loopback"):
        check_bind("192.168.1.5", None)


def test_adapter_names_and_folders_are_checked(sharp_base_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FinqloraError, match="not allowed"):
        ServingEngine.load(str(sharp_base_dir), {"../x": adapters["fin"]}, device="cpu")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapters["fin"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FinqloraError, match="pickle"):
        ServingEngine.load(str(sharp_base_dir), {"p": pickled}, device="cpu")


def test_vllm_command_carries_the_same_adapters(adapters: dict[str, Path]) -> None:
    command = vllm_command("/models/base", adapters, base_name="base", host="127.0.0.1", port=9000)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--served-model-name") + 1] == "base"
    assert "--enable-lora" in command and command[command.index("--max-lora-rank") + 1] == "8"
    assert command[-2:] == [f"fin={adapters['fin'].resolve()}", f"fin2={adapters['fin2'].resolve()}"]


def test_cli_vllm_engine(sharp_base_dir: Path, adapters: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from finqlora.cli import app

    args = ["serve", "--model", str(sharp_base_dir), "--adapter", f"fin={adapters['fin']}", "--engine", "vllm"]
    shown = CliRunner().invoke(app, [*args, "--print-command"])
    assert shown.exit_code == 0, shown.output
    assert "--lora-modules fin=" in shown.output and "VLLM_API_KEY=<your key>" in shown.output
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        missing = CliRunner().invoke(app, [*args, "--no-auth"])
        assert missing.exit_code != 0 and "needs vLLM" in str(missing.exception)


@pytest.mark.slow
def test_cli_serve_subprocess(sharp_base_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    """`finqlora serve` as users run it: a separate process, an API key file, then the SDK."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key_file = tmp_path / "KEY"
    key_file.write_text(API_KEY + "\n")
    command = [sys.executable, "-c", "from finqlora.cli import main; main()", "serve", "--model", str(sharp_base_dir), "--adapter", f"fin={adapters['fin']}",
               "--port", str(port), "--api-key-file", str(key_file), "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(process, url)
        sdk = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        assert [m.id for m in sdk.models.list()] == ["base", "fin"]
        assert chat(sdk, "fin", max_tokens=6)
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.slow
def test_builtin_smollm2_with_an_adapter(tmp_path: Path) -> None:
    """The built-in SmolLM2 served with a LoRA adapter: a real English answer; the adapter changes it."""
    from peft import LoraConfig, get_peft_model

    from finqlora.models.loading import load_model

    loaded = load_model("builtin:smollm2-135m-instruct", device="cpu")
    peft_model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(tmp_path / "smol-fin", safe_serialization=True)
    del peft_model, loaded

    engine = ServingEngine.load("builtin:smollm2-135m-instruct", {"fin": tmp_path / "smol-fin"}, device="cpu")
    running = start_in_thread(create_app(engine, api_key=API_KEY))
    try:
        sdk = openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        base = chat(sdk, "base", max_tokens=8, messages=question)
        assert "paris" in base.lower()
        assert chat(sdk, "fin", max_tokens=8, messages=question) != base
    finally:
        running.stop()


def test_sampling_is_reproducible_with_a_seed_and_survives_edge_values(client: openai.OpenAI) -> None:
    def sample(seed: int, temperature: float = 0.9) -> str:
        response = client.chat.completions.create(model="fin", messages=QUESTION, max_tokens=10, temperature=temperature, seed=seed, top_p=0.95)
        return response.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1
    # Found by the fuzz test: seeds beyond 64 bits and vanishing temperatures used to fail with 500.
    assert isinstance(sample(2**70), str) and isinstance(sample(-(2**70)), str)
    assert sample(1, temperature=1e-30) == chat(client, "fin", max_tokens=10)


def test_content_parts_and_developer_role_are_understood(client: openai.OpenAI) -> None:
    as_parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}]
    assert chat(client, "fin", messages=as_parts) == chat(client, "fin")
    with_developer = [{"role": "developer", "content": "你是金融分析助手。"}, *QUESTION]
    with_system = [{"role": "system", "content": "你是金融分析助手。"}, *QUESTION]
    assert chat(client, "fin", messages=with_developer) == chat(client, "fin", messages=with_system)


def test_batcher_timeouts_and_cancellation(sharp_base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finqlora.serve.batching import Failed

    tokenizer = AutoTokenizer.from_pretrained(sharp_base_dir)
    model = AutoModelForCausalLM.from_pretrained(sharp_base_dir).eval()
    prompt = tokenizer.encode("Gold rose because", add_special_tokens=False)
    events: dict[str, list] = {"expired": [], "slow": [], "cancelled": [], "normal": []}
    batcher = Batcher(model, tokenizer, BatchLimits(max_batch_size=4, batch_window_ms=100, max_new_tokens=200))

    def job(name: str, max_new_tokens: int = 8, deadline: float = float("inf")) -> GenerationJob:
        return GenerationJob(prompt, SamplingParams(max_new_tokens=max_new_tokens), None, [], events[name].append, deadline=deadline)

    try:
        cancelled = job("cancelled")
        cancelled.cancel()
        for item in (job("expired", deadline=time.monotonic() - 1), job("slow", 200, deadline=time.monotonic() + 0.15), cancelled, job("normal")):
            batcher.submit(item)
        deadline = time.monotonic() + 60
        while any(not got for got in events.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        batcher.shutdown()
    assert isinstance(events["expired"][0], Failed) and events["expired"][0].status == 504
    assert isinstance(events["slow"][0], Failed) and events["slow"][0].code == "timeout"
    assert events["cancelled"][0].finish_reason == "cancelled"
    assert events["normal"][0].finish_reason == "length" and events["normal"][0].completion_tokens == 8
    assert batcher.stats.timed_out == 2 and batcher.stats.cancelled == 1


def test_integral_numbers_are_integers_but_booleans_and_strings_are_not(server) -> None:
    """JSON Schema counts 4.0 as an integer (the fuzz test sends such values); true and "4" are not."""
    url, headers = server.url + "/v1/chat/completions", {"Authorization": f"Bearer {API_KEY}"}
    accepted = httpx.post(url, json={"model": "base", "messages": QUESTION, "max_tokens": 4.0}, headers=headers, timeout=60)
    assert accepted.status_code == 200 and accepted.json()["usage"]["completion_tokens"] <= 4
    for bad in ({"max_tokens": 4.5}, {"max_tokens": "4"}, {"n": True}):
        refused = httpx.post(url, json={"model": "base", "messages": QUESTION, **bad}, headers=headers, timeout=60)
        assert refused.status_code == 400, bad


def test_openapi_documents_every_response(server) -> None:
    """Issue 16: each route's responses are typed models in the schema, errors are OpenAI's body
    (never FastAPI's default 422, which this server does not answer), and streams document their chunks."""
    document = httpx.get(server.url + "/openapi.json", timeout=30).json()
    schemas = document["components"]["schemas"]
    expected = {
        ("post", "/v1/chat/completions"): "ChatCompletion",
        ("post", "/v1/completions"): "Completion",
        ("get", "/v1/models"): "ModelList",
        ("get", "/v1/models/{model_id}"): "ModelCard",
        ("get", "/health"): "Health",
    }
    for (method, path), model in expected.items():
        responses = document["paths"][path][method]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert "422" not in responses
        for status, response in responses.items():
            if status != "200":
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429"} <= set(chat)
    assert chat["200"]["content"]["text/event-stream"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionChunk"}
    assert set(schemas["ChatCompletionChunk"]["properties"]) == {"id", "object", "created", "model", "choices", "usage"}
    assert "completed" in schemas["BatcherStats"]["properties"] and "HTTPValidationError" not in schemas
