"""The server's one door to the engine: admission (queue limit → 429), validation
(→ 400 naming the parameter), and generation with metrics tracking.

Leaving a ``generate``/``generate_all`` iteration early (client gone, task cancelled) aborts
the engine request, which frees its KV blocks before the engine's next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

from itt_runtime.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
from itt_runtime.outputs import RequestOutput
from itt_runtime.sampling_params import ParamError, SamplingParams
from server.errors import APIError, from_param_error, internal_error, unavailable
from server.metrics import Metrics
from server.structured import StructuredOutputs

RETRY_AFTER_SECONDS = 1


class Ticket:
    """Admitted sequences; ``release`` (idempotent) hands them back."""

    def __init__(self, client: EngineClient, num_seqs: int) -> None:
        self.client = client
        self.num_seqs = num_seqs

    def release(self) -> None:
        self.client.in_flight_seqs -= self.num_seqs
        self.num_seqs = 0


class EngineClient:
    def __init__(self, engine: AsyncLLMEngine, metrics: Metrics,
                 max_queue_len: int | None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue_len = max_queue_len
        self.tokenizer = engine.tokenizer
        self.info = engine.info
        self.model_config = engine.info.model_config
        self.max_model_len = engine.info.max_model_len
        self.max_num_seqs = engine.info.max_num_seqs
        self.in_flight_seqs = 0          # sequences admitted and not yet released
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size,
                                            engine.info.eos_token_ids)

    @property
    def is_alive(self) -> bool:
        return self.engine.is_alive

    def admit(self, num_seqs: int) -> Ticket:
        """Admit ``num_seqs`` sequences or raise 429 if that would leave more than
        ``max_queue_len`` waiting. Admission counts at once (no await between the check and
        the count), so a burst of simultaneous requests cannot all pass the same check; the
        caller releases the ticket when the request is over. The engine's own waiting count
        covers KV pressure (sequences that wait although slots are free)."""
        if not self.engine.is_alive:
            raise unavailable("the engine is not running", "engine_dead")
        if self.max_queue_len is not None:
            waiting_now = self.engine.stats().num_waiting
            beyond_slots = self.in_flight_seqs + num_seqs - self.max_num_seqs
            would_wait = max(beyond_slots, waiting_now + num_seqs if waiting_now else 0)
            if would_wait > self.max_queue_len:
                raise APIError(429, f"the server is overloaded: {would_wait} sequences would "
                               f"be waiting, the limit is {self.max_queue_len}; retry later",
                               type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.in_flight_seqs += num_seqs
        return Ticket(self, num_seqs)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The engine's checks (``LLMEngine.validate``: token ids, context length, KV room)
        as a 400, before the response starts: a streamed response cannot turn into one."""
        try:
            self.engine.validate(prompt_token_ids, params)
        except ParamError as e:
            raise from_param_error(e) from None

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """The engine's checks on token ids sent as a prompt, before any truncation."""
        try:
            self.engine.validate_prompt(prompt_token_ids)
        except ParamError as e:
            raise from_param_error(e) from None

    def budget(self, params: SamplingParams) -> float:
        return self.info.think_budget(params)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """Delta outputs of one request (see AsyncLLMEngine.generate), observed by metrics."""
        tracker = self.metrics.track(len(prompt_token_ids), params.n, self.budget(params),
                                     params.max_tokens)
        try:
            async with aclosing(self.engine.generate(prompt_token_ids, params,
                                                     request_id)) as outputs:
                async for out in outputs:
                    tracker.on_output(out)
                    yield out
        except ParamError as e:
            raise from_param_error(e) from None
        except EngineDeadError as e:
            raise unavailable(str(e), "engine_dead") from None
        except RequestFailedError:       # the engine logged the cause under this request id
            raise internal_error(request_id) from None
        finally:
            tracker.close()

    async def generate_all(self, prompts: list[list[int]], params: SamplingParams,
                           request_id: str) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Run several prompts concurrently; yields ``(prompt_index, delta output)``."""
        if len(prompts) == 1:
            async with aclosing(self.generate(prompts[0], params, request_id)) as outputs:
                async for out in outputs:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, ids: list[int]) -> None:
            try:
                async with aclosing(self.generate(ids, params, f"{request_id}-{i}")) as outs:
                    async for out in outs:
                        queue.put_nowait((i, out))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
        remaining = len(prompts)
        try:
            while remaining:
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    remaining -= 1
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
