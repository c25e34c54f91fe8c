"""The engine core: requests in, one scheduled model step at a time, delta outputs out.

Single-threaded and synchronous; ``AsyncLLMEngine`` runs it on its own thread for the server
and ``LLM`` drives it for offline use.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from itt_runtime.checkpoints import resolve_model_path
from itt_runtime.config import CheckpointError, ConfigError
from itt_runtime.engine.config import STEP_TOKEN_BUCKETS, EngineConfig, EngineInfo, EngineStats
from itt_runtime.engine.elastic import ElasticController
from itt_runtime.engine.output_processor import add_text, make_delta, make_request_output
from itt_runtime.engine.scheduler import Scheduler
from itt_runtime.engine.sequence import Sequence
from itt_runtime.engine.step import RunnerOutput, ScheduledSeq, SchedulerOutput
from itt_runtime.engine.stopping import drop_last_tokens
from itt_runtime.kv_cache.block_pool import BlockPool
from itt_runtime.kv_cache.manager import KVCacheManager, cdiv
from itt_runtime.model import quantization
from itt_runtime.model.hf import GENERATION_FILE, read_generation_config
from itt_runtime.model.loader import load_checkpoint
from itt_runtime.outputs import RequestMetrics, RequestOutput
from itt_runtime.runner.attention import KVCache
from itt_runtime.runner.model_runner import ModelRunner
from itt_runtime.sampling.sampler import Sampler
from itt_runtime.sampling_params import ParamError, SamplingParams

log = logging.getLogger("itt_runtime")


class EngineBrokenError(RuntimeError):
    """The engine itself can no longer run steps (not one request's fault)."""


@dataclass
class _Request:
    request_id: str
    seqs: list[Sequence]
    prompt_logprobs_sent: bool = False


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # Steps should run on the thread that built the engine: see ``_warn_thread``.
        self.built_on = threading.get_ident()
        self._thread_warned = False
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.model_path = resolve_model_path(config.model)
        try:
            quantization.check_supported(config.quantization, self.device)
        except quantization.QuantizationError as e:
            raise ConfigError(str(e)) from None
        loaded = load_checkpoint(self.model_path, self.device, self.dtype, fuse=True,
                                 tokenizer=config.tokenizer)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        if config.quantization != "none":
            quantization.quantize_model(self.model, config.quantization,
                                        quantization.calibration_ids(self.tokenizer)
                                        .to(self.device))
        mc = self.model_config = self.model.cfg
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if not 1 <= self.max_model_len <= mc.max_position_embeddings:
            raise ConfigError(f"max_model_len {self.max_model_len} must be in [1, "
                              f"{mc.max_position_embeddings}] (the model's max positions)")
        if mc.sliding_window is not None and self.max_model_len > mc.sliding_window:
            # Full attention equals the checkpoint's sliding-window attention only while the
            # context fits in the window.
            where = self.model_path if self.model_path.is_file() \
                else self.model_path / "config.json"
            raise ConfigError(f"{where}: 'sliding_window' "
                              f"{mc.sliding_window} (sliding-window attention) is not supported "
                              f"beyond the window; serve with --max-model-len "
                              f"{mc.sliding_window} or less (asked: {self.max_model_len})")
        # Every id that ends generation: the tokenizer's EOS, config.json's eos_token_id (an
        # int or a list) and generation_config.json's.
        self.eos_token_ids = frozenset(
            i for i in (self.tokenizer.eos_token_id, *mc.eos_token_ids) if i >= 0)
        generation = (loaded.generation if config.generation_config in ("auto", "vllm")
                      else read_generation_config(self._generation_config_dir()))
        block_bytes = KVCache.bytes_per_block(config.block_size, mc.n_kv_heads, mc.head_dim,
                                              self.dtype)
        num_blocks = self._kv_bytes() // block_bytes - 1        # one scratch block, see KVCache
        if num_blocks < mc.num_kv_streams:
            raise ConfigError(f"KV cache memory holds {num_blocks} blocks of {block_bytes} "
                              f"bytes; one sequence needs at least {mc.num_kv_streams}")
        self.kv_cache_bytes = (num_blocks + 1) * block_bytes
        self.cache = KVCache(num_blocks, config.block_size, mc.n_kv_heads, mc.head_dim,
                             self.dtype, self.device)
        self.kv = KVCacheManager(BlockPool(num_blocks), config.block_size, mc.num_kv_streams,
                                 mc.n_layers, config.enable_prefix_caching)
        speculative = config.speculative_for(self.device, self.dtype, mc.is_itt)
        if speculative is not None and not mc.is_itt:
            raise ConfigError("--speculative-config itt_self needs an ITT model (its draft is "
                              "the same model at a lower think budget); this model is dense")
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, self.eos_token_ids,
                                   config.enable_chunked_prefill,
                                   config.max_batch_prefill_tokens, speculative)
        self.runner = ModelRunner(
            self.model, self.cache, Sampler(self.eos_token_ids, config.seed),
            config.routed_compute,
            use_graphs=self.device.type == "cuda" and not config.enforce_eager,
            max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
            return_routing=config.enable_prefix_caching,
            cpu_compile=config.compile_mode, speculative_config=speculative,
            compile_source=(self.model_path, self.dtype, config.quantization))
        self.requests: dict[str, _Request] = {}
        self.controller = (ElasticController(
            None if config.target_itl_ms is None else config.target_itl_ms / 1e3,
            None if config.target_ttft_ms is None else config.target_ttft_ms / 1e3)
            if config.elastic_thinking else None)
        self.info = EngineInfo(
            model_path=self.model_path, model_config=mc, device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""), max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs, block_size=config.block_size,
            num_kv_blocks=num_blocks,
            default_think_budget=(mc.default_budget if config.default_think_budget is None
                                  else config.default_think_budget),
            enable_prefix_caching=config.enable_prefix_caching,
            sampling_defaults=({} if config.generation_config == "vllm"
                               else dict(generation.sampling_defaults)),
            eos_token_ids=self.eos_token_ids)
        self.step_token_counts = [0] * (len(STEP_TOKEN_BUCKETS) + 1)
        self.step_token_sum = 0
        log.info("loaded %s (%s, %d layers, ITT layers %s x%d) on %s as %s; %d KV blocks of "
                 "%d tokens (%.1f MiB)", self.model_path, "ITT" if mc.is_itt else "dense",
                 mc.n_layers, list(mc.itt_layers), mc.think_steps, self.device,
                 str(self.dtype).replace("torch.", ""), num_blocks, config.block_size,
                 self.kv_cache_bytes / 2**20)

    def _generation_config_dir(self) -> Path:
        """The folder ``--generation-config`` names (for "auto" and "vllm" the checkpoint's own
        generation settings are used: its generation_config.json, or a GGUF's metadata;
        for "vllm" only their eos ids count, as in vLLM)."""
        folder = Path(self.config.generation_config).expanduser()
        if not (folder / GENERATION_FILE).is_file():
            raise CheckpointError(f"--generation-config {str(folder)!r}: no {GENERATION_FILE} "
                                  "there")
        return folder

    def _kv_bytes(self) -> int:
        if self.config.kv_cache_memory is not None:
            return self.config.kv_cache_memory
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * self.config.kv_cache_fraction)
        return self.config.cpu_kv_cache_default

    # ---- requests -------------------------------------------------------------------------
    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ParamError for prompt token ids no request can use: none, out of the
        vocabulary, or as long as the context."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ParamError("prompt", "the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ParamError("prompt", f"prompt token ids must be integers in [0, {vocab})")
        if n >= self.max_model_len:
            raise ParamError("prompt", f"this model's maximum context length is "
                             f"{self.max_model_len} tokens, but the prompt has {n} tokens")

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ParamError for a request that can never be served. The one place a request
        is checked against the engine: ``add_request`` calls it, and so does the server
        before it answers (through ``AsyncLLMEngine.validate``)."""
        self.validate_prompt(prompt_token_ids)
        n = len(prompt_token_ids)
        vocab = self.model_config.vocab_size
        floor = params.min_think_budget
        if floor is not None and floor > self.info.think_budget(params):
            raise ParamError("min_think_budget", f"min_think_budget {floor} is above the "
                             f"request's think budget {self.info.think_budget(params)}")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad_stop:
            raise ParamError("stop_token_ids", f"stop_token_ids must be in [0, {vocab}), got "
                             f"{bad_stop[0]}")
        if n + params.max_tokens > self.max_model_len:
            raise ParamError("max_tokens", f"this model's maximum context length is "
                             f"{self.max_model_len} tokens, but {n} prompt tokens + "
                             f"max_tokens {params.max_tokens} = {n + params.max_tokens}")
        worst = cdiv(n + params.max_tokens, self.config.block_size) * \
            self.model_config.num_kv_streams
        if worst > self.kv.pool.num_blocks:
            raise ParamError("max_tokens", f"the request could need {worst} KV blocks; the "
                             f"pool has {self.kv.pool.num_blocks}")

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ParamError("request_id", f"request id {request_id!r} is already running")
        self.validate(prompt_token_ids, params)
        budget = self.info.think_budget(params)
        thresholds = self.model_config.thresholds_for(budget)
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:     # child i: seed + i, reduced to the unsigned 64 bits
                gen = torch.Generator(device=self.device).manual_seed((params.seed + i) % 2**64)
            seq = Sequence(
                seq_id=request_id if params.n == 1 else f"{request_id}#{i}",
                request_id=request_id, index=i, prompt_token_ids=list(prompt_token_ids),
                params=params, think_budget=budget, thresholds=thresholds,
                requested_think_budget=budget, min_think_budget=params.min_think_budget,
                metrics=RequestMetrics(arrival_time or time.time()), generator=gen)
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None] * len(prompt_token_ids)
            if seq.elastic and self.controller is not None:
                self._set_budget(seq, self.controller.scale)
            seqs.append(seq)
        for seq in seqs:            # all or nothing: every child is built before any is queued
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, seqs)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks. Returns its final output, if it existed."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                seq.metrics.finished_time = time.time()
            self.scheduler.finish(seq)
        return self._output(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update. A failure while executing is contained (``_isolate``)."""
        if threading.get_ident() != self.built_on and not self._thread_warned:
            self._warn_thread()
        if self.controller is not None:
            self._apply_elastic_scale()
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        # A step computing prompt tokens beside decoding requests stalls them (elastic.py).
        stalls = self.controller is not None and self._stalls_decoding(plan)
        floored = stalls and self._floor_prompt_step(plan)
        self.step_token_counts[bisect.bisect_left(STEP_TOKEN_BUCKETS, plan.num_tokens)] += 1
        self.step_token_sum += plan.num_tokens
        start = time.perf_counter()
        try:
            output = self.runner.execute_model(plan)
        except Exception as error:               # noqa: BLE001 - contained, see _isolate
            return self._isolate(plan, error)
        outputs = self._update(plan, output)
        if self.controller is not None:
            self._observe(plan, time.perf_counter() - start, stalls and not floored)
        return outputs

    def _warn_thread(self) -> None:
        """Once: this step runs on another thread than the one that built the engine. Each
        thread that has run an OpenMP parallel region (loading a model does) keeps its team
        of workers, and with more of them than cores libgomp wakes its workers by system call
        at every region: small operators ran 2-4x slower (async_engine.py's docstring). Build
        the engine on the thread that steps it, as ``AsyncLLMEngine`` does."""
        self._thread_warned = True
        log.warning("LLMEngine.step runs on another thread than the one that built the "
                    "engine: with torch's OpenMP threads on both, steps can run 2-4x slower; "
                    "build the engine on the thread that steps it")

    # ---- elastic thinking (elastic.py) -----------------------------------------------------
    def _apply_elastic_scale(self) -> None:
        """Ask the controller for this step's scale; re-derive elastic requests' budgets."""
        assert self.controller is not None
        now = time.time()
        waiting = self.scheduler.waiting
        oldest = now - min(s.metrics.arrival_time for s in waiting) if waiting else 0.0
        scale = self.controller.update(now, oldest)
        if self.config.enable_chunked_prefill:
            self.scheduler.prefill_token_cap = self.controller.prefill_cap()
        for seq in list(self.scheduler.running) + list(waiting):
            if seq.elastic:
                self._set_budget(seq, scale)
        if scale < 1.0 and any(s.elastic for s in self.scheduler.running):
            self.controller.reduced_steps += 1

    def _floor_prompt_step(self, plan: SchedulerOutput) -> bool:
        """For a step that computes prompt tokens while other requests are decoding: runs
        its elastic requests at their floor (this step only; the next step's scale restores
        them) when the controller's measurements say it would otherwise miss the ITL target
        (``ElasticController.floor_prompt_steps``). Such a step stalls every decoding request
        for as long as it takes, and it is the slow kind: its prompt rows cost about as much
        as every routed step they take (measured on the default model, compiled: 16 ms for
        an 8-token chunk at budget 1, 8 ms at budget 0; about 54-65 ms for 48 tokens at
        budget 1). At a floor of 0 the step skips the routed steps. Returns whether it
        floored anyone."""
        assert self.controller is not None
        if not self.controller.floor_prompt_steps():
            return False
        floored = [s.seq for s in plan.scheduled if s.seq.elastic]
        for seq in floored:
            self._set_budget(seq, 0.0)
        if floored and self.controller.scale == 1.0:
            self.controller.reduced_steps += 1          # else already counted this step
        return bool(floored)

    @staticmethod
    def _stalls_decoding(plan: SchedulerOutput) -> bool:
        """The step computes prompt tokens while other requests are decoding."""
        return (any(s.num_new_tokens > 1 and not s.num_draft for s in plan.scheduled)
                and any((s.num_new_tokens == 1 or s.num_draft) and s.seq.output_token_ids
                        for s in plan.scheduled))

    def _set_budget(self, seq: Sequence, scale: float) -> None:
        assert seq.min_think_budget is not None
        budget = ElasticController.budget(seq.requested_think_budget, seq.min_think_budget,
                                          scale)
        if budget != seq.think_budget:
            seq.think_budget = budget
            seq.thresholds = self.model_config.thresholds_for(budget)
            seq.budget_changed = True

    def _observe(self, plan: SchedulerOutput, seconds: float, unfloored_stall: bool) -> None:
        assert self.controller is not None
        self.controller.observe_step(
            seconds, sum(s.num_new_tokens for s in plan.scheduled
                         if s.num_new_tokens > 1 and not s.num_draft),
            unfloored_stall)
        for s in plan.scheduled:
            m = s.seq.metrics
            if len(s.seq.output_token_ids) == 1 and s.samples and m.first_token_time:
                self.controller.observe_first_token(m.first_token_time - m.arrival_time)

    def _update(self, plan: SchedulerOutput, output: RunnerOutput) -> list[RequestOutput]:
        """The scheduler records the step (tokens, token-level stops); then the new tokens
        become text, and a stop string can end a sequence; then each request's delta."""
        failed = self.scheduler.update_from_output(plan, output)
        after_stop: dict[Sequence, int] = {}    # tokens appended after a stop string
        for t in output.sampled:
            seq = t.seq
            if seq.request_id in failed or not t.appended:
                continue
            if seq in after_stop:
                after_stop[seq] += 1
                continue
            stopped = isinstance(seq.stop_reason, str)
            try:
                if add_text(seq, t.token, self.tokenizer, self.eos_token_ids):
                    self.scheduler.stop(seq)
            except Exception as error:           # noqa: BLE001 - fails this request only
                failed[seq.request_id] = error
            if not stopped and isinstance(seq.stop_reason, str):   # a stop string, now
                after_stop[seq] = 0
        for seq, extra in after_stop.items():  # a verify row's tokens after its stop string
            drop_last_tokens(seq, extra)
        return [self._fail(rid, e) for rid, e in failed.items()] + \
            [o for rid in plan.request_ids
             if rid not in failed and (o := self._output(self.requests[rid]))]

    # ---- fault containment ----------------------------------------------------------------
    def _isolate(self, plan: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        """The plan failed: run each of its requests alone; fail the ones that fail alone,
        then check with a probe that the engine itself still runs (EngineBrokenError if
        not). The plan's K/V writes are overwritten by the re-runs; nothing else changed."""
        request_ids = plan.request_ids
        if len(request_ids) == 1:
            outputs = [self._fail(request_ids[0], error)]
        else:
            log.warning("a step of %d requests failed (%s: %s); re-running them one at a "
                        "time", len(request_ids), type(error).__name__, error)
            outputs = []
            for rid in request_ids:
                part = plan.only(rid)
                try:
                    outputs += self._update(part, self.runner.execute_model(part))
                except Exception as e:           # noqa: BLE001 - this request's own failure
                    outputs.append(self._fail(rid, e))
        if not self._probe():
            raise EngineBrokenError("the engine cannot run even a one-token probe step; "
                                    f"the first failure was {type(error).__name__}: {error}") \
                from error
        return outputs

    def _fail(self, request_id: str, error: Exception) -> RequestOutput:
        """End a request because serving it raised: free its blocks, report ``error``."""
        log.error("request %s failed and was ended: %s: %s", request_id,
                  type(error).__name__, error, exc_info=error)
        req = self.requests.pop(request_id)
        for seq in req.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                seq.metrics.finished_time = time.time()
            self.scheduler.finish(seq)
        out = make_request_output(request_id, req.seqs, [], False)
        out.error = f"{type(error).__name__}: {error}"
        return out

    def _probe(self) -> bool:
        """Run one token of a throwaway sequence through the model and the sampler; False if
        that fails too (the engine, not a request, is broken). True if there is no room."""
        seq = Sequence(seq_id="\x00probe", request_id="\x00probe", index=0,
                       prompt_token_ids=[max(self.tokenizer.bos_token_id, 0)],  # no BOS: id 0
                       params=SamplingParams(max_tokens=1, temperature=0.0),
                       think_budget=1.0, thresholds=self.model_config.thresholds_for(1.0))
        if not self.kv.can_allocate(seq.seq_id, 1):
            return True
        probe = ScheduledSeq(seq, 1, self.kv.allocate(seq.seq_id, 1), logit_positions=[0])
        try:
            self.runner.execute_model(SchedulerOutput([probe]))
            return True
        except Exception:                        # noqa: BLE001 - the answer is the point
            log.exception("the probe step failed")
            return False
        finally:
            self.kv.free(seq.seq_id)

    def _output(self, req: _Request) -> RequestOutput | None:
        deltas = [d for seq in req.seqs if (d := make_delta(seq)) is not None]
        first = req.seqs[0]
        prompt_ready = (first.wants_prompt_logprobs and not req.prompt_logprobs_sent
                        and (first.output_token_ids or first.finish_reason))
        if not deltas and not prompt_ready:
            return None
        if prompt_ready:
            req.prompt_logprobs_sent = True
        out = make_request_output(req.request_id, req.seqs, deltas, bool(prompt_ready))
        if out.finished:
            del self.requests[req.request_id]
        return out

    # ---- introspection --------------------------------------------------------------------
    def stats(self) -> EngineStats:
        mc = self.model_config
        cache = self.kv.prefix_cache
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=self.kv.pool.usage, num_blocks=self.kv.pool.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            tokens_computed=self.scheduler.tokens_computed,
            block_applications=(self.scheduler.tokens_computed * mc.n_layers
                                + sum(self.scheduler.routed_tokens)),
            routed_tokens=list(self.scheduler.routed_tokens),
            prefix_cache_queries=cache.queries if cache else 0,
            prefix_cache_hits=cache.hits if cache else 0,
            prefix_cache_nodes=len(cache) if cache else 0,
            elastic_scale=self.controller.scale if self.controller else 1.0,
            elastic_reduced_steps=self.controller.reduced_steps if self.controller else 0,
            step_token_counts=list(self.step_token_counts), step_token_sum=self.step_token_sum,
            spec_num_drafts=self.scheduler.spec_num_drafts,
            spec_num_draft_tokens=self.scheduler.spec_num_draft_tokens,
            spec_num_accepted_tokens=self.scheduler.spec_num_accepted_tokens,
            spec_accepted_per_position=list(self.scheduler.spec_accepted_per_position),
            compiled_steps=(self.runner.compiled.status() if self.runner.compiled else {}))

    def kv_bytes_per_token(self, budget: float) -> float:
        """ITT_SPEC formula: (n_layers + b·(S−1)·|itt|) · 2 · kv_heads · head_dim · size."""
        mc = self.model_config
        size = torch.tensor([], dtype=self.dtype).element_size()
        return (mc.n_layers + budget * mc.max_extra_steps) * 2 * mc.n_kv_heads * mc.head_dim * size
