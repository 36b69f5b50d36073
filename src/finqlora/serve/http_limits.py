"""Bounds on what one HTTP request may cost before the app sees it: body size and body time.

`RequestBodyGuard` is a pure ASGI middleware. It reads the whole request body itself, then
hands it to the app, so:

- a body declared (Content-Length) or found (chunked) to be larger than `max_body_bytes` is
  answered **413** at once, before any byte is parsed as JSON: a 50 MB body costs the server
  nothing but the bytes read up to the limit;
- a body that does not arrive within `body_timeout_s` of the request's start (a client that
  sends less than its Content-Length, or trickles it) is answered **408** and the connection
  closed, instead of holding a connection and a task forever.

Both refusals have OpenAI's error body, and `Connection: close`, because the rest of the body
is never read.
"""

from __future__ import annotations

from dataclasses import dataclass
import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0


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


class RequestBodyGuard:
    """Read each HTTP request's body within a size and a time limit, then replay it to the app."""

    def __init__(self, app: ASGIApp, limits: HTTPLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
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
            await self._refuse(scope, receive, send, 408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s", "request_timeout")
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
        await self._refuse(scope, receive, send, 413, f"the request body is {size}; this server accepts at most {limit} bytes", "request_too_large")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str, code: str) -> None:
        # Imported here, not at the top: the CLI reads this module's defaults and must not pay
        # for importing FastAPI (the server has it loaded by the time anything is refused).
        from finqlora.serve.api_errors import APIError

        error = APIError(status, message, code=code, headers={"Connection": "close"})  # the rest of the body is never read
        await error.response()(scope, receive, send)


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

