"""Connection guards uvicorn lacks: a deadline for request headers and a cap on open
connections.

uvicorn closes a keep-alive connection only if it stays silent for ``timeout_keep_alive``
after a response; a connection that never sends a request, or sends its headers a byte at a
time (slowloris), is held open for as long as the client likes. ``guarded_h11`` builds
uvicorn's h11 protocol with two additions:

  * a request's headers must be complete within ``header_timeout`` seconds of the
    connection becoming ready for it (accepted, or its previous response sent), or the
    connection is closed (nginx's ``client_header_timeout``);
  * beyond ``max_connections`` open connections, a new one gets a bare 503 and is closed.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("server")

_FULL_BODY = (b'{"error":{"message":"too many open connections; retry later",'
              b'"type":"server_error","param":null,"code":"too_many_connections"}}')
_FULL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
         b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
         % (len(_FULL_BODY), _FULL_BODY))


def guarded_h11(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                log.warning("refusing a connection: %d open, the limit is %d",
                            len(self.connections), max_connections)
                transport.write(_FULL)
                transport.close()
                return
            self._start_header_timer()

        def _start_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:       # the headers are in
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._start_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

    return GuardedH11Protocol
