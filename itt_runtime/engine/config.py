"""The engine's configuration (``EngineConfig``, whose ``option`` fields are also itt-server
flags), the read-only facts of a loaded engine (``EngineInfo``) and its statistics
(``EngineStats``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from itt_runtime.config import ConfigError, ModelConfig, option
from itt_runtime.model.quantization import MODES as QUANTIZATION_MODES
from itt_runtime.sampling_params import SamplingParams

# How routed steps compute (runner/model_runner.py): "gather" runs only the routed tokens,
# "masked" every token with the others masked out (CUDA graphs); "auto" picks per step.
ROUTED_COMPUTE = ("auto", "gather", "masked")
COMPILE_MODES = ("auto", "on", "off")
# Bucket upper bounds of the tokens-per-step histogram (vLLM's iteration_tokens buckets).
STEP_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Self-speculative decoding (``--speculative-config``, vLLM's shape): the model drafts
    ``num_speculative_tokens`` tokens at ``draft_think_budget`` (its routed steps skipped at
    0), then verifies them at the request's own budget in one multi-token step
    (runner/speculative.py). Only ``method`` "itt_self" exists: an ITT model is its own
    draft model."""
    method: str = "itt_self"
    num_speculative_tokens: int = 4
    draft_think_budget: float = 0.0
    # vLLM's: no speculation while this many requests or more are running (a full batch
    # gains nothing on a CPU: measured break-even at 16 streams).
    disable_by_batch_size: int | None = None
    # Whether seeded sampled requests speculate. Speculation draws its random numbers its
    # own way, so a seed gives other (equally distributed) text with it than without; with
    # ``disable_by_batch_size`` a seeded request would then read differently alone and in a
    # batch. Not a key of the flag: False only for "auto" (AUTO_SPECULATION).
    seeded: bool = True
    # No drafts while fewer than this share of the recently drafted tokens were accepted
    # (Scheduler.drafts_pay; one round in every PROBE_EVERY decode rows still drafts, to see
    # a change). Not a key of the flag: set only for "auto".
    min_acceptance: float | None = None

    METHODS = ("itt_self",)
    MAX_TOKENS = 16

    @classmethod
    def parse(cls, value: str | dict | None) -> SpeculativeConfig | None:
        """From the flag's JSON text or an ``LLM(speculative_config=...)`` dict; None or
        "off": off. ``ConfigError`` naming the key for anything else ("auto" is
        ``EngineConfig.speculative_for``'s)."""
        if value is None or value == "off":
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError("--speculative-config must be a JSON object, e.g. "
                              '\'{"method": "itt_self", "num_speculative_tokens": 4}\'')
        known = ("method", "num_speculative_tokens", "draft_think_budget",
                 "disable_by_batch_size")
        unknown = set(value) - set(known)
        if unknown:
            raise ConfigError(f"--speculative-config: unknown key(s) {sorted(unknown)}; "
                              f"known: {', '.join(known)}")
        method = value.get("method", "itt_self")
        if method not in cls.METHODS:
            raise ConfigError(f"--speculative-config: method must be 'itt_self' (the model "
                              f"drafts for itself at a low think budget), got {method!r}")
        k = value.get("num_speculative_tokens", 4)
        if type(k) is not int or not 1 <= k <= cls.MAX_TOKENS:
            raise ConfigError("--speculative-config: num_speculative_tokens must be an "
                              f"integer in [1, {cls.MAX_TOKENS}], got {k!r}")
        b = value.get("draft_think_budget", 0.0)
        if type(b) not in (int, float) or not 0.0 <= b < 1.0:
            raise ConfigError("--speculative-config: draft_think_budget must be a number in "
                              f"[0, 1), got {b!r}")
        off = value.get("disable_by_batch_size")
        if off is not None and (type(off) is not int or off < 1):
            raise ConfigError("--speculative-config: disable_by_batch_size must be an integer "
                              f">= 1, got {off!r}")
        return cls(method, k, float(b), off)


# What ``--speculative-config auto`` (the default) turns on where it pays: an ITT model in
# fp32 on CPU. Default model, budget 1, 2 threads, 128 tokens, compiled steps: 1.43x the
# tokens/s of one stream through HTTP at k = 4 (1.33x in process; k = 2: 1.09x, k = 6:
# 1.24x), 1.08x at 2 streams, 0.89-0.96x at 4 and 8 (docs/engine.md, "When it pays"); so it
# speculates while one request runs.
# Seeded sampled requests do not speculate under it, so that what "auto" turns on never
# changes an output: greedy ones are identical with speculation, unseeded ones random anyway.
# And it stops drafting while few drafts are accepted: the arith model accepts 53 % at k = 4
# and ran 0.76x as fast with drafts; the cost model's break-even on the default model is
# about 78 % (it accepts 86-89 %).
AUTO_SPECULATION = SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=2,
                                     seeded=False, min_acceptance=0.75)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's configuration. Fields made with ``option`` are also itt-server flags."""

    model: str = option("default", "model directory (this project's or a Hugging Face "
                        "LLaMA-family one), a GGUF file (dequantized at load), or 'default' "
                        "for the shipped model")
    tokenizer: str | None = option(None, "a Hugging Face tokenizer directory to use instead "
                                   "of the model's own (for a GGUF file, instead of the "
                                   "tokenizer built from its vocabulary)",
                                   default_text="the model's")
    device: str = option("auto", "auto (CUDA if present), cpu, cuda or cuda:N")
    dtype: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or "
                        "float16 (bf16 on a CPU without AVX-512 is slower than fp32)")
    quantization: str = option(
        "none", "keep the weights quantized: int8 (CPU: every matmul weight int8 per output "
        "channel, multiplied by fbgemm's int8 kernels with each token's activations "
        "quantized on its own; the embedding int8 per row); none: the weights in --dtype",
        choices=QUANTIZATION_MODES)
    max_model_len: int | None = option(None, "context length (prompt + generated)",
                                       "positive_int", default_text="the model's max positions")
    max_num_seqs: int = option(64, "sequences in the running batch", "positive_int")
    max_num_batched_tokens: int = option(2048, "tokens computed per engine step (the step's "
                                         "token budget)", "positive_int")
    max_batch_prefill_tokens: int | None = option(
        None, "prompt tokens computed per engine step; longer prompts are prefilled in chunks "
        "over several steps: a smaller value bounds how long a new prompt stalls the "
        "requests already generating (their inter-token latency), at some cost in its time "
        "to first token", "positive_int", default_text="the step's token budget")
    block_size: int = option(16, "tokens per KV block", "positive_int")
    kv_cache_memory: int | None = option(
        None, "KV cache size: bytes or 512MiB, 4G (powers of 1024)", "bytes",
        default_text="half the free GPU memory; 512MiB on CPU")
    kv_cache_fraction: float = 0.5           # of free device memory (CUDA) when no bytes given
    cpu_kv_cache_default: int = 512 * 2**20
    enable_chunked_prefill: bool = option(True, "split long prompts over steps to fill the "
                                          "token budget", "bool")
    default_think_budget: float | None = option(
        None, "think budget of requests that do not set one", "budget",
        default_text="the model's (its trained capacity)")
    seed: int = option(0, "seed of the sampler for requests without a seed",
                       "non_negative_int")
    # Routed steps: "gather" runs the block on exactly the routed tokens (a device sync per
    # routed step), "masked" on every token without a sync; "auto" is masked for decode-only
    # steps on CUDA and gather otherwise (see runner/forward.py).
    routed_compute: str = option(
        "auto", "routed thinking steps on exactly the routed tokens (gather: one device sync "
        "per routed step) or on every token with the routed results kept (masked: no sync); "
        "auto: masked for decode-only steps on CUDA, gather otherwise",
        choices=ROUTED_COMPUTE)
    enforce_eager: bool = option(False, "run every step eagerly: no CUDA graphs (CUDA), no "
                                 "compiled decode steps (CPU, --compile)", "bool")
    # "auto" by default: a server answers at once, eagerly, while a child process compiles
    # the variants ahead of time (runner/aot_compile.py; 0.5-3.5 min each on a 2-core CPU) or
    # loads them from the compile cache (seconds). Offline engines (LLM) stay eager unless
    # asked: a compile costs more than short jobs (tests, itt-eval) save.
    compile: str = option(
        "auto", "CPU: steps (decode rows and prompt chunks) compiled ahead of time "
        "(AOTInductor, in a child process at the lowest CPU priority) and cached on disk, four "
        "variants (one decode row or several rows, routing or at budget 0). 'auto': the "
        "server answers at once, eagerly, and uses each variant once it is ready (about 7 min "
        "for all on a 2-core CPU the first time, seconds from the compile cache); 'on': the "
        "server listens once all are ready; 'off': never. Offline engines compile only with "
        "'on'",
        choices=COMPILE_MODES)
    cpu_compile: bool = option(False, "the same as --compile on", "bool")

    @property
    def compile_mode(self) -> str:
        """``compile`` as it applies: "on" with ``cpu_compile``, "off" with
        ``enforce_eager``."""
        if self.enforce_eager:
            return "off"
        return "on" if self.cpu_compile else self.compile
    elastic_thinking: bool = option(
        False, "lower the think budget of requests that set min_think_budget when latency "
        "targets are missed, and restore it when load falls", "bool")
    target_itl_ms: float | None = option(None, "elastic thinking: inter-token latency target "
                                         "(ms)", "milliseconds", default_text="none")
    target_ttft_ms: float | None = option(None, "elastic thinking: time-to-first-token "
                                          "target (ms)", "milliseconds", default_text="none")
    generation_config: str = option(
        "auto", "sampling defaults for fields a request leaves unset: auto (the model's "
        "generation_config.json), vllm (none: the API's defaults) or a folder holding a "
        "generation_config.json; its eos ids always end generation")
    enable_prefix_caching: bool = option(
        True, "reuse the KV streams of cached prompt prefixes (same tokens, same routing "
        "thresholds)", "bool")
    speculative_config: str | dict | None = option(
        "auto", "self-speculative decoding, as JSON: '{\"method\": \"itt_self\", "
        "\"num_speculative_tokens\": 4, \"draft_think_budget\": 0}': the model drafts k "
        "tokens at the draft budget and verifies them at each request's own budget in one "
        "step (requests above the draft budget; greedy output identical, sampled output "
        "of the same distribution); auto: k = 4 while one request runs and most drafts are "
        "accepted, for an ITT model in fp32 on CPU (where it measured 1.3-1.4x the "
        "tokens/s), off elsewhere; off")

    def speculative_for(self, device: torch.device, dtype: torch.dtype,
                        is_itt: bool) -> SpeculativeConfig | None:
        """The speculation this engine runs: ``speculative_config`` parsed, or for "auto"
        ``AUTO_SPECULATION`` where it measured a gain (an ITT model in fp32 on CPU, not
        quantized) and none elsewhere."""
        if self.speculative_config != "auto":
            return SpeculativeConfig.parse(self.speculative_config)
        pays = (is_itt and device.type == "cpu" and dtype == torch.float32
                and self.quantization == "none")
        return AUTO_SPECULATION if pays else None

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)
        need(self.dtype == "auto" or self.dtype in DTYPES,
             f"dtype must be auto or one of {sorted(set(DTYPES))}, got {self.dtype!r}")
        need(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        need(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        need(self.max_batch_prefill_tokens is None or self.enable_chunked_prefill,
             "--max-batch-prefill-tokens needs chunked prefill (it splits longer prompts)")
        need(self.max_batch_prefill_tokens is None or self.max_batch_prefill_tokens >= 1,
             "max_batch_prefill_tokens must be >= 1")
        need(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        need(self.kv_cache_memory is None or self.kv_cache_memory > 0,
             "kv_cache_memory must be positive")
        need(0.0 < self.kv_cache_fraction <= 1.0, "kv_cache_fraction must be in (0, 1]")
        need(self.routed_compute in ROUTED_COMPUTE,
             f"routed_compute must be one of {ROUTED_COMPUTE}, got {self.routed_compute!r}")
        need(self.compile in COMPILE_MODES,
             f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        targets = (self.target_itl_ms, self.target_ttft_ms)
        need(all(t is None or t > 0 for t in targets), "latency targets must be positive")
        need(self.elastic_thinking or targets == (None, None),
             "--target-itl-ms and --target-ttft-ms need --elastic-thinking")
        need(not self.elastic_thinking or targets != (None, None),
             "--elastic-thinking needs --target-itl-ms or --target-ttft-ms (or both)")
        need(self.default_think_budget is None or 0.0 <= self.default_think_budget <= 1.0,
             f"default_think_budget must be in [0, 1], got {self.default_think_budget}")
        if self.speculative_config != "auto":
            SpeculativeConfig.parse(self.speculative_config)   # ConfigError if malformed

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


@dataclass(frozen=True)
class EngineInfo:
    """Read-only facts about a loaded engine, for the server and tools."""
    model_path: Path
    model_config: ModelConfig
    device: str
    dtype: str
    max_model_len: int
    max_num_seqs: int
    block_size: int
    num_kv_blocks: int
    default_think_budget: float              # of requests that set none
    enable_prefix_caching: bool = False
    # generation_config.json's sampling defaults (SamplingParams field -> value), applied to
    # fields a request leaves unset; empty with --generation-config vllm.
    sampling_defaults: dict = field(default_factory=dict)
    eos_token_ids: frozenset[int] = frozenset()  # every id that ends a sequence

    def think_budget(self, params: SamplingParams) -> float:
        """The think budget a request runs at: its own, or the default."""
        return self.default_think_budget if params.think_budget is None else params.think_budget


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
    prefix_cache_queries: int = 0            # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0               # of which found
    prefix_cache_nodes: int = 0              # cached prefixes held
    elastic_scale: float = 1.0               # elastic requests run at min + scale·(req − min)
    elastic_reduced_steps: int = 0           # steps run with the scale below 1
    # Tokens per engine step: counts per bucket of STEP_TOKEN_BUCKETS (+ one for above all),
    # and their sum (vLLM's iteration_tokens histogram).
    step_token_counts: list[int] = field(default_factory=list)
    step_token_sum: int = 0
    # Self-speculative decoding (vLLM's spec_decode counters): verify steps of one sequence
    # (drafts), tokens drafted, drafted tokens accepted, and accepted ones per draft position.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)
    # Compiled CPU decode steps (runner/cpu_compile.py), by variant name: "compiling", "ready"
    # or "failed", and for a ready one the seconds after start-up it became ready.
    compiled_steps: dict[str, tuple[str, float | None]] = field(default_factory=dict)
