"""Issue 29 for `finqlora serve`, `finqlora ui` and `export unzip`: what a request or a file
may be before either server or the unpacker acts on it.

Items 5 (the UI's body limit), 6 (serve's Host check), the server part of 7 (a lone surrogate,
huge integers and deep nesting in an adapter config) and the serve/UI/export parts of 9. Each
test is named after its item. Requests whose attack is in the framing (a declared length that
never arrives, two requests on one keep-alive connection) go over raw sockets, because an HTTP
client would not send them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_until_healthy
from finqlora.cli import main
from finqlora.core.errors import FinqloraError
from finqlora.evaluate import ratings as R
from finqlora.export.adapter import CHECKSUMS_NAME, verify_adapter_zip
from finqlora.serve.batching import BatchLimits
from finqlora.serve.http_limits import DEFAULT_MAX_BODY_BYTES, allowed_hosts_for
from finqlora.serve.server import ServingEngine, create_app, start_in_thread
from finqlora.ui.app import create_ui_app
from finqlora.ui.launch import LOOPBACK_HOSTS, load_engine, make_state
from tests.serve.test_serve_hardening import CountingTokenizer, adapter_folder, raw_request
from tests.ui.test_ui import OWNER, make_run

JSON = {"Content-Type": "application/json"}
OWNER_AUTH = {"Authorization": f"Bearer {OWNER}"}


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length from `sock`: (status, body)."""
    received = b""
    while b"\r\n\r\n" not in received:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError("the server closed the connection")
        received += piece
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), body


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


@pytest.fixture(scope="module")
def api_server(tiny_model_dir: Path):
    """`finqlora serve --no-auth` as the issue ran it: default limits, no key, loopback."""
    engine = ServingEngine.load(str(tiny_model_dir), limits=BatchLimits(max_new_tokens=4), device="cpu")
    counting = CountingTokenizer(engine.tokenizer)
    engine.tokenizer = counting
    engine.prompt_tokenizers[None] = counting
    running = start_in_thread(create_app(engine, api_key=None))
    yield running, counting
    running.stop()


@pytest.fixture()
def ui_app(tmp_path: Path):
    """`finqlora ui --no-model` over a finished run (the rating and job APIs, no model)."""
    make_run(tmp_path / "runs")
    state = make_state(runs_root=tmp_path / "runs", owner_token=OWNER, workdir=tmp_path)
    app = create_ui_app(state, allowed_hosts=LOOPBACK_HOSTS)
    running = start_in_thread(app)
    yield running, app, state, tmp_path
    running.stop()


@pytest.fixture(scope="module")
def ui_with_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`finqlora ui` with a model, so that its OpenAI-compatible API is mounted at /llm."""
    root = tmp_path_factory.mktemp("ui-llm")
    engine = ServingEngine.load(str(tiny_model_dir), limits=BatchLimits(max_new_tokens=4), device="cpu")
    state = make_state(runs_root=root / "runs", engine=engine, owner_token=OWNER, workdir=root)
    running = start_in_thread(create_ui_app(state, allowed_hosts=LOOPBACK_HOSTS))
    yield running
    running.stop()  # the app's lifespan shuts the engine down


# ---------------------------------------------------------------------------------------------
# Item 5: the UI bounds every request body, before anything reads it


def test_item5_ui_body_limit(ui_app) -> None:
    running, app, state, root = ui_app
    rating_round = R.create_round(root / "runs" / "demo" / "eval", ["r1"], name="r")
    token = rating_round.raters["r1"]["token"]
    # Every POST route of the app (the rater's, unauthenticated, first), and an unknown path:
    # a 150 MB body is declared, 1 KB sent; the answer cannot have waited for the rest.
    routes = sorted({route.path.replace("{token}", token) for route in app.routes if "POST" in getattr(route, "methods", ())})
    assert f"/api/rate/{token}" in routes and "/api/jobs" in routes
    for path in ["/api/rate/x", *routes, "/no/such/route"]:
        started = time.monotonic()
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 150000000"
        status, headers, body, closed = raw_request(running.url, head, b"{" + b" " * 1023, wait_s=5)
        assert time.monotonic() - started < 5, path
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large", (path, body)
        assert headers["connection"] == "close" and closed, path
    # Chunked, with no declared length: refused as soon as the bytes read pass the limit.
    chunk = b" " * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(DEFAULT_MAX_BODY_BYTES // len(chunk) + 2))
    head = f"POST /api/rate/{token} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
    status, _, body, _ = raw_request(running.url, head, chunks, wait_s=5)
    assert status == 413, body
    # A body under the limit still reaches the route.
    item = rating_round.pairs[0]["item"]
    scores = {"A": {"professional": 4, "accuracy": 4}, "B": {"professional": 3, "accuracy": 3}}
    saved = httpx.post(f"{running.url}/api/rate/{token}", json={"item": item, "choice": "A", "scores": scores}, timeout=10)
    assert saved.status_code == 200 and saved.json()["rated"] == 1, saved.text


# ---------------------------------------------------------------------------------------------
# Item 6: `serve` answers only the Host names it is reached by (DNS rebinding)


def test_item6_serve_host_check(api_server) -> None:
    running, _ = api_server
    port = running.url.rsplit(":", 1)[1]
    ask = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=running.url, timeout=60) as client:
        for host in ("rebind.attacker.example", f"rebind.attacker.example:{port}", f"127.0.0.1.nip.example:{port}", "[::1"):
            for response in (client.get("/health", headers={"Host": host}), client.post("/v1/chat/completions", json=ask, headers={"Host": host})):
                assert response.status_code == 400, (host, response.text)
                assert response.json()["error"]["code"] == "invalid_host"
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST", "[0:0:0:0:0:0:0:1]:9000"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        assert client.post("/v1/chat/completions", json=ask).status_code == 200
    # Which names a bound server answers to: loopback, the bound address, and --allowed-host.
    assert allowed_hosts_for("127.0.0.1") == ["127.0.0.1", "localhost", "::1"]
    assert "127.0.0.2" in allowed_hosts_for("127.0.0.2")
    assert allowed_hosts_for("10.1.2.3", ["API.example"]) == ["127.0.0.1", "localhost", "::1", "10.1.2.3", "api.example"]
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("127.0.0.1", ["*"]) is None
    assert allowed_hosts_for("::", ["[::1]", "api.example"]) == ["127.0.0.1", "localhost", "::1", "api.example"]


def test_item6_serve_cli_allowed_host(tiny_model_dir: Path) -> None:
    """`finqlora serve --no-auth --allowed-host NAME` as a user runs it: NAME and loopback are
    answered, a rebinding name is not."""
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "finqlora", "serve", "--model", str(tiny_model_dir), "--no-auth", "--port", str(port),
               "--device", "cpu", "--allowed-host", "API.example"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(process, url)
        assert httpx.get(url + "/health", headers={"Host": f"api.example:{port}"}, timeout=5).status_code == 200
        refused = httpx.get(url + "/health", headers={"Host": f"rebind.attacker.example:{port}"}, timeout=5)
        assert refused.status_code == 400 and "api.example" in refused.json()["error"]["message"]
    finally:
        process.terminate()
        process.wait(30)


# ---------------------------------------------------------------------------------------------
# Item 7 (servers): a lone surrogate is a 400, and the connection stays open


SURROGATE_BODIES = [
    ("/v1/chat/completions", r'{"model":"base","messages":[{"role":"user","content":"gold \ud800 rose"}],"max_tokens":2}', "messages"),
    ("/v1/chat/completions", r'{"model":"base","messages":[{"role":"user","content":[{"type":"text","text":"\udfff"}]}]}', "messages"),
    ("/v1/chat/completions", r'{"model":"base","messages":[{"role":"user","content":"hi"}],"stop":["\ud800"]}', "stop"),
    ("/v1/completions", r'{"model":"base","prompt":"gold \ud800 rose","max_tokens":2}', "prompt"),
    ("/v1/completions", r'{"model":"base\ud800","prompt":"hi"}', "model"),
]


def test_item7_lone_surrogate_is_a_400_on_a_kept_connection(api_server) -> None:
    running, _ = api_server
    host, port = running.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for path, body, param in SURROGATE_BODIES:
            sock.sendall(post(path, body.encode()))
            status, answer = read_response(sock)
            assert status == 400, answer
            error = json.loads(answer)["error"]
            # (pydantic itself refuses it in a length-checked field, with its own words)
            assert error["param"] == param and ("lone surrogate" in error["message"] or "unicode string" in error["message"]), error
        # The same keep-alive connection still serves the next request.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_item7_next_class_lone_surrogate_in_the_ui_own_apis(ui_app) -> None:
    # The UI's own routes: FastAPI's validation answer echoes the input, which cannot be
    # encoded when it holds a lone surrogate.
    running, _, _, _ = ui_app
    with httpx.Client(base_url=running.url, timeout=10) as client:
        for path, body, headers in (("/api/rate/x", r'{"item": "\ud800"}', {}), ("/api/rounds", r'{"x": "\ud800"}', OWNER_AUTH),
                                    ("/api/rounds", r'{"run": "demo", "raters": ["\ud800"]}', OWNER_AUTH)):
            response = client.post(path, content=body, headers={**JSON, **headers})
            assert response.status_code in (400, 404, 422) and response.json()["error"], (path, response.text)


def test_item7_lone_surrogate_in_the_ui_llm_api_is_a_400(ui_with_model) -> None:
    host, port = ui_with_model.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(post("/llm/v1/chat/completions", SURROGATE_BODIES[0][1].encode(), f"Authorization: Bearer {OWNER}\r\n"))
        status, answer = read_response(sock)
        assert status == 400 and json.loads(answer)["error"]["param"] == "messages", answer
        sock.sendall(b"GET /llm/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + OWNER.encode() + b"\r\n\r\n")
        assert read_response(sock)[0] == 200


# ---------------------------------------------------------------------------------------------
# Item 7 (serve): huge integers and deep nesting in adapter_config.json


@pytest.mark.parametrize(
    "config, expected",
    [("[" * 100_000, "nested deeper than"), ('{"peft_type": "LORA", "r": 1' + "0" * 5000 + "}", "4,300 digits"),
     (b" " * (1 << 20) + b"{}", "bytes, more than the 1,048,576 allowed")],
    ids=["100k-brackets", "5000-digit-integer", "oversized"],
)
def test_item7_serve_adapter_config_with_huge_integer_or_deep_nesting(config: str | bytes, expected: str, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    folder = adapter_folder(tmp_path, "hostile", config=config)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--model", str(tiny_model_dir), "--adapter", f"fin={folder}", "--no-auth", "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and "hint:" in stderr and "Traceback" not in stderr, stderr
    assert expected in " ".join(stderr.split()), stderr


def test_item7_next_class_serve_adapter_tokenizer_files(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    # An adapter folder brings its own tokenizer files (finqlora train saves them); transformers
    # parses them with Python's parser, after the base model has loaded.
    folder = adapter_folder(tmp_path, "hostile")
    (folder / "tokenizer_config.json").write_text("[" * 100_000, encoding="utf-8")
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--model", str(tiny_model_dir), "--adapter", f"fin={folder}", "--no-auth", "--device", "cpu"])
    stderr = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 2 and "tokenizer_config.json: not a valid JSON tokenizer file (nested deeper than" in stderr and "Traceback" not in stderr, stderr


# ---------------------------------------------------------------------------------------------
# Item 9 (serve, ui, export): the smaller ones


def test_item9_zip_ratio_covers_the_whole_archive(tmp_path: Path) -> None:
    # 24 entries of 1 MiB (none over the per-entry floor) from a ~25 KB zip: ratio ~1000.
    files = {"adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", "adapter_config.json": b'{"peft_type": "LORA", "r": 4}'}
    files.update({f"pad/{n:03d}.txt": b"\0" * (1 << 20) for n in range(24)})
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items()).encode()
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in [*files.items(), (CHECKSUMS_NAME, sums)]:
            archive.writestr(name, data)
    assert path.stat().st_size < 100_000
    with pytest.raises(FinqloraError) as caught:
        verify_adapter_zip(path)
    assert "from a zip of" in caught.value.message and "--max-ratio" in caught.value.hint, caught.value.message


def test_item9_zip_entries_that_name_one_file_twice(tmp_path: Path, capsys) -> None:
    files = {"adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", "adapter_config.json": b'{"peft_type": "LORA", "r": 4}',
             "a/b": b"one", "a/./b": b"two"}
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items()).encode()
    path = tmp_path / "twice.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in [*files.items(), (CHECKSUMS_NAME, sums)]:
            archive.writestr(name, data)
    with pytest.raises(SystemExit) as exited:
        main(["export", "unzip", str(path), "--output", str(tmp_path / "out")])
    stderr = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 2 and "entry 'a/./b' and entry 'a/b' both unpack to 'a/b'" in stderr, stderr
    assert "disk space" not in stderr and not (tmp_path / "out").exists()


def test_item9_prompt_size_counts_messages(api_server) -> None:
    running, counting = api_server
    calls_before = len(counting.calls)
    many = {"model": "base", "messages": [{"role": "user", "content": ""}] * 30_000, "max_tokens": 2}
    response = httpx.post(running.url + "/v1/chat/completions", json=many, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "30000 messages" in error["message"], error
    assert len(counting.calls) == calls_before, "30k messages must be refused before the template renders them"
    assert httpx.get(running.url + "/health", timeout=5).status_code == 200


def test_item9_weak_keys_one_rule_everywhere(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "KEY").write_text("a\n", encoding="utf-8")
    for args, env in ((["--api-key-file", str(tmp_path / "KEY")], None), ([], "a"), ([], "short12")):
        if env is None:
            monkeypatch.delenv("FINQLORA_API_KEY", raising=False)
        else:
            monkeypatch.setenv("FINQLORA_API_KEY", env)
        with pytest.raises(SystemExit) as exited:  # refused before any model is loaded
            main(["serve", "--model", str(tmp_path / "no-such-model"), *args])
        stderr = " ".join(capsys.readouterr().err.split())
        assert exited.value.code == 2 and "shorter than 8 characters" in stderr, (args, env, stderr)


def test_item9_ui_llm_pages_need_the_owner_token(ui_with_model) -> None:
    with httpx.Client(base_url=ui_with_model.url, timeout=30) as client:
        for path in ("/llm/docs", "/llm/openapi.json", "/llm/health", "/llm/v1/models"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong-token-0123"}).status_code == 401, path
            assert client.get(path, headers=OWNER_AUTH).status_code == 200, path
            assert client.get(path, cookies={"finqlora_owner": OWNER}).status_code == 200, path


def test_item9_a_damaged_round_blocks_no_other_rater(ui_app) -> None:
    running, _, _, root = ui_app
    eval_dir = root / "runs" / "demo" / "eval"
    good = R.create_round(eval_dir, ["r1"], name="good")
    no_order = R.create_round(eval_dir, ["r2"], name="no-order")
    garbage = R.create_round(eval_dir, ["r3"], name="garbage")
    stored = json.loads((no_order.folder / R.ROUND_FILE).read_text(encoding="utf-8"))
    del stored["raters"]["r2"]["a_is"]
    (no_order.folder / R.ROUND_FILE).write_text(json.dumps(stored), encoding="utf-8")
    (garbage.folder / R.ROUND_FILE).write_bytes(b"\xff{not json")
    with httpx.Client(base_url=running.url, timeout=10) as client:
        token = good.raters["r1"]["token"]
        assert client.get(f"/rate/{token}").status_code == 200
        assert client.get(f"/api/rate/{token}").status_code == 200
        for broken in (no_order.raters["r2"]["token"], garbage.raters["r3"]["token"]):
            response = client.get(f"/api/rate/{broken}")
            assert response.status_code == 404 and str(root) not in response.text, response.text
        # A damaged ratings file: the rater learns it, but not where it lives.
        good.rater_file("r1").write_text("[" * 100_000, encoding="utf-8")
        response = client.get(f"/api/rate/{token}")
        assert response.status_code == 503 and str(root) not in response.text and "owner" in response.text, response.text
        # The owner sees every round that can be read, and which cannot, with its path.
        listed = client.get("/api/rounds", headers=OWNER_AUTH)
        assert listed.status_code == 200 and listed.json()["rounds"] == [], listed.text
        broken_files = sorted(entry["error"].split(": ")[0] for entry in listed.json()["broken_rounds"])
        assert broken_files == sorted([str(good.rater_file("r1")), *(str(r.folder / R.ROUND_FILE) for r in (garbage, no_order))])
        good.rater_file("r1").unlink()
        assert [entry["round"] for entry in client.get("/api/rounds", headers=OWNER_AUTH).json()["rounds"]] == ["good"]


def test_item9_a_job_cannot_replace_another_run(ui_app) -> None:
    running, _, state, root = ui_app
    (root / "configs").mkdir()
    (root / "configs" / "clash.yaml").write_text(f"name: demo\ntrain:\n  output_dir: {root / 'elsewhere' / 'demo'}\n", encoding="utf-8")
    demo = state.run_dir("demo")
    response = httpx.post(f"{running.url}/api/jobs", json={"config": "configs/clash.yaml"}, headers=OWNER_AUTH, timeout=30)
    assert response.status_code == 400 and "already shows another run named 'demo'" in response.json()["error"], response.text
    assert state.run_dir("demo") == demo and state.jobs.jobs == []


def test_item9_names_ending_in_a_newline_are_refused(tmp_path: Path) -> None:
    make_run(tmp_path)
    with pytest.raises(FinqloraError, match="round name"):
        R.create_round(tmp_path / "demo" / "eval", ["r1"], name="round1\n")
    folder = adapter_folder(tmp_path, "adapter")
    with pytest.raises(FinqloraError, match="adapter name"):
        ServingEngine.load("unused", {"fin\n": folder})


def test_item9_a_run_folder_named_base_opens_in_the_ui(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from finqlora.models.loading import load_model

    run = make_run(tmp_path / "runs", "base")
    (run / "run_config.yaml").write_text(f"name: base\ntrain:\n  model: {tiny_model_dir}\n", encoding="utf-8")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_model(str(tiny_model_dir), device="cpu").model, lora).save_pretrained(run, safe_serialization=True)
    engine = load_engine(None, {"base": run}, device="cpu")
    try:
        assert engine.base_name == "base-model" and list(engine.adapters) == ["base"]
    finally:
        engine.shutdown()
    # A folder whose name cannot name a model: the hint is about the folder, not serve's options.
    odd = tmp_path / "my run"
    run.rename(odd)
    with pytest.raises(FinqloraError) as caught:
        load_engine(None, {"my run": odd}, device="cpu")
    assert "rename the folder" in caught.value.hint and "--adapter" not in caught.value.hint and "--base-name" not in caught.value.hint


def test_item9_csrf_bodies_must_be_json(ui_app, api_server) -> None:
    running, _, state, root = ui_app
    (root / "configs").mkdir()
    (root / "configs" / "ok.yaml").write_text("name: other\n", encoding="utf-8")
    body = json.dumps({"config": "configs/ok.yaml"}).encode()
    # What a page on another site can send without the browser asking: text/plain, a form,
    # a typeless Blob; each with the owner's cookie (were it sent).
    with httpx.Client(timeout=10) as client:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            request = client.build_request("POST", f"{running.url}/api/jobs", content=body, headers={"Cookie": f"finqlora_owner={OWNER}"})
            request.headers.pop("Content-Type", None)
            if content_type:
                request.headers["Content-Type"] = content_type
            response = client.send(request)
            assert response.status_code == 415, (content_type, response.text)
    assert state.jobs.jobs == []
    api, _ = api_server
    ask = json.dumps({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert httpx.post(api.url + "/v1/chat/completions", content=ask, headers={"Content-Type": "text/plain"}, timeout=10).status_code == 415


# ---------------------------------------------------------------------------------------------
# The next of each class, found while fixing the ones above


@pytest.mark.parametrize(
    "config, expected",
    [("[" * 100_000, "nested deeper than"), ('{"num_hidden_layers": 1' + "0" * 5000 + "}", "4,300 digits"),
     (json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "num_hidden_layers": "two"}), "field 'num_hidden_layers'"),
     (json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 128}),
      "field 'vocab_size': Field required")],
    ids=["100k-brackets", "5000-digit-integer", "string-count", "missing-field"],
)
def test_item7_next_class_gguf_export_of_a_hostile_model_config(config: str, expected: str, tmp_path: Path, capsys) -> None:
    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text(config, encoding="utf-8")
    with pytest.raises(SystemExit) as exited:
        main(["export", "gguf", "--model", str(model), "--output", str(tmp_path / "out.gguf")])
    stderr = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 2 and "hint:" in stderr and expected in stderr, stderr
    assert not (tmp_path / "out.gguf").exists()


def test_item5_next_class_a_rating_round_bounds_its_raters(tmp_path: Path) -> None:
    # Each rater stores an A/B order per pair: 1 MiB of rater names must not make the owner's
    # request write gigabytes.
    make_run(tmp_path)
    with pytest.raises(FinqloraError, match="at most 100 raters"):
        R.create_round(tmp_path / "demo" / "eval", [f"r{n}" for n in range(R.MAX_RATERS + 1)])
    assert len(R.create_round(tmp_path / "demo" / "eval", [f"r{n}" for n in range(R.MAX_RATERS)]).raters) == R.MAX_RATERS


def test_item9_next_class_a_round_file_cannot_name_a_path(tmp_path: Path) -> None:
    # A rater's name becomes rater-NAME.json: one edited into round.json must not reach a path.
    make_run(tmp_path)
    created = R.create_round(tmp_path / "demo" / "eval", ["r1"], name="r")
    stored = json.loads((created.folder / R.ROUND_FILE).read_text(encoding="utf-8"))
    stored["raters"]["../../../escaped"] = stored["raters"].pop("r1")
    (created.folder / R.ROUND_FILE).write_text(json.dumps(stored), encoding="utf-8")
    with pytest.raises(R.RatingFileError, match="not a plain name"):
        R.load_round(created.folder)
