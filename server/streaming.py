"""Server-sent events and client-disconnect handling.

Streams are ``data: {chunk}`` lines, then ``data: [DONE]``. An error after the response has
started cannot change the status any more, so it is sent as one ``data: {"error": …}`` chunk
before ``[DONE]`` (the openai SDK raises it as an APIError).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.errors import APIError, error_body

log = logging.getLogger("server")
T = TypeVar("T")

# nginx's code for "client closed request": what the HTTP metrics record for a client that
# left before its response was ready.
CLIENT_CLOSED = 499


def sse_response(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    return StreamingResponse(_events(chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except APIError as e:
        yield f"data: {_json(e.body())}\n\n"
    except Exception as e:
        log.exception("error in stream")
        yield f"data: {_json(error_body(f'internal server error: {e}', 'server_error'))}\n\n"
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    yield "data: [DONE]\n\n"


def _json(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it if the client disconnects first (the engine request is
    then aborted by the generator's cleanup). Needs the body to have been read already."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise APIError(CLIENT_CLOSED, "client closed the connection", code="client_closed")
    return task.result()
