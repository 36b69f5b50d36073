"""`/health` latency of `finqlora serve` while the largest refused requests are in flight.

Issue 18 item 3: a 10 MB body used to make `/health` take 5.5 s, because prompts were
tokenized on the event loop before any length check. This script serves a model with the
server's default limits (`HTTPLimits()`, `BatchLimits()`), then probes `/health` --samples
times (one request every --interval-ms, one keep-alive connection) in each phase:

- `no attack`: the baseline, measured in the same run;
- `oversized body`: attackers keep sending a 50 MB body (answered 413 before parsing);
- `body at the limit`: a JSON body just under the 1 MiB body limit whose prompt is far over
  the character limit (parsed, then answered 400 before tokenizing);
- `prompt at the character limit`: the longest prompt that passes the character check, over
  the token limit (tokenized in the thread pool, then answered 400 context_length_exceeded):
  the most work a refused request can cost;
- `short bodies`: 50 connections an attacker that send less than their Content-Length and
  wait (each is answered 408 when --body-timeout passes).

The attackers run in other processes (so their own JSON and socket work does not share the
server's interpreter lock), --attackers of them at once, each sending one request after
another. Printed per phase: /health median, p95 and max in ms, p95 relative to no attack,
and how the attack requests were answered.

    .venv/bin/python benchmarks/serve_health_under_attack.py --model builtin:qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import platform
import socket
import statistics
import sys
import time
from typing import Any

import httpx

API_KEY = "benchmark-key-0123456789"
OVERSIZED_BYTES = 50_000_000
SHORT_BODY_CONNECTIONS = 50  # held open at once by each attacker in the short-body phase


def _head(port: int, length: int) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _status(reply: bytes) -> str:
    parts = reply.split(b" ", 2)
    return parts[1].decode() if len(parts) > 1 else "no reply"


def _oversized(port: int) -> str:
    """Declare and send 50 MB; the server answers 413 and closes after the first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(_head(port, OVERSIZED_BYTES))
        piece = b"x" * (1 << 20)
        try:
            for _ in range(OVERSIZED_BYTES // len(piece)):
                sock.sendall(piece)
        except OSError:  # closed by the server after its 413: the expected outcome
            pass
        try:
            return _status(sock.recv(4096))
        except OSError:
            return "reset after 413"


def _short_bodies(port: int, connections: int, hold_s: float) -> list[str]:
    """Open `connections` requests that promise 1000 bytes and send 10, then wait for the answers."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=hold_s + 30) for _ in range(connections)]
    try:
        for sock in sockets:
            sock.sendall(_head(port, 1000) + b'{"model": ')
        return [_status(sock.recv(4096)) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _send(kind: str, port: int, body: bytes, hold_s: float, http: httpx.Client) -> list[str]:
    if kind == "oversized":
        return [_oversized(port)]
    if kind == "short":
        return _short_bodies(port, SHORT_BODY_CONNECTIONS, hold_s)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return [str(http.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=body, headers=headers).status_code)]


def attacker(kind: str, port: int, body: bytes, hold_s: float, stop: Any, results: Any) -> None:
    """One attacking process: send `kind` requests one after another until `stop` is set."""
    counts: collections.Counter[str] = collections.Counter()
    seconds: list[float] = []
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                counts.update(_send(kind, port, body, hold_s, http))
            except OSError as exc:
                counts[type(exc).__name__] += 1
            seconds.append(time.perf_counter() - started)
    results.put((dict(counts), seconds))


def probe_health(url: str, samples: int, interval_s: float) -> list[float]:
    latencies = []
    with httpx.Client(timeout=30) as http:
        http.get(url + "/health")  # connect first: only the request is timed
        for _ in range(samples):
            started = time.perf_counter()
            response = http.get(url + "/health")
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
            time.sleep(interval_s)
    return latencies


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def attack_bodies(chars_limit: int, max_body_bytes: int) -> dict[str, bytes]:
    def chat(content: str) -> bytes:
        return json.dumps({"model": "base", "messages": [{"role": "user", "content": content}]}, ensure_ascii=False).encode()

    # Chinese characters are 3 bytes in UTF-8: fill the body to just under the limit.
    at_body_limit = chat("金" * ((max_body_bytes - 200) // 3))
    assert len(at_body_limit) <= max_body_bytes
    unit = "黄金价格 "  # ~5 characters, several tokens: far over the token limit at the character limit
    at_chars_limit = chat((unit * (chars_limit // len(unit) + 1))[:chars_limit])
    return {"body_limit": at_body_limit, "chars_limit": at_chars_limit}


def run_phase(kind: str | None, port: int, url: str, body: bytes, args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    stop, results = context.Event(), context.Queue()
    workers = [context.Process(target=attacker, args=(kind, port, body, args.body_timeout, stop, results)) for _ in range(args.attackers if kind else 0)]
    for worker in workers:
        worker.start()
    if workers:
        time.sleep(args.warmup)  # the attackers' interpreters start and their first requests are in flight
    latencies = probe_health(url, args.samples, args.interval_ms / 1000)
    stop.set()
    answered: collections.Counter[str] = collections.Counter()
    attack_seconds: list[float] = []
    for _ in workers:
        counts, seconds = results.get(timeout=args.body_timeout + 120)
        answered.update(counts)
        attack_seconds += seconds
    for worker in workers:
        worker.join(30)
    return {
        "median_ms": statistics.median(latencies),
        "p95_ms": p95(latencies),
        "max_ms": max(latencies),
        "attack_answers": dict(answered),
        "attack_median_s": statistics.median(attack_seconds) if attack_seconds else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=200, help="/health requests per phase")
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--attackers", type=int, default=2, help="attacking processes per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds between starting the attackers and probing")
    parser.add_argument("--body-timeout", type=float, default=5.0, help="the server's body timeout (s) for the short-body phase")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    from finqlora.serve.batching import BatchLimits
    from finqlora.serve.http_limits import HTTPLimits
    from finqlora.serve.server import ServingEngine, create_app, start_in_thread

    print(f"loading {args.model} ...", file=sys.stderr)
    engine = ServingEngine.load(args.model, limits=BatchLimits(), device="cpu")
    http_limits = HTTPLimits(body_timeout_s=args.body_timeout)
    server = start_in_thread(create_app(engine, api_key=API_KEY, http_limits=http_limits))
    port = int(server.url.rsplit(":", 1)[1])
    bodies = attack_bodies(engine.batcher.limits.prompt_chars_limit, http_limits.max_body_bytes)
    phases = {
        "no attack": (None, b""),
        "oversized body (50 MB, 413)": ("oversized", b""),
        f"body at the limit ({len(bodies['body_limit']):,} bytes, 400 before tokenizing)": ("json", bodies["body_limit"]),
        f"prompt at the character limit ({engine.batcher.limits.prompt_chars_limit:,} chars, tokenized, 400)": ("json", bodies["chars_limit"]),
        f"short bodies ({SHORT_BODY_CONNECTIONS} connections an attacker, 408 after {args.body_timeout:g} s)": ("short", b""),
    }
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, (kind, body) in phases.items():
            results[name] = run_phase(kind, port, server.url, body, args)
            print(f"{name}: /health median {results[name]['median_ms']:.1f} ms, p95 {results[name]['p95_ms']:.1f} ms", file=sys.stderr)
    finally:
        server.stop()
        engine.shutdown()

    base = results["no attack"]
    print(f"\n/health under attack: {args.model}, default limits ({http_limits.max_body_bytes:,} bytes a body, "
          f"{engine.batcher.limits.prompt_chars_limit:,} prompt characters, {engine.batcher.limits.max_prompt_tokens} prompt tokens), "
          f"{args.attackers} attacking processes, {args.samples} probes a phase")  # fmt: skip
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    print("| phase | /health median (ms) | p95 (ms) | max (ms) | p95 / no attack | attack requests answered | attack median (s) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name, result in results.items():
        answers = ", ".join(f"{status}: {count}" for status, count in sorted(result["attack_answers"].items())) or "-"
        attack = f"{result['attack_median_s']:.3f}" if result["attack_median_s"] is not None else "-"
        print(f"| {name} | {result['median_ms']:.1f} | {result['p95_ms']:.1f} | {result['max_ms']:.1f} | "
              f"{result['p95_ms'] / base['p95_ms']:.2f}x | {answers} | {attack} |")  # fmt: skip
    worst = max(result["p95_ms"] for name, result in results.items() if name != "no attack")
    print(f"\nworst p95 under attack: {worst:.1f} ms (target < 100 ms: {'pass' if worst < 100 else 'FAIL'})")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
