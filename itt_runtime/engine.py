"""The engine core: requests in, one scheduled model step at a time, delta outputs out.

Single-threaded and synchronous; ``AsyncLLMEngine`` runs it on its own thread for the server
and ``LLM`` drives it for offline use.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from itt_runtime.config import ConfigError
from itt_runtime.kv_cache.block_pool import BlockPool
from itt_runtime.kv_cache.manager import KVCacheManager, cdiv
from itt_runtime.model.loader import load_model, resolve_model_path
from itt_runtime.output_processor import append_token, make_delta, make_request_output
from itt_runtime.outputs import RequestMetrics, RequestOutput
from itt_runtime.request import Sequence
from itt_runtime.runner.attention import KVCache
from itt_runtime.runner.cuda_graphs import CaptureError, DecodeGraphs
from itt_runtime.runner.model_runner import ModelRunner, to_device
from itt_runtime.sampler import Sampler, logprob_entries
from itt_runtime.sampling_params import ParamError, SamplingParams
from itt_runtime.scheduler import ScheduledSeq, Scheduler

log = logging.getLogger("itt_runtime")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

ROUTED_COMPUTE = ("auto", "gather", "masked")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"
    device: str = "auto"                     # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                      # auto (bf16 on CUDA, fp32 on CPU) | float32 | …
    max_model_len: int | None = None         # None: the model's max positions
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None       # bytes; None: see kv_cache_fraction
    kv_cache_fraction: float = 0.5           # of free device memory (CUDA) when no bytes given
    cpu_kv_cache_default: int = 512 * 2**20
    enable_chunked_prefill: bool = True
    default_think_budget: float | None = None
    seed: int = 0
    # Routed steps: "gather" runs the block on exactly the routed tokens (a device sync per
    # routed step), "masked" on every token without a sync; "auto" is masked for decode-only
    # steps on CUDA and gather otherwise (see runner/model_runner.py).
    routed_compute: str = "auto"
    enforce_eager: bool = False              # CUDA: never capture decode steps in CUDA graphs

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)
        need(self.dtype == "auto" or self.dtype in DTYPES,
             f"dtype must be auto or one of {sorted(set(DTYPES))}, got {self.dtype!r}")
        need(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        need(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        need(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        need(self.kv_cache_memory is None or self.kv_cache_memory > 0,
             "kv_cache_memory must be positive")
        need(0.0 < self.kv_cache_fraction <= 1.0, "kv_cache_fraction must be in (0, 1]")
        need(self.routed_compute in ROUTED_COMPUTE,
             f"routed_compute must be one of {ROUTED_COMPUTE}, got {self.routed_compute!r}")
        need(self.default_think_budget is None or 0.0 <= self.default_think_budget <= 1.0,
             f"default_think_budget must be in [0, 1], got {self.default_think_budget}")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        return dev

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


@dataclass
class EngineStats:
    """Snapshot for metrics. Counters are cumulative since start."""
    num_running: int
    num_waiting: int
    kv_usage: float
    num_blocks: int
    num_preemptions: int
    tokens_computed: int
    block_applications: int
    routed_tokens: list[int] = field(default_factory=list)   # per routed stream


class EngineBrokenError(RuntimeError):
    """The engine itself can no longer run steps (not one request's fault)."""


@dataclass
class StepResult:
    """What ``_execute`` read back from the device for one step, on the host."""
    scheduled: list[ScheduledSeq]                     # in the order the runner laid them out
    routed_counts: list[list[int]]                    # per scheduled row, per routed stream
    sampled: list[tuple[Sequence, int, int, dict]]    # (seq, token, extra steps, logprobs)


@dataclass
class _Request:
    request_id: str
    seqs: list[Sequence]
    prompt_logprobs_sent: bool = False


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.model_path = resolve_model_path(config.model)
        self.model, self.tokenizer = load_model(self.model_path, self.device, self.dtype)
        mc = self.model_config = self.model.cfg
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if not 1 <= self.max_model_len <= mc.max_position_embeddings:
            raise ConfigError(f"max_model_len {self.max_model_len} must be in [1, "
                              f"{mc.max_position_embeddings}] (the model's max positions)")
        self.default_budget = (config.default_think_budget
                               if config.default_think_budget is not None
                               else mc.default_budget)
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
                                 mc.n_layers)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.runner = ModelRunner(self.model, self.cache)
        # Decode steps from CUDA graphs: needs masked routed steps (a gather syncs).
        self.graphs: DecodeGraphs | None = None
        if (self.device.type == "cuda" and not config.enforce_eager
                and config.routed_compute != "gather"):
            self.graphs = DecodeGraphs(self.runner, config.max_num_seqs,
                                       cdiv(self.max_model_len, config.block_size))
        self.sampler = Sampler(self.tokenizer.eos_token_id, config.seed)
        self.requests: dict[str, _Request] = {}
        self.tokens_computed = 0
        self.routed_tokens = [0] * mc.max_extra_steps
        log.info("loaded %s (%s, %d layers, ITT layers %s x%d) on %s as %s; %d KV blocks of "
                 "%d tokens (%.1f MiB)", self.model_path, "ITT" if mc.is_itt else "dense",
                 mc.n_layers, list(mc.itt_layers), mc.think_steps, self.device,
                 str(self.dtype).replace("torch.", ""), num_blocks, config.block_size,
                 self.kv_cache_bytes / 2**20)

    def _kv_bytes(self) -> int:
        if self.config.kv_cache_memory is not None:
            return self.config.kv_cache_memory
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * self.config.kv_cache_fraction)
        return self.config.cpu_kv_cache_default

    # ---- requests -------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ParamError for a request that can never be served."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ParamError("prompt", "the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ParamError("prompt", f"prompt token ids must be integers in [0, {vocab})")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad_stop:
            raise ParamError("stop_token_ids", f"stop_token_ids must be in [0, {vocab}), got "
                             f"{bad_stop[0]}")
        if n >= self.max_model_len:
            raise ParamError("prompt", f"this model's maximum context length is "
                             f"{self.max_model_len} tokens, but the prompt has {n} tokens")
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
        budget = self.default_budget if params.think_budget is None else params.think_budget
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
                metrics=RequestMetrics(arrival_time or time.time()), generator=gen)
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None] * len(prompt_token_ids)
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
        """Schedule, execute, update. A failure while executing the batch is contained: the
        batch is re-run one request at a time, a request that fails on its own is failed alone
        (its blocks freed, an output with ``error`` set), and the others go on. If even a
        throwaway one-token probe fails afterwards, the engine itself is broken and
        ``EngineBrokenError`` is raised."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        try:
            result = self._execute(plan.scheduled)
        except Exception as error:               # noqa: BLE001 - contained, see _isolate
            return self._isolate(plan.scheduled, error)
        return self._update(result)

    def _execute(self, scheduled: list[ScheduledSeq]) -> StepResult:
        """Run the model and the sampler on ``scheduled`` and read the results to the host.
        Writes K/V and prompt logprobs but no engine bookkeeping, so it can be re-run."""
        # Single-token rows first: the runner attends over them in one call.
        scheduled = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)
        logit_pos: list[list[int]] = []
        for s in scheduled:
            c, n, seq = s.seq.num_computed_tokens, s.num_new_tokens, s.seq
            wanted = []
            if seq.wants_prompt_logprobs:     # positions that predict the next prompt token
                wanted = [i for i in range(n) if c + i < seq.num_prompt_tokens - 1]
            if s.samples and (not wanted or wanted[-1] != n - 1):
                wanted.append(n - 1)
            logit_pos.append(wanted)
        kvs = [self.kv.get(s.seq.seq_id) for s in scheduled]
        decode_only = all(pos == [0] for pos in logit_pos) and \
            len(scheduled) == sum(s.num_new_tokens for s in scheduled)
        masked = self._masked_routing(decode_only)
        graphs = self.graphs
        out = None
        if decode_only and masked and graphs is not None and graphs.can_run(len(scheduled)):
            try:
                out = graphs.run(scheduled, kvs)
            except CaptureError:
                # Nothing of the step was written: serve it and all later ones eagerly.
                log.warning("CUDA graph capture failed; running every step eagerly",
                            exc_info=True)
                self.graphs = None
        if out is None:
            batch = self.runner.prepare(scheduled, kvs, logit_pos, masked_routing=masked)
            out = self.runner.execute(batch)
        self._prompt_logprobs(scheduled, logit_pos, out.logits)

        sample_rows, sample_seqs, row = [], [], 0
        for b, s in enumerate(scheduled):
            for i in logit_pos[b]:
                if s.samples and i == s.num_new_tokens - 1:
                    sample_rows.append(row)
                    sample_seqs.append(s.seq)
                row += 1
        if sample_rows == list(range(len(sample_rows))):          # the usual case: a slice
            sample_logits = out.logits[:len(sample_rows)]
        else:
            sample_logits = out.logits[to_device(sample_rows, self.device)]
        tokens, logprobs = (self.sampler(sample_logits, sample_seqs) if sample_rows
                            else (out.extra_steps[:0], None))
        # The step's one device-to-host read: sampled tokens, thinking depths, routed counts.
        S, K = len(sample_rows), self.model_config.max_extra_steps
        host = torch.cat([tokens, out.extra_steps, out.routed_counts.flatten()]).tolist()
        extra = host[S:S + row]
        counts = host[S + row:]
        return StepResult(
            scheduled=scheduled,
            routed_counts=[counts[b * K:(b + 1) * K] for b in range(len(scheduled))],
            sampled=[(seq, tok, extra[r], logprobs[j] if logprobs is not None else {})
                     for j, (seq, tok, r) in enumerate(zip(sample_seqs, host[:S],
                                                           sample_rows))])

    def _update(self, result: StepResult) -> list[RequestOutput]:
        """Commit the step's K/V, append the sampled tokens, finish what is done."""
        for s, seq_counts in zip(result.scheduled, result.routed_counts):
            self.kv.commit(s.seq.seq_id, s.num_new_tokens, seq_counts)
            for k, cnt in enumerate(seq_counts):
                self.routed_tokens[k] += cnt
            self.tokens_computed += s.num_new_tokens
            s.seq.num_computed_tokens += s.num_new_tokens
        failed: dict[str, Exception] = {}
        for seq, tok, extra, lp in result.sampled:
            if seq.request_id in failed:
                continue
            try:
                append_token(seq, tok, extra, lp, self.tokenizer, self.max_model_len)
            except Exception as error:           # noqa: BLE001 - fails this request only
                failed[seq.request_id] = error
                continue
            if seq.finish_reason is not None:
                seq.metrics.finished_time = time.time()
                self.scheduler.finish(seq)
        outputs = [self._fail(rid, e) for rid, e in failed.items()]
        touched = dict.fromkeys(s.seq.request_id for s in result.scheduled
                                if s.seq.request_id not in failed)
        return outputs + [o for rid in touched if (o := self._output(self.requests[rid]))]

    # ---- fault containment ----------------------------------------------------------------
    def _isolate(self, scheduled: list[ScheduledSeq], error: Exception) \
            -> list[RequestOutput]:
        """The batch failed: run each request of it alone; fail the ones that fail alone."""
        by_request: dict[str, list[ScheduledSeq]] = {}
        for s in scheduled:
            by_request.setdefault(s.seq.request_id, []).append(s)
        if len(by_request) == 1:
            outputs = [self._fail(next(iter(by_request)), error)]
        else:
            log.warning("a step of %d requests failed (%s: %s); re-running them one at a "
                        "time", len(by_request), type(error).__name__, error)
            outputs = []
            for rid, group in by_request.items():
                try:
                    outputs += self._update(self._execute(group))
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
                       prompt_token_ids=[self.tokenizer.bos_token_id],
                       params=SamplingParams(max_tokens=1, temperature=0.0),
                       think_budget=1.0, thresholds=self.model_config.thresholds_for(1.0))
        if not self.kv.can_allocate(seq.seq_id, 1):
            return True
        self.kv.allocate(seq.seq_id, 1)
        try:
            self._execute([ScheduledSeq(seq, 1)])
            return True
        except Exception:                        # noqa: BLE001 - the answer is the point
            log.exception("the probe step failed")
            return False
        finally:
            self.kv.free(seq.seq_id)

    def _masked_routing(self, decode_only: bool) -> bool:
        mode = self.config.routed_compute
        if mode == "auto":
            return decode_only and self.device.type == "cuda"
        return mode == "masked"

    def _prompt_logprobs(self, scheduled, logit_pos, logits: torch.Tensor) -> None:
        row = 0
        for b, s in enumerate(scheduled):
            seq, c = s.seq, s.seq.num_computed_tokens
            rows = [(row + j, c + i) for j, i in enumerate(logit_pos[b])
                    if seq.wants_prompt_logprobs and c + i < seq.num_prompt_tokens - 1]
            row += len(logit_pos[b])
            if not rows:
                continue
            lp = torch.log_softmax(logits[[r for r, _ in rows]], dim=-1)
            targets = torch.tensor([seq.prompt_token_ids[p + 1] for _, p in rows],
                                   device=lp.device)
            entries = logprob_entries(lp, targets, [seq.params.prompt_logprobs] * len(rows))
            for (_, p), entry in zip(rows, entries):
                seq.prompt_logprobs[p + 1] = entry

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
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=self.kv.pool.usage, num_blocks=self.kv.pool.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            tokens_computed=self.tokens_computed,
            block_applications=self.tokens_computed * mc.n_layers + sum(self.routed_tokens),
            routed_tokens=list(self.routed_tokens))

    def kv_bytes_per_token(self, budget: float) -> float:
        """ITT_SPEC formula: (n_layers + b·(S−1)·|itt|) · 2 · kv_heads · head_dim · size."""
        mc = self.model_config
        size = torch.tensor([], dtype=self.dtype).element_size()
        return (mc.n_layers + budget * mc.max_extra_steps) * 2 * mc.n_kv_heads * mc.head_dim * size
