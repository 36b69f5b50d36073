"""Issue 18 for `finqlora serve`: one request must not freeze the server (item 3), and a broken
adapter folder is a clear `error:` + `hint:` with exit status 2, not a traceback (item 6).

The requests are sent over raw sockets where the attack is in the framing itself (a body
shorter than its Content-Length, a huge declared length, chunks without end), because an
HTTP client library would refuse to send them.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from finqlora.cli import main
from finqlora.serve.batching import CHARS_PER_TOKEN_BOUND, BatchLimits
from finqlora.serve.http_limits import HTTPLimits
from finqlora.serve.routes import MESSAGE_OVERHEAD_CHARS
from finqlora.serve.server import ServingEngine, create_app, start_in_thread

API_KEY = "hardening-key-0123456789"
QUESTION = [{"role": "user", "content": "美联储宣布加息25个基点，对黄金价格有何影响？"}]
MAX_BODY = 64 * 1024
BODY_TIMEOUT_S = 1.0
MAX_PROMPT_CHARS = 2000


class CountingTokenizer:
    """The real tokenizer, recording each call that renders or tokenizes and the thread it ran on."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def _record(self, name: str) -> None:
        self.calls.append((name, threading.current_thread().name))

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self._record("encode")
        return self._tokenizer.encode(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self._record("apply_chat_template")
        return self._tokenizer.apply_chat_template(*args, **kwargs)


@pytest.fixture(scope="module")
def counting_server(tiny_model_dir: Path):
    limits = BatchLimits(max_batch_size=4, max_queue=16, max_prompt_tokens=256, max_new_tokens=8, max_prompt_chars=MAX_PROMPT_CHARS)
    engine = ServingEngine.load(str(tiny_model_dir), limits=limits, device="cpu")
    counting = CountingTokenizer(engine.tokenizer)
    engine.tokenizer = counting
    engine.prompt_tokenizers[None] = counting
    app = create_app(engine, api_key=API_KEY, http_limits=HTTPLimits(max_body_bytes=MAX_BODY, body_timeout_s=BODY_TIMEOUT_S))
    running = start_in_thread(app)
    yield running, counting
    running.stop()


def raw_request(url: str, head: str, body: bytes, *, wait_s: float = 10.0) -> tuple[int, dict[str, str], bytes, bool]:
    """Send `head` (request line + headers, without the blank line) and `body` as they are, then read
    the reply: (status, headers, body, whether the server closed the connection afterwards)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        received = b""
        closed = False
        while b"\r\n\r\n" not in received:
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
        header_block, _, rest = received.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(rest) < int(headers.get("content-length", 0)):
            rest += sock.recv(65536)
        try:
            closed = sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed = False
        return status, headers, rest, closed


def post_head(path: str, extra: str) -> str:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n{extra}"


def test_item3_oversized_body_is_refused_before_parsing(counting_server) -> None:
    running, counting = counting_server
    calls_before = len(counting.calls)
    # A 50 MB body is declared but only 1 KB sent: the refusal cannot have waited for, or parsed, the body.
    started = time.monotonic()
    status, headers, body, closed = raw_request(running.url, post_head("/v1/chat/completions", "Content-Length: 50000000"), b"{" + b" " * 1023)
    assert time.monotonic() - started < 5
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert headers["connection"] == "close" and closed
    # Chunked, without a Content-Length: refused once the bytes read pass the limit.
    chunk = b"x" * 16384
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // len(chunk) + 2))
    status, _, body, _ = raw_request(running.url, post_head("/v1/completions", "Transfer-Encoding: chunked"), chunks)
    assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert len(counting.calls) == calls_before, "nothing may be tokenized for a refused body"
    # A body under the limit is served as before.
    ok = httpx.post(running.url + "/v1/chat/completions", json={"model": "base", "messages": QUESTION, "max_tokens": 2},
                    headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)  # fmt: skip
    assert ok.status_code == 200, ok.text


def test_item3_short_body_times_out(counting_server) -> None:
    running, _ = counting_server
    started = time.monotonic()
    status, headers, body, closed = raw_request(running.url, post_head("/v1/chat/completions", "Content-Length: 200"), b'{"model": "base"')
    elapsed = time.monotonic() - started
    assert status == 408, body
    assert BODY_TIMEOUT_S * 0.9 <= elapsed < BODY_TIMEOUT_S + 5
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert headers["connection"] == "close" and closed
    assert httpx.get(running.url + "/health", timeout=5).status_code == 200


def test_item3_long_prompt_refused_before_tokenizing(counting_server) -> None:
    running, counting = counting_server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    calls_before = len(counting.calls)
    long_text = "金" * (MAX_PROMPT_CHARS + 1)
    chat = httpx.post(running.url + "/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": long_text}]}, headers=headers, timeout=30)
    completion = httpx.post(running.url + "/v1/completions", json={"model": "base", "prompt": ["hi", long_text]}, headers=headers, timeout=30)
    for response, param in ((chat, "messages"), (completion, "prompt")):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == param
        counted = MAX_PROMPT_CHARS + 1 + (MESSAGE_OVERHEAD_CHARS if param == "messages" else 0)  # a chat pays for its markers
        assert f"{counted} characters" in error["message"]
    assert len(counting.calls) == calls_before, counting.calls[calls_before:]
    # Under the character limit the prompt is tokenized (so the counter above could see it) ...
    served = httpx.post(running.url + "/v1/chat/completions", json={"model": "base", "messages": QUESTION, "max_tokens": 2}, headers=headers, timeout=60)
    assert served.status_code == 200 and len(counting.calls) > calls_before
    # ... and the token limit still applies to what passes the character limit.
    tokens_over = httpx.post(running.url + "/v1/completions", json={"model": "base", "prompt": "gold " * 300}, headers=headers, timeout=60)
    assert tokens_over.status_code == 400 and "tokens" in tokens_over.json()["error"]["message"]
    assert BatchLimits().prompt_chars_limit == CHARS_PER_TOKEN_BOUND * BatchLimits().max_prompt_tokens


def test_item3_prompts_are_tokenized_off_the_event_loop(counting_server) -> None:
    running, counting = counting_server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    calls_before = len(counting.calls)
    assert httpx.post(running.url + "/v1/chat/completions", json={"model": "base", "messages": QUESTION, "max_tokens": 2}, headers=headers, timeout=60).status_code == 200
    assert httpx.post(running.url + "/v1/completions", json={"model": "base", "prompt": "Gold rose", "max_tokens": 2}, headers=headers, timeout=60).status_code == 200
    threads = {thread for _, thread in counting.calls[calls_before:]}
    assert threads and "finqlora-uvicorn" not in threads, threads  # start_in_thread runs the event loop there


# ---------------------------------------------------------------------------------------------
# Item 6: a broken adapter folder given to `finqlora serve`

GOOD_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": None}
LORA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def adapter_folder(root: Path, name: str, *, config: str | bytes | None = None, weights: bytes | None = None) -> Path:
    folder = root / name
    folder.mkdir()
    config = json.dumps(GOOD_CONFIG) if config is None else config
    (folder / "adapter_config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    if weights is None:
        save_file({LORA_KEY: torch.zeros(4, 64)}, str(folder / "adapter_model.safetensors"))
    else:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def truncated_weights(tmp_path: Path) -> bytes:
    whole = tmp_path / "whole.safetensors"
    save_file({LORA_KEY: torch.zeros(4, 64)}, str(whole))
    return whole.read_bytes()[:-100]


def no_lora_weights(tmp_path: Path) -> bytes:
    other = tmp_path / "other.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(other))
    return other.read_bytes()


@pytest.mark.parametrize(
    "case, expected",
    [
        ({"config": "{not json"}, "not a valid JSON adapter config (Expecting property name enclosed in double quotes at column 2)"),
        ({"config": "[1, 2]"}, "JSON list, not an object"),
        ({"config": json.dumps({**GOOD_CONFIG, "r": "eight"})}, "field 'r'"),
        ({"config": json.dumps({**GOOD_CONFIG, "peft_type": "WIZARD"})}, "unknown peft_type 'WIZARD'"),
        ({"config": b"\xff\xfe\x00 garbage"}, "not a valid JSON adapter config (not UTF-8"),
        ({"weights": b"\x00garbage, not safetensors" * 40}, "not a readable safetensors file"),
        ({"weights": b""}, "not a readable safetensors file"),
        ({"weights": truncated_weights}, "not a readable safetensors file"),
        ({"weights": no_lora_weights}, "holds no LoRA weights"),
    ],
    ids=["bad-json", "json-list", "wrong-type", "unknown-peft-type", "binary-config", "garbage-weights", "empty-weights", "truncated-weights", "no-lora-tensors"],
)
def test_item6_broken_adapter_is_an_error_with_a_hint(case: dict[str, Any], expected: str, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    weights = case.get("weights")
    if callable(weights):
        weights = weights(tmp_path)
    folder = adapter_folder(tmp_path, "broken", config=case.get("config"), weights=weights)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--model", str(tiny_model_dir), "--adapter", f"fin={folder}", "--no-auth", "--device", "cpu"])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "error:" in stderr and "hint:" in stderr and "Traceback" not in stderr, stderr
    assert expected in " ".join(stderr.split()), stderr
