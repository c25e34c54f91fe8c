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

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served model names must be non-empty")
        if self.max_queue_len is not None and self.max_queue_len < 0:
            raise ValueError(f"max_queue_len must be >= 0, got {self.max_queue_len}")
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be positive")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
