"""Connection guards uvicorn lacks: a deadline for request headers and a cap on open
connections.

uvicorn closes a keep-alive connection only if it stays silent for ``timeout_keep_alive``
after a response; a connection that never sends a request, or sends its headers a byte at a
time (slowloris), is held open for as long as the client likes. ``guarded_protocol`` builds
one of uvicorn's HTTP/1.1 protocols with two additions:

  * a request's headers must be complete within ``header_timeout`` seconds of the
    connection becoming ready for it (accepted, or its previous response sent), or the
    connection is closed (nginx's ``client_header_timeout``);
  * beyond ``max_connections`` open connections, a new one gets a bare 503 and is closed.

The protocol is httptools' (a C parser) where it is installed, as uvicorn's ``--http auto``
picks, else h11 (pure Python). A streamed token costs the event loop 30-45 µs less
through httptools (docs/perf-notes.md, 2026-12-07).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("server")

_FULL_BODY = (b'{"error":{"message":"too many open connections; retry later",'
              b'"type":"server_error","param":null,"code":"too_many_connections"}}')
_FULL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
         b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
         % (len(_FULL_BODY), _FULL_BODY))

HTTP_IMPLEMENTATIONS = ("auto", "httptools", "h11")


def httptools_installed() -> bool:
    return importlib.util.find_spec("httptools") is not None


def guarded_protocol(http: str, header_timeout: float, max_connections: int) -> type:
    """uvicorn's protocol class for ``http`` (one of ``HTTP_IMPLEMENTATIONS``; ``auto`` is
    httptools when installed) with the guards above."""
    if http == "auto":
        http = "httptools" if httptools_installed() else "h11"
    if http == "httptools":
        return _guarded_httptools(header_timeout, max_connections)
    if http == "h11":
        return _guarded_h11(header_timeout, max_connections)
    raise ValueError(f"unknown HTTP implementation {http!r}; one of {HTTP_IMPLEMENTATIONS}")


class _Guard:
    """The guards' state and timers, shared by both protocols. The protocol calls
    ``opened`` from ``connection_made``, ``headers_in`` once a request's headers are
    complete, ``idle_again`` when a response is done and the connection waits for the next
    request, and ``closed`` from ``connection_lost``."""

    def __init__(self, header_timeout: float, max_connections: int) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.timer: asyncio.TimerHandle | None = None

    def opened(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
               open_connections: int) -> None:
        """Beyond ``max_connections`` the connection is refused and closed."""
        if open_connections > self.max_connections:
            log.warning("refusing a connection: %d open, the limit is %d",
                        open_connections, self.max_connections)
            transport.write(_FULL)
            transport.close()
        else:
            self.idle_again(loop, transport)

    def idle_again(self, loop: asyncio.AbstractEventLoop,
                   transport: asyncio.Transport) -> None:
        self.headers_in()
        self.timer = loop.call_later(self.header_timeout, self._timed_out, transport)

    def headers_in(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self, transport: asyncio.Transport) -> None:
        self.timer = None
        if not transport.is_closing():
            transport.close()

    closed = headers_in


def _guarded_h11(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    import h11

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._guard = _Guard(header_timeout, max_connections)
            self._guard.opened(self.loop, transport, len(self.connections))

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:       # the headers are in
                self._guard.headers_in()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._guard.idle_again(self.loop, self.transport)

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard.closed()
            super().connection_lost(exc)

    return GuardedH11Protocol


def _guarded_httptools(header_timeout: float, max_connections: int) -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._guard = _Guard(header_timeout, max_connections)
            self._guard.opened(self.loop, transport, len(self.connections))

        def on_headers_complete(self) -> None:
            self._guard.headers_in()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self.pipeline:
                self._guard.idle_again(self.loop, self.transport)

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard.closed()
            super().connection_lost(exc)

    return GuardedHttpToolsProtocol
