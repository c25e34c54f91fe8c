"""The server's life after SIGTERM, shared by the routes and the CLI.

``draining`` turns on at the signal: /health answers 503 so load balancers stop routing here,
and new generation requests get 503 (``server_shutdown``) while the listener stays open.
``stopping`` is set when the drain timeout passes: every request still running ends then,
cleanly (a stream with a ``server_shutdown`` error chunk and ``[DONE]``, any other request
with a 503 body), before uvicorn closes the connections. The server exits as soon as nothing
is in flight.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Lifecycle:
    draining: bool = False
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def stop_after(self, seconds: float) -> None:
        """From the event loop: set ``stopping`` in ``seconds``."""
        asyncio.get_running_loop().call_later(seconds, self.stopping.set)
