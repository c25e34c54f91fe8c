"""OpenAI-style errors: every failure leaves the server as
``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Routes and helpers raise ``APIError`` (or the engine's ``ParamError``); the handlers installed
by ``install_error_handlers`` turn those, FastAPI's validation errors (400, not 422), unknown
routes and unexpected exceptions into that body.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from itt_runtime.engine.async_engine import EngineDeadError
from itt_runtime.sampling_params import ParamError

log = logging.getLogger("server")


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_param_error(e: ParamError) -> APIError:
    return APIError(400, e.message, param=e.param)


def from_validation_error(errors: Sequence[Any]) -> APIError:
    """Pydantic's first complaint; ``param`` is the top-level field, the message has the path."""
    if not errors:
        return bad_request("invalid request body")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {err.get('msg')}")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    msg = err.get("msg", "invalid value")
    return bad_request(f"{'.'.join(loc)}: {msg}" if loc else msg, param=param)


def internal_error(request_id: str) -> APIError:
    """A 500 that names the request id under which the server logged the cause, and never
    the internal exception text."""
    return APIError(500, f"internal server error while serving request {request_id}; the "
                    "server log has the details under this id", "server_error",
                    code="internal_error")


def new_error_id() -> str:
    return f"err-{uuid.uuid4().hex[:16]}"


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type="server_error", code=code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(ParamError)
    async def _param_error(_: Request, e: ParamError) -> JSONResponse:
        return from_param_error(e).response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return from_validation_error(list(e.errors())).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, e: ValidationError) -> JSONResponse:
        return from_validation_error(e.errors()).response()

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return unavailable(str(e), "engine_dead").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = "not_found" if e.status_code == 404 else None
        return APIError(e.status_code, str(e.detail), type_, code=code,
                        headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        error_id = new_error_id()
        log.error("unhandled error %s in %s %s: %s: %s", error_id, request.method,
                  request.url.path, type(e).__name__, e, exc_info=e)
        return internal_error(error_id).response()
