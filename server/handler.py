"""What the completions and chat handlers share around their own work: the prologue every
generation request goes through (not while draining, the request's own checks, the model
name) and the epilogue (the engine's checks on each prompt, the usage counter, admission,
and the response, streamed or whole)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from itt_runtime.sampling_params import SamplingParams
from server.engine_client import EngineClient
from server.generation import UsageCounter, check_model
from server.lifecycle import Lifecycle
from server.protocol import GenerationRequest
from server.streaming import respond, shutting_down


class GenerationHandler:
    def __init__(self, client: EngineClient, served_models: list[str],
                 lifecycle: Lifecycle) -> None:
        self.client = client
        self.lifecycle = lifecycle
        self.served_models = served_models

    def begin(self, req: GenerationRequest) -> str:
        """The prologue: 503 while draining, the request's field checks (400), and the model
        name the response reports (404 for another)."""
        if self.lifecycle.draining:
            raise shutting_down()
        req.check()
        return check_model(req.model, self.served_models)

    def usage_for(self, prompts: list[list[int]], params: SamplingParams) -> UsageCounter:
        """The engine's checks on every prompt with ``params`` (a 400 naming the field),
        then the request's usage counter with its prompts counted."""
        for ids in prompts:
            self.client.validate(ids, params)
        usage = UsageCounter(self.client.budget(params),
                             self.client.model_config.max_extra_steps)
        for ids in prompts:
            usage.add_prompt(len(ids))
        return usage

    async def respond(self, request: Request, stream: bool, num_seqs: int,
                      chunks: Callable[[], AsyncIterator],
                      whole: Callable[[], Awaitable]) -> Response:
        """Admit ``num_seqs`` sequences (429 when the queue is full) and answer, as SSE
        ``chunks`` or one ``whole`` response; admission ends with the response."""
        ticket = self.client.admit(num_seqs)
        return await respond(request, stream, chunks, whole, self.lifecycle.stopping,
                             ticket.release)
