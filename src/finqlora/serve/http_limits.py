"""What an HTTP request must be before the app sees it: a known Host, a JSON body of bounded
size, arriving in bounded time. Both servers (`finqlora serve` and `finqlora ui`) use these.

`HostGuard` answers **400** to a request whose `Host` header names a host the server was not
told it is reached by (`allowed_hosts_for`): a web page whose DNS name was re-pointed at
127.0.0.1 (DNS rebinding) sends its own name, so it cannot reach a loopback server.

`RequestBodyGuard` is a pure ASGI middleware. It answers **415** to a POST, PUT or PATCH that
is not `Content-Type: application/json` (every body these servers take is JSON; a page on
another site can send text/plain, form or typeless bodies without asking the browser's
permission, but not JSON, so this holds off cross-site posts on any FastAPI version). It then
reads the whole request body itself, and hands it to the app, so:

- a body declared (Content-Length) or found (chunked) to be larger than `max_body_bytes` is
  answered **413** at once, before any byte is parsed as JSON: a 50 MB body costs the server
  nothing but the bytes read up to the limit;
- a body that does not arrive within `body_timeout_s` of the request's start (a client that
  sends less than its Content-Length, or trickles it) is answered **408** and the connection
  closed, instead of holding a connection and a task forever.

All refusals have OpenAI's error body; 413 and 408 add `Connection: close`, because the rest
of the body is never read.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
# The names a browser on this machine uses for a loopback server (IPv6 without its brackets).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
BODY_METHODS = (b"POST", b"PUT", b"PATCH")
_HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]\s]+))(?::\d*)?", re.ASCII)


@dataclass(frozen=True)
class HTTPLimits:
    """Per-request bounds enforced before a body is parsed."""

    # 1 MiB is ~20x the JSON of a 2048-token prompt in Chinese (3 bytes a character in UTF-8).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # from the request's headers to its last body byte

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {self.max_body_bytes}")
        if not self.body_timeout_s > 0:
            raise ValueError(f"body_timeout_s must be more than 0, got {self.body_timeout_s}")


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # the HTTP parser refuses these first; be safe anyway
                return None
    return None


def _normal_host(name: str) -> str:
    """A host name as `HostGuard` compares it: lower case; an IPv6 literal without brackets,
    in its short form (so `[0:0:0:0:0:0:0:1]` is `::1`)."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.IPv6Address(name))
    except ValueError:
        return name


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> list[str] | None:
    """The `Host` names a server bound to `bind_host` answers to; None means any.

    Always the loopback names and the bound address itself (e.g. 127.0.0.2, or a LAN
    address), plus the `extra` names the user gives (`--allowed-host`, for a DNS name the
    server is reached by; `*` allows any). Bound to every interface (0.0.0.0 or ::) with no
    `--allowed-host`, any name is answered: such a server needs an API key, which a
    rebinding page does not have; list the names to check them anyway.
    """
    extra = [_normal_host(name) for name in extra]
    wildcard = bind_host.strip() in WILDCARD_BINDS
    if "*" in extra or (wildcard and not extra):
        return None
    names = [*LOOPBACK_HOSTS, *([] if wildcard else [_normal_host(bind_host)]), *extra]
    return list(dict.fromkeys(names))


def _host_of(value: str) -> str | None:
    """The host part of a `Host` header (`name`, `name:port`, `[v6]` or `[v6]:port`) as
    `_normal_host` writes it, or None when the header is malformed. The port is not checked:
    an SSH tunnel or a proxy may forward another local port, while a rebinding page differs
    in the name."""
    match = _HOST_HEADER.fullmatch(value)
    if match is None or (match["v6"] is not None and not _is_ipv6(match["v6"])):
        return None
    return _normal_host(match["v6"] or match["name"])


def _is_ipv6(name: str) -> bool:
    try:
        ipaddress.IPv6Address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """Answer 400 to a request whose `Host` header is not one of `allowed_hosts` (DNS rebinding)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed = {_normal_host(name) for name in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            values = [value.decode("latin-1") for name, value in scope.get("headers", ()) if name == b"host"]
            if len(values) != 1 or _host_of(values[0]) not in self.allowed:
                shown = repr(values[0][:100]) if len(values) == 1 else f"header given {len(values)} times"
                message = f"this server does not answer to the Host {shown}; it answers to {', '.join(sorted(self.allowed))}"
                await _refuse(scope, receive, send, 400, message + " (add a name with --allowed-host)", "invalid_host")
                return
        await self.app(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    values = [value for name, value in scope.get("headers", ()) if name == b"content-type"]
    return len(values) == 1 and values[0].split(b";", 1)[0].strip().lower() == b"application/json"


class RequestBodyGuard:
    """Refuse a body that is not JSON; read each JSON body within a size and a time limit, then
    replay it to the app."""

    def __init__(self, app: ASGIApp, limits: HTTPLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"].encode() in BODY_METHODS and not _is_json(scope):
            await _refuse(scope, receive, send, 415, "send the request body as JSON, with the header 'Content-Type: application/json'",
                          "unsupported_media_type", close=True)
            return
        limit = self.limits.max_body_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await self._refuse_too_large(scope, receive, send, f"{declared} bytes")
            return
        try:
            with anyio.fail_after(self.limits.body_timeout_s):
                body = await self._read_body(receive)
        except _BodyTooLarge:
            await self._refuse_too_large(scope, receive, send, "more than that")
            return
        except TimeoutError:
            await _refuse(scope, receive, send, 408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s", "request_timeout")
            return
        except _ClientGone:
            return  # nobody to answer
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse_too_large(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        limit = self.limits.max_body_bytes
        await _refuse(scope, receive, send, 413, f"the request body is {size}; this server accepts at most {limit} bytes", "request_too_large")


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str, code: str, *, close: bool = True) -> None:
    """Answer with OpenAI's error body (`finqlora.serve.api_errors`' shape, built here because
    that module imports torch, which `finqlora ui --no-model` never loads); `close` when the
    rest of the body is never read."""
    from starlette.responses import JSONResponse

    error = {"message": message, "type": "timeout_error" if status == 408 else "invalid_request_error", "param": None, "code": code}
    await JSONResponse({"error": error}, status_code=status, headers={"Connection": "close"} if close else None)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the app the body read already, then the client's later messages
    (a disconnect, which streaming responses and long waits listen for)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

