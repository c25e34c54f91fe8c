"""What the routes reach through ``request.app.state``: one object, built by ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from server.chat import ChatHandler
from server.completion import CompletionHandler
from server.config import ServerSettings
from server.engine_client import EngineClient
from server.lifecycle import Lifecycle
from server.metrics import Metrics


@dataclass
class ServerState:
    settings: ServerSettings
    client: EngineClient
    metrics: Metrics
    completions: CompletionHandler
    chat: ChatHandler
    lifecycle: Lifecycle


def state(request: Request) -> ServerState:
    return request.app.state.server
