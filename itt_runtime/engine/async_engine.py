"""asyncio front of the engine: the engine loop runs on its own thread, so model steps never
block HTTP handling.

    engine = AsyncLLMEngine(EngineConfig(...)); engine.start()
    engine.call(fn)                 # run fn on the engine thread (set-up work), get its result
    async for out in engine.generate(prompt_ids, params, request_id):   # delta outputs
        ...
    engine.abort(request_id)        # from anywhere; blocks are freed before the next step

Requests and aborts reach the engine thread through a queue; outputs come back through
``loop.call_soon_threadsafe`` into one asyncio.Queue per request. If the consumer stops
iterating (client gone, task cancelled), the request is aborted.

One thread does all of the engine's torch work, loading included: the engine thread exists
from the constructor on, which builds the ``LLMEngine`` on it, and set-up work that computes
(loading compiled steps, packing weights) goes through ``call``. The reason is OpenMP:
every thread that runs a parallel region keeps a team of worker threads for the rest of its
life, and once a process holds more of them than it has cores, libgomp stops its workers
spinning between regions, so each region has to wake them with a system call. A model
loaded on the main thread and served from this one made every small operator of a decode
step 2-4x slower (fbgemm's int8 linear at one row: 118 against 48 µs; the int8 SmolLM2
server's inter-token latency 44 against 27 ms, docs/perf-notes.md, 2026-12-07).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar

from itt_runtime.engine.llm_engine import EngineConfig, EngineStats, LLMEngine
from itt_runtime.outputs import RequestOutput
from itt_runtime.sampling_params import SamplingParams

log = logging.getLogger("itt_runtime")

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop stopped because of an error; the server should report 503."""


class RequestFailedError(RuntimeError):
    """Serving this one request raised inside the engine; the engine goes on (the server
    reports a 500 that does not echo the internal message)."""


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._serving = threading.Event()         # set by start(): the loop steps the engine
        self.error: BaseException | None = None
        # fn(exception) on the engine thread when the loop dies; the server exits non-zero.
        self.death_callbacks: list = []
        self._thread = threading.Thread(target=self._run, name="itt-engine", daemon=True)
        self._thread.start()
        try:
            # Built on the engine thread (module docstring); an error loading it is raised here.
            self.engine = engine or self.call(lambda: LLMEngine(config or EngineConfig()))
        except BaseException:
            self.shutdown()
            raise
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.info = self.engine.info
        self._stats = self.engine.stats()

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start serving requests (the engine thread runs already, idle until now)."""
        self._serving.set()
        self._commands.put(("wake",))

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on the engine thread, between two steps once serving; its result, or
        its exception raised here. For set-up work that computes, such as loading compiled
        steps (module docstring). Not from the engine thread itself."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("AsyncLLMEngine.call from the engine thread would wait forever")
        if not self._thread.is_alive():
            raise EngineDeadError(f"engine loop is not running: {self.error!r}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, future))
        return future.result()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._serving.is_set() and self._thread.is_alive() and self.error is None

    def stats(self) -> EngineStats:
        """The latest snapshot, refreshed by the engine thread after every step and abort."""
        return self._stats

    # ---- requests -------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ParamError for a request the engine can never serve (read-only, any thread):
        for a front end that must fail before it answers (``generate`` reports the same
        error only once the engine thread adds the request)."""
        self.engine.validate(prompt_token_ids, params)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        self.engine.validate_prompt(prompt_token_ids)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """Delta outputs of one request; the last one has ``finished`` set.
        Raises ParamError for an invalid request (``LLMEngine.add_request`` checks it on the
        engine thread), EngineDeadError if the loop dies."""
        if not self.is_alive:
            raise EngineDeadError(f"engine loop is not running: {self.error!r}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, q)
        self._commands.put(("add", request_id, list(prompt_token_ids), params, time.time()))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not self._serving.is_set():
                self._drain_commands(block=True)          # set-up calls only
            if self._stop.is_set():
                return
            eng = self.engine
            while not self._stop.is_set():
                self._drain_commands(block=not eng.has_unfinished())
                if eng.has_unfinished():
                    self._deliver_step(eng.step())
                self._stats = eng.stats()
        except BaseException as e:            # noqa: BLE001 - the loop must report any death
            log.critical("engine loop died: %s: %s", type(e).__name__, e, exc_info=e)
            self.error = e
            for loop, q in list(self._streams.values()):
                loop.call_soon_threadsafe(q.put_nowait, EngineDeadError("the engine died"))
            for cb in self.death_callbacks:
                cb(e)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "call":
            _, fn, future = cmd
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:    # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
        elif cmd[0] == "add":
            _, rid, ids, params, arrival = cmd
            if rid not in self._streams:      # aborted before it reached the engine
                return
            try:
                self.engine.add_request(rid, ids, params, arrival_time=arrival)
            except ValueError as e:           # ParamError: a 400 naming the parameter
                loop, q = self._streams[rid]
                loop.call_soon_threadsafe(q.put_nowait, e)
            except Exception as e:            # noqa: BLE001 - add_request queues nothing then
                log.error("request %s could not be added: %s: %s", rid, type(e).__name__, e,
                          exc_info=e)
                loop, q = self._streams[rid]
                loop.call_soon_threadsafe(q.put_nowait, RequestFailedError(rid))
        elif cmd[0] == "abort":
            out = self.engine.abort(cmd[1])
            if out is not None:
                self._deliver(out)
            # Freed blocks show at once, even if no step follows. Adds do not refresh the
            # snapshot: until the next step schedules them, every new request counts as
            # waiting, and admission (server/engine_client.py) would count it twice.
            self._stats = self.engine.stats()

    def _deliver_step(self, outs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one ``call_soon_threadsafe``: one
        wake-up of the loop per step instead of one per stream (each is a write to the
        loop's self-pipe and a pass through its selector)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                loop, q = stream
                item = RequestFailedError(out.request_id) if out.error is not None else out
                batches.setdefault(loop, []).append((q, item))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, out: RequestOutput) -> None:
        self._deliver_step([out])


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)
