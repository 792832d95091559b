"""One error model for the whole HTTP API, in OpenAI's JSON shape.

Every failure a client can cause is raised as `APIError` (or converted into one here) and
rendered once, by `install_error_handlers`: `{"error": {"message", "type", "param", "code"}}`.
Unexpected exceptions become a 500 without a traceback in the body (logged server-side).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("genserve.errors")


class APIError(Exception):
    """An error with an HTTP status that the client should see as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, param=param, code=code)


def unprocessable(message: str, param: str | None = None, code: str = "invalid_parameter") -> APIError:
    return APIError(422, message, param=param, code=code)


def unavailable(message: str, retry_after_s: int = 5, code: str = "service_unavailable") -> APIError:
    return APIError(
        503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after_s)}
    )


def is_backend_at_capacity(exc: BaseException) -> bool:
    """A model deployment refused the call for now (Serve's backpressure: its queue is full, or
    it has no replica yet): the request may be retried, nothing about it was wrong.

    The one place that recognises these; images and chat map it to 503 + Retry-After, the job
    runner puts the job back in the queue."""
    # Imported here, not at the top: tenancy imports this module and must not load Ray.
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return isinstance(exc, (BackPressureError, DeploymentUnavailableError))


def is_server_fault(exc: BaseException) -> bool:
    """A failure that is ours, not the client's: a 5xx APIError or any unexpected exception.
    Cancellation (a client that went away) is neither."""
    if isinstance(exc, APIError):
        return exc.status >= 500
    return isinstance(exc, Exception) and not isinstance(exc, StarletteHTTPException)


def _loc_to_param(loc: tuple | list) -> str | None:
    # ("body", "size") -> "size"; ("body", "messages", 0, "role") -> "messages[0].role"
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None, "invalid_request"
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "The request body is not valid JSON.", None, "invalid_json"
    param = _loc_to_param(first.get("loc", ()))
    if kind == "missing" and param is None:
        return "The request body is missing.", None, "missing_body"
    if kind == "model_attributes_type" and param is None:
        return "The request body must be a JSON object.", None, "invalid_body"
    msg = first.get("msg", "invalid value")
    value = first.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else None
    if shown is not None and len(shown) > 80:
        shown = shown[:77] + "..."
    text = f"Invalid value for '{param}': {msg}" + (f" (got {shown})." if shown is not None else ".")
    return text, param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return APIError(400, message, param=param, code=code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, str(exc.detail), type=kind, code=code, headers=dict(exc.headers or {}))
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "The server had an error while processing your request.", type="server_error",
                        code="internal_error").response()
