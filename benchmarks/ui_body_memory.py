"""Memory of `finqlora ui --no-model` while large unauthenticated bodies arrive (issue 29, item 5).

Starts the real command on a free port, reads its resident memory (VmRSS) and peak (VmHWM)
from /proc, then sends --bodies concurrent POSTs of --mb MB each to the rater API
`/api/rate/x` (no token needed to reach it) over raw sockets, as a web page's no-cors fetch
could, and reads them again. Printed: RSS before, the peak after, how far each sender got
before the server answered, and the status line. Linux only (/proc).

    .venv/bin/python benchmarks/ui_body_memory.py --content-type text/plain
    PYTHONPATH=OLD/src .venv/bin/python benchmarks/ui_body_memory.py   # the same against other sources
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def memory_mib(pid: int, field: str) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith(field + ":"):
            return int(row.split()[1]) // 1024
    raise KeyError(field)


def send(port: int, size: int, content_type: str, replies: list[tuple[int, str]]) -> None:
    chunk = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        head = f"POST /api/rate/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {size}\r\n\r\n"
        sock.sendall(head.encode())
        sent = 0
        try:
            while sent < size:
                sock.sendall(chunk[: size - sent])
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed the connection before the body was complete
        try:
            replies.append((min(sent, size), sock.recv(200).split(b"\r\n")[0].decode()))
        except OSError as exc:
            replies.append((min(sent, size), repr(exc)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bodies", type=int, default=3)
    parser.add_argument("--mb", type=int, default=150)
    parser.add_argument("--content-type", default="application/json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    (root / "runs").mkdir()
    command = [sys.executable, "-m", "finqlora", "ui", "--no-model", "--port", "0", "--runs-root", str(root / "runs")]
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "/login?token=" not in line:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                raise SystemExit(f"finqlora ui exited with {process.returncode}")
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))
        time.sleep(1)
        before = memory_mib(process.pid, "VmRSS")
        replies: list[tuple[int, str]] = []
        started = time.monotonic()
        senders = [threading.Thread(target=send, args=(port, args.mb * 1_000_000, args.content_type, replies)) for _ in range(args.bodies)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        elapsed = time.monotonic() - started
        time.sleep(1)
        print(f"{args.bodies} x {args.mb} MB ({args.content_type}): RSS {before} MiB before, peak {memory_mib(process.pid, 'VmHWM')} MiB, "
              f"RSS {memory_mib(process.pid, 'VmRSS')} MiB after; answered in {elapsed:.1f} s")
        for sent, status in replies:
            print(f"  sent {sent / 1e6:.0f} MB -> {status}")
    finally:
        process.terminate()
        process.wait(30)


if __name__ == "__main__":
    main()
