"""Errors of the API, all answered with OpenAI's body `{"error": {"message", "type", "param", "code"}}`.

`install_error_handlers(app)` makes malformed JSON, wrong types, unknown routes and bugs answer
with that body too, so a client never has to parse two error formats.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from finqlora.serve.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    429: "rate_limit_error",
    503: "server_overloaded",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the top-level field (`param`) for pydantic's list of problems."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # A field of several types (`str | list[TextPart]`) reports one problem per type; our own
    # checks (value_error) say what is really wrong, so they go first.
    first = next((error for error in errors if error.get("type") == "value_error"), errors[0])
    # Drop "body" and pydantic's names of union members (`list[TextPart]`, `function-after[...]`).
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and "[" not in str(part)]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", first.get("msg"))), None
    where = ".".join(loc)
    message = str(first.get("msg")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{where}: {message}" if where else message) + more, (loc[0] if loc else None)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc)
    return APIError(400, message, param=param, code="invalid_request").response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()


async def _bug(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return APIError(500, "internal server error; see the server log", code="internal_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _bug)


_STATUS_DESCRIPTIONS = {
    400: "malformed JSON, a wrong type or range (`param` names the field), an over-long prompt",
    401: "missing or wrong API key",
    404: "unknown `model`",
    408: "the request body did not arrive in time",
    413: "the request body is larger than the server accepts",
    415: "the request body is not `Content-Type: application/json`",
    429: "the queue is full; retry after the `Retry-After` header's seconds",
    503: "out of GPU memory, or the server is shutting down",
    504: "the request timed out in the queue or during generation",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """The OpenAPI `responses` entries for the error statuses a route can answer."""
    return {status: {"model": ErrorResponse, "description": _STATUS_DESCRIPTIONS[status]} for status in statuses}
