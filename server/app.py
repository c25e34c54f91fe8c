"""The FastAPI application: ``create_app(engine, settings)`` wires the engine client,
metrics, handlers, routes, error handlers and middleware. The caller owns the engine
(starting it before serving, shutting it down after)."""

from __future__ import annotations

from fastapi import FastAPI

from itt_runtime.engine.async_engine import AsyncLLMEngine
from itt_runtime.tokenizers.chat_template import ChatTemplate
from server import __version__, openapi
from server.chat import ChatHandler
from server.completion import CompletionHandler
from server.config import ServerSettings
from server.engine_client import EngineClient
from server.errors import install_error_handlers
from server.lifecycle import Lifecycle
from server.metrics import Metrics
from server.middleware import APIKeyMiddleware, BodyLimitMiddleware, HTTPMetricsMiddleware
from server.routes import routers
from server.state import ServerState


def create_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    names = list(settings.served_model_names)
    # Read and compiled before anything starts: a bad --chat-template file is a startup error.
    template = ChatTemplate.for_model(engine.tokenizer, settings.chat_template)
    lifecycle = Lifecycle()
    metrics = Metrics(names[0], engine)
    client = EngineClient(engine, metrics, settings.max_queue_len)
    client.structured.warm_up()
    if settings.auto_tool_parser is not None:       # its failure counter exists from the start
        metrics.count_tool_parse_failures(settings.auto_tool_parser, 0)
    app = FastAPI(title="itt-server", version=__version__,
                  description="OpenAI-compatible server for Inner Thinking Transformer models")
    app.state.server = ServerState(settings=settings, client=client, metrics=metrics,
                                   completions=CompletionHandler(client, names, lifecycle),
                                   chat=ChatHandler(client, names, lifecycle, template,
                                                    settings.auto_tool_parser),
                                   lifecycle=lifecycle)
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    openapi.install(app)
    # Added innermost first: requests pass metrics → size limit → API key → routes.
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    known = {getattr(route, "path", "") for router in routers for route in router.routes}
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, known_paths=known)
    return app
