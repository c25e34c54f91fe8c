"""Server-sent events and client-disconnect handling.

Streams are ``data: {chunk}`` lines, then ``data: [DONE]``. An error after the response has
started cannot change the status any more, so it is sent as one ``data: {"error": …}`` chunk
before ``[DONE]`` (the openai SDK raises it as an APIError). That includes the drain deadline:
a stream still running when it passes ends with a ``server_shutdown`` error chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from server.errors import APIError, internal_error, new_error_id

log = logging.getLogger("server")
T = TypeVar("T")

# nginx's code for "client closed request": what the HTTP metrics record for a client that
# left before its response was ready.
CLIENT_CLOSED = 499


async def respond(request: Request, stream: bool, chunks: Callable[[], AsyncIterator[BaseModel]],
                  whole: Callable[[], Awaitable[BaseModel]], stopping: asyncio.Event,
                  release: Callable[[], None]) -> Response:
    """A handler's response: the SSE stream of ``chunks()``, or the JSON of ``whole()`` awaited
    until the client leaves or the drain deadline passes. ``release`` (the admission ticket)
    runs once it is over, however it ends."""
    if stream:
        return sse_response(chunks(), stopping, release)
    try:
        body = await until_disconnected(request, whole(), stopping)
    finally:
        release()
    return JSONResponse(body.model_dump(mode="json"))


def sse_response(chunks: AsyncIterator[BaseModel], stopping: asyncio.Event,
                 release: Callable[[], None]) -> StreamingResponse:
    """Stream ``chunks`` as SSE. ``stopping`` set (the drain deadline passed) ends the stream
    with a ``server_shutdown`` error chunk and ``[DONE]``. ``release`` runs once the stream
    is over, however it ends (also when it never started)."""
    return StreamingResponse(_events(chunks, stopping, release), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(release))


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another replica",
                    "server_error", code="server_shutdown")


async def _events(chunks: AsyncIterator[BaseModel], stopping: asyncio.Event,
                  release: Callable[[], None]) -> AsyncIterator[str]:
    stop = asyncio.ensure_future(stopping.wait())
    nxt: asyncio.Future | None = None
    try:
        it = aiter(chunks)
        while True:
            nxt = asyncio.ensure_future(anext(it))
            await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                raise shutting_down()
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                break
            yield f"data: {chunk.model_dump_json()}\n\n"
    except APIError as e:
        yield f"data: {_json(e.body())}\n\n"
    except Exception as e:
        error_id = new_error_id()
        log.error("unhandled error %s in a stream: %s: %s", error_id, type(e).__name__, e,
                  exc_info=e)
        yield f"data: {_json(internal_error(error_id).body())}\n\n"
    finally:
        stop.cancel()
        if nxt is not None and not nxt.done():
            # The client left (this generator was cancelled) while a chunk was pending: stop
            # that read first, or closing the chunk generator fails and the request is never
            # aborted in the engine.
            nxt.cancel()
            await asyncio.gather(nxt, return_exceptions=True)
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        release()
    yield "data: [DONE]\n\n"


def _json(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def until_disconnected(request: Request, work: Awaitable[T],
                             stopping: asyncio.Event) -> T:
    """Await ``work`` but cancel it if the client disconnects first (the engine request is
    then aborted by the generator's cleanup), or with a 503 ``server_shutdown`` when the
    drain deadline passes. Needs the body to have been read already."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, watcher, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        stop.cancel()
        await asyncio.gather(task, watcher, stop, return_exceptions=True)
    if task.cancelled():
        if stopping.is_set():
            raise shutting_down()
        raise APIError(CLIENT_CLOSED, "client closed the connection", code="client_closed")
    return task.result()
