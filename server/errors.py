"""The one table from exceptions to HTTP status codes and the OpenAI error object.

Owns: the gateway's exception types and how each leaves over HTTP
(``{"error": {"message", "type", "param", "code"}}``). No other module knows status codes.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class GatewayError(Exception):
    """An error a client should see, with its OpenAI error type and HTTP status."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequest(GatewayError):
    pass


class ContextLengthExceeded(GatewayError):
    code = "context_length_exceeded"


class ModelNotFound(GatewayError):
    status_code = 404
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.", param="model")


class NotFound(GatewayError):
    status_code = 404
    error_type = "not_found_error"


class IdempotencyConflict(GatewayError):
    """The idempotency key was used before with a different payload."""

    status_code = 422
    code = "idempotency_key_reused"


class Conflict(GatewayError):
    status_code = 409
    code = "conflict"


class NotRateable(GatewayError):
    """The battles asked for cannot be rated together (models in groups that never met share
    no rating scale): a state of the data, not a malformed request."""

    status_code = 409
    code = "battles_not_rateable"


class Overloaded(GatewayError):
    """More requests waiting for a model than its bound: come back later (never a hang)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "too_many_pending_requests"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.headers = {"retry-after": str(retry_after_s)}


class RateLimited(Overloaded):
    """Too many requests from one API key."""

    code = "rate_limit_exceeded"


class StoreUnavailable(GatewayError):
    status_code = 503
    error_type = "server_error"
    code = "store_unavailable"


class EngineUnavailable(GatewayError):
    status_code = 503
    error_type = "server_error"
    code = "engine_unavailable"


class EngineFailure(GatewayError):
    status_code = 500
    error_type = "server_error"
    code = "engine_error"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _status_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


_LOCATION_PREFIXES = ("body", "query", "path", "header")
# What the store cannot keep (``store.storable``); pydantic finds unpaired surrogates itself.
UNPAIRED_SURROGATES = "must not contain unpaired surrogates (text must be valid Unicode)"
# pydantic names the branch of a union it tried ("str", "list[TextPart]",
# "function-after[_no_nul(), str]"); a client wants only the field path.
_UNION_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [
        str(p)
        for p in loc
        if p not in _LOCATION_PREFIXES
        and not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))
    ]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    param = _validation_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if first.get("type") == "extra_forbidden":
        msg = "Unrecognized request argument supplied"
    if first.get("type") == "string_unicode":
        msg = UNPAIRED_SURROGATES
    text = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more error(s))"
    return text, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), _status_type(exc.status_code)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette runs this handler outside every added middleware, the request-id one
        # included: the id comes from the request's state, for the log line and the reply.
        request_id = getattr(request.state, "request_id", None)
        extra = {"request_id": request_id} if request_id else None
        log.exception("Unhandled error", exc_info=exc, extra=extra)
        return JSONResponse(
            error_body("Internal server error.", "server_error", code="internal_error"),
            status_code=500,
            headers={"x-request-id": request_id} if request_id else None,
        )
