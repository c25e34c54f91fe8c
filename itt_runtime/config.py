"""Model configuration: the LLaMA backbone plus the ITT part (see docs/ITT_SPEC.md).

One frozen dataclass, validated once in ``__post_init__``; derived values are properties.
``ModelConfig.from_dict`` is the only place that reads ``config.json`` content, and every
problem it finds raises ``ConfigError`` naming the offending field.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A model configuration (or checkpoint) is invalid; the message names the problem."""


class CheckpointError(ConfigError):
    """A model directory is missing, incomplete or inconsistent (the message names the file
    and the problem)."""


def read_json_object(file: Path, error: type[Exception] = ConfigError) -> dict:
    """A JSON file holding an object (a model's config.json, index, tokenizer files);
    ``error`` naming the file if it is unreadable, not JSON, or not an object."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise error(f"{file}: must hold a JSON object")
    return raw


def option(default, help: str, kind: str = "str", flag: str | None = None,
           default_text: str | None = None, choices: tuple[str, ...] | None = None):
    """A configuration field that is also a command-line flag: its default lives here once,
    and the CLI (server/cli.py) builds the flag, its parser (``kind``: str, bool,
    positive_int, non_negative_int, port, seconds, milliseconds, budget, bytes) and its help
    from it.
    ``default_text`` describes a default that is not a literal (None meaning "the model's")."""
    return field(default=default, metadata={
        "help": help, "kind": kind, "flag": flag, "default_text": default_text,
        "choices": choices})


@dataclass(frozen=True)
class RoutingCalibration:
    """Causal-mode thresholds θ[l][t](b), calibrated on held-out text after training.

    Thresholds are stored on the router logit (θ = logit(τ), route iff r_t(y) > θ, which is
    ITT_SPEC's s_t > τ without fp32 sigmoid saturation).
    ``thresholds[i][t][k]`` is the threshold of the i-th ITT layer's routed step t+1 for
    ``budgets[k]``. Between grid points the threshold is interpolated linearly in b.
    b = 0 routes nothing and b = 1 routes everything, whatever the grid says.
    """

    budgets: tuple[float, ...]
    thresholds: tuple[tuple[tuple[float, ...], ...], ...]

    def threshold(self, itt_index: int, step: int, budget: float) -> float:
        """Threshold for routed step ``step`` (1-based) of the ``itt_index``-th ITT layer."""
        if budget <= 0.0:
            return math.inf
        if budget >= 1.0:
            return -math.inf
        row = self.thresholds[itt_index][step - 1]
        k = bisect.bisect_right(self.budgets, budget)
        if k == 0:
            return row[0]
        if k == len(self.budgets):
            return row[-1]
        b0, b1 = self.budgets[k - 1], self.budgets[k]
        w = (budget - b0) / (b1 - b0)
        return row[k - 1] * (1.0 - w) + row[k] * w


ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for contexts longer than pre-training (as transformers'
    ``rope_scaling``): ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama
    3.1/3.2) divides only the low frequencies, keeps the high ones and blends in between,
    with wavelength bounds ``original_max_position_embeddings / {low,high}_freq_factor``."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None             # llama3 only
    high_freq_factor: float | None = None            # llama3 only
    original_max_position_embeddings: int | None = None   # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 688
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 1024
    tie_embeddings: bool = True
    # ITT part. An empty ``itt_layers`` is a plain LLaMA model.
    itt_layers: tuple[int, ...] = ()
    think_steps: int = 1
    train_capacity: float = 0.5
    calibration: RoutingCalibration | None = None
    default_think_budget: float | None = None  # None -> train_capacity
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Checkpoint features of LLaMA-family models from Hugging Face (itt_runtime/model/hf.py);
    # an upcycled model keeps them in this format.
    extra_eos_token_ids: tuple[int, ...] = ()  # also end generation (Llama 3's <|eot_id|> …)
    head_dim_override: int | None = None       # HF 'head_dim' when not d_model // n_heads
    qkv_bias: bool = False                     # Qwen2: biases on q, k and v
    o_bias: bool = False                       # Llama 'attention_bias': q, k, v and o
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None          # Mistral/Qwen2: context must fit in it
    torch_dtype: str | None = None             # the checkpoint's dtype (informational)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config.json: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                     "max_position_embeddings", "think_steps"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"'{name}' must be a positive integer, got {v!r}")
        # Type checks first, so that a string or null in config.json is reported by field
        # name instead of as a bare TypeError from a comparison below.
        for name in ("rope_theta", "norm_eps", "train_capacity", "default_think_budget"):
            v = getattr(self, name)
            need((v is None and name == "default_think_budget")
                 or (isinstance(v, (int, float)) and not isinstance(v, bool)),
                 f"'{name}' must be a number, got {v!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool),
                 f"'{name}' must be an integer, got {v!r}")
        for name in ("tie_embeddings", "qkv_bias", "o_bias"):
            v = getattr(self, name)
            need(isinstance(v, bool), f"'{name}' must be true or false, got {v!r}")
        need(all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                 for i in self.extra_eos_token_ids),
             f"'extra_eos_token_ids' must be a list of token ids, got "
             f"{list(self.extra_eos_token_ids)}")
        for name in ("head_dim_override", "sliding_window"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                 f"'{name}' must be a positive integer or null, got {v!r}")
        self._check_rope_scaling(need)
        need(all(isinstance(i, int) and not isinstance(i, bool) for i in self.itt_layers),
             f"'itt_layers' must be a list of integer layer indices, got {list(self.itt_layers)}")
        need(self.head_dim_override is not None or self.d_model % self.n_heads == 0,
             f"'d_model' ({self.d_model}) must be divisible by 'n_heads' ({self.n_heads})")
        need(self.n_heads % self.n_kv_heads == 0,
             f"'n_heads' ({self.n_heads}) must be divisible by 'n_kv_heads' ({self.n_kv_heads})")
        need(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for RoPE")
        need(self.rope_theta > 0, f"'rope_theta' must be positive, got {self.rope_theta}")
        need(self.norm_eps > 0, f"'norm_eps' must be positive, got {self.norm_eps}")
        need(len(set(self.itt_layers)) == len(self.itt_layers),
             f"'itt_layers' has duplicates: {list(self.itt_layers)}")
        for layer in self.itt_layers:
            need(isinstance(layer, int) and 0 <= layer < self.n_layers,
                 f"'itt_layers' entry {layer!r} is not a layer index in [0, {self.n_layers})")
        need(list(self.itt_layers) == sorted(self.itt_layers), "'itt_layers' must be sorted")
        need(0.0 < self.train_capacity <= 1.0,
             f"'train_capacity' must be in (0, 1], got {self.train_capacity}")
        if self.default_think_budget is not None:
            need(0.0 <= self.default_think_budget <= 1.0,
                 f"'default_think_budget' must be in [0, 1], got {self.default_think_budget}")
        cal = self.calibration
        if cal is not None:
            need(len(cal.budgets) >= 1 and list(cal.budgets) == sorted(set(cal.budgets)),
                 "'calibration.budgets' must be a non-empty increasing list")
            need(all(0.0 <= b <= 1.0 for b in cal.budgets),
                 "'calibration.budgets' must lie in [0, 1]")
            shape = (len(self.itt_layers), self.think_steps - 1, len(cal.budgets))
            got = (len(cal.thresholds),
                   len(cal.thresholds[0]) if cal.thresholds else 0,
                   len(cal.thresholds[0][0]) if cal.thresholds and cal.thresholds[0] else 0)
            ok = got == shape and all(
                len(steps) == shape[1] and all(len(row) == shape[2] for row in steps)
                for steps in cal.thresholds)
            need(ok or shape[1] == 0,
                 f"'calibration.thresholds' must have shape (itt layers, think_steps-1, budgets)"
                 f" = {shape}, got {got}")

    def _check_rope_scaling(self, need) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        need(rs.rope_type in ROPE_SCALING_TYPES,
             f"'rope_scaling' type {rs.rope_type!r} is not supported (supported: "
             f"{', '.join(ROPE_SCALING_TYPES)})")
        need(isinstance(rs.factor, (int, float)) and not isinstance(rs.factor, bool)
             and rs.factor >= 1.0, f"'rope_scaling.factor' must be a number >= 1, got "
             f"{rs.factor!r}")
        if rs.rope_type == "llama3":
            lo, hi = rs.low_freq_factor, rs.high_freq_factor
            need(all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                     for v in (lo, hi)) and lo < hi,      # type: ignore[operator]
                 "'rope_scaling' llama3 needs 0 < low_freq_factor < high_freq_factor, got "
                 f"{lo!r}, {hi!r}")
            n = rs.original_max_position_embeddings
            need(isinstance(n, int) and not isinstance(n, bool) and n > 0,
                 "'rope_scaling.original_max_position_embeddings' must be a positive integer, "
                 f"got {n!r}")

    # ---- derived values -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        if self.head_dim_override is not None:
            return self.head_dim_override
        return self.d_model // self.n_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token id that ends generation: ``eos_token_id`` first (a negative
        ``eos_token_id``, from a checkpoint that names none, is left out)."""
        first = (self.eos_token_id,) if self.eos_token_id >= 0 else ()
        return (*first, *(i for i in self.extra_eos_token_ids if i != self.eos_token_id))

    @property
    def n_routed_steps(self) -> int:
        """Routed steps per ITT layer (S - 1)."""
        return self.think_steps - 1 if self.itt_layers else 0

    @property
    def max_extra_steps(self) -> int:
        """Most extra block applications a token can receive: (S-1) * |itt_layers|."""
        return self.n_routed_steps * len(self.itt_layers)

    @property
    def num_kv_streams(self) -> int:
        """KV streams per sequence: one per layer plus one per (ITT layer, routed step)."""
        return self.n_layers + self.max_extra_steps

    @property
    def is_itt(self) -> bool:
        return self.max_extra_steps > 0

    @property
    def default_budget(self) -> float:
        if self.default_think_budget is not None:
            return self.default_think_budget
        return self.train_capacity if self.is_itt else 0.0

    def routed_stream_index(self, itt_index: int, step: int) -> int:
        """Stream id of routed step ``step`` (1-based) of the ``itt_index``-th ITT layer."""
        return self.n_layers + itt_index * self.n_routed_steps + (step - 1)

    def thresholds_for(self, budget: float) -> list[float]:
        """Thresholds for every routed stream, in stream order, for one budget."""
        out = []
        for i in range(len(self.itt_layers)):
            for t in range(1, self.n_routed_steps + 1):
                if self.calibration is None:
                    # Uncalibrated model: only the two exact ends are meaningful.
                    out.append(-math.inf if budget >= 1.0 else math.inf if budget <= 0.0
                               else 0.0)
                else:
                    out.append(self.calibration.threshold(i, t, budget))
        return out

    # ---- (de)serialisation ----------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["itt_layers"] = list(self.itt_layers)
        d["extra_eos_token_ids"] = list(self.extra_eos_token_ids)
        # Features a model does not use are left out, so older readers still load it.
        for name in ("extra_eos_token_ids", "head_dim_override", "qkv_bias", "o_bias",
                     "rope_scaling", "sliding_window", "torch_dtype"):
            if getattr(self, name) == self.__dataclass_fields__[name].default:
                del d[name]
        if self.calibration is not None:
            d["calibration"] = {
                "budgets": list(self.calibration.budgets),
                "thresholds": [[list(r) for r in s] for s in self.calibration.thresholds],
            }
        return {"model_type": "itt", **d, **self.extra}

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ConfigError("config.json: must hold a JSON object")
        raw = dict(raw)
        model_type = raw.pop("model_type", None)
        if model_type != "itt":
            raise ConfigError(f"config.json: 'model_type' must be \"itt\", got {model_type!r}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = sorted(set(raw) - known)
        extra = {k: raw.pop(k) for k in unknown if k.startswith("_")}  # free-form notes
        unknown = [k for k in unknown if not k.startswith("_")]
        if unknown:
            raise ConfigError(f"config.json: unknown field(s) {unknown}")
        if "itt_layers" in raw:
            if not isinstance(raw["itt_layers"], list):
                raise ConfigError("config.json: 'itt_layers' must be a list of layer indices")
            raw["itt_layers"] = tuple(raw["itt_layers"])
        if "extra_eos_token_ids" in raw:
            if not isinstance(raw["extra_eos_token_ids"], list):
                raise ConfigError("config.json: 'extra_eos_token_ids' must be a list of ids")
            raw["extra_eos_token_ids"] = tuple(raw["extra_eos_token_ids"])
        rs = raw.get("rope_scaling")
        if rs is not None:
            try:
                raw["rope_scaling"] = RopeScaling(**rs)
            except TypeError as e:
                raise ConfigError(f"config.json: malformed 'rope_scaling' ({e})") from None
        cal = raw.get("calibration")
        if cal is not None:
            try:
                raw["calibration"] = RoutingCalibration(
                    budgets=tuple(float(b) for b in cal["budgets"]),
                    thresholds=tuple(tuple(tuple(float(v) for v in row) for row in steps)
                                     for steps in cal["thresholds"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"config.json: malformed 'calibration' ({e})") from None
        try:
            return cls(**raw, extra=extra)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None
