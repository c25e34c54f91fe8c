"""Plain ASGI middleware (no BaseHTTPMiddleware, so streaming and disconnects pass through
untouched): HTTP request counting, the request-size limit, and API-key checks."""

from __future__ import annotations

import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError
from server.metrics import Metrics


class HTTPMetricsMiddleware:
    """Counts every HTTP response in ``itt_http_requests_total{method, path, status}`` and
    times it in ``itt_http_request_duration_seconds`` (to the end of the body).
    ``path`` is the route (unknown paths are ``other``, so scanners cannot blow up the
    label set); an unhandled exception counts as 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"] if scope["path"] in self.known_paths else "other"
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.count_http(scope["method"], path, status, time.perf_counter() - start)


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes``: at once from Content-Length, or as soon as
    a chunked body grows past the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large().response()(scope, receive, send)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()       # rendered by the APIError handler
            return message

        await self.app(scope, limited_receive, send)


# Routes outside /v1 that still need the key: they cost CPU per byte of input.
KEYED_PATHS = ("/tokenize", "/detokenize")


class APIKeyMiddleware:
    """401 unless ``Authorization: Bearer <key>`` matches, for the OpenAI routes (``/v1/…``),
    as vLLM does, and for the tokenizer routes (``KEYED_PATHS``: they cost CPU per byte of
    input); health, version, metrics and tokenizer_info stay open for probes and scrapers.
    The comparison takes the same time wherever the first wrong byte is."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"].startswith("/v1")
                                           or scope["path"] in KEYED_PATHS):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            error = APIError(401, "invalid or missing API key (send 'Authorization: Bearer "
                             "<key>')", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
            return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)
