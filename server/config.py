"""Server settings: what the HTTP layer needs beyond the engine's own ``EngineConfig``.
Filled from the command line (``server.cli``); frozen once the server starts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...] = ("default",)
    api_key: str | None = None               # None: no authentication
    max_queue_len: int | None = None         # None: unbounded (vLLM's behaviour)
    max_request_bytes: int = 8 * 2**20       # larger bodies get 413
    drain_timeout: float = 30.0              # seconds in-flight requests get after SIGTERM
    timeout_keep_alive: float = 5.0          # idle keep-alive connections are closed after
    timeout_request_header: float = 10.0     # request headers must be complete within
    max_connections: int = 1024              # open connections beyond this get 503

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served model names must be non-empty")
        if self.max_queue_len is not None and self.max_queue_len < 0:
            raise ValueError(f"max_queue_len must be >= 0, got {self.max_queue_len}")
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be positive")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.timeout_request_header <= 0 or self.timeout_keep_alive < 0:
            raise ValueError("connection timeouts must be positive")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
