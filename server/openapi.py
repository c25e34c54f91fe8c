"""The OpenAPI document: request bodies and error responses published from the same pydantic
models that validate them, so that schema-driven clients and fuzzers see the real API.

Routes read their bodies themselves (``protocol.parse_body``: 400, not FastAPI's 422, and
checks pydantic cannot express), so FastAPI does not know their schemas; ``json_body``
declares one per route and ``install`` puts the models into ``components/schemas``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""
    error: ErrorDetail


MODELS: list[type[BaseModel]] = [CompletionRequest, ChatCompletionRequest, TokenizeRequest,
                                 DetokenizeRequest, ErrorResponse]
_ERRORS = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
           413: "body too large", 429: "queue full (Retry-After)",
           500: "internal error (names a request id)", 503: "draining or engine down"}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model``."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref(model.__name__)}}}}


def error_responses() -> dict[int | str, dict[str, Any]]:
    return {status: {"description": text,
                     "content": {"application/json": {"schema": _ref("ErrorResponse")}}}
            for status, text in _ERRORS.items()}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in MODELS:
                s = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(s.pop("$defs", {}))
                components[model.__name__] = s
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi  # type: ignore[method-assign]
