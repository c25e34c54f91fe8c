"""Elastic thinking: under load, lower the think budget of requests that allow it, to hold
latency targets, and give it back when the load passes.

A request with ``min_think_budget`` runs at ``min + scale · (requested − min)``; one global
``scale`` in [0, 1] is set by this controller before every engine step. Routing is causal, so
a budget change between tokens is well defined: computed tokens keep their routing and KV,
later tokens use the new thresholds.

The controller is AIMD with a dead band, the scheme TCP uses for the same problem (share a
capacity whose size is only known by overshooting it):

  * pressure = max(ITL / target ITL, TTFT / target TTFT). ITL is the 90th percentile of
    the wall times of the steps since the last change (a step's time is the time between two
    tokens of every request in it; a tail quantile, because operators set targets on p99 and
    a mean hides the slow steps); TTFT an exponentially weighted mean of recent first-token
    latencies, or the age of the oldest waiting request if that is larger (a lower bound on
    that request's TTFT);
  * pressure > 1 (a target is missed): scale × DECREASE, at most once per window — a burst is
    answered within one window;
  * pressure < LOW_WATER: scale + INCREASE per window — recovery is gradual, and stops inside
    the dead band [LOW_WATER, 1] where nothing changes, so that a constant load settles
    instead of oscillating;
  * each change waits a window of fresh measurements, since steps after a change are the
    ones that show its effect.

Targets that cannot be met even at the minimum budgets leave the scale at 0 (every elastic
request at its floor); requests without ``min_think_budget`` are never touched.

A lower budget makes every step cheaper, but a step that also computes a new prompt is slower
than the target however little its rows think: the prompt's tokens stall every running
request for that step. So with an ITL target the controller also caps the prompt tokens per
step (``prefill_cap``): from a cost model it learns as it goes (the time of steps without
prompt tokens, and the extra time per prompt token of steps with them) it admits as many as
fit in ``CHUNK_HEADROOM`` of the target, at least ``MIN_CHUNK``. Long prompts are then
prefilled in chunks over several steps (chunked prefill, so results are unchanged), trading a
little TTFT of the new request for the ITL of all the others — as a smaller
``--max-batch-prefill-tokens`` would, but only as far as the measured load needs.

And a step that computes prompt tokens while others decode may run its elastic requests at
their floor (``LLMEngine._floor_prompt_step``): with compiled decode steps such a step is
the one slow step in many, and the cap alone cannot bring it under the target (a prompt
step at budget 1 costs 34 ms even for 8 tokens on the default model on CPU). Whether to is
measured too (``floor_prompt_steps``): the stall such a step adds when it runs at the
current budgets, learned from the ones that do, against the target. So a target the full
budget meets keeps prompts at their budget (at low load too), and a prompt step is floored
only while the decode steps around it plus that stall would miss ``CHUNK_HEADROOM`` of
the target; until a stall has been measured, prompt steps run unfloored and measure it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

DECREASE = 0.7              # multiplicative decrease of the scale when a target is missed
INCREASE = 0.05             # additive increase per window with headroom
LOW_WATER = 0.8             # pressure below this is headroom
WINDOW_S = 0.25             # seconds between two changes
EWMA = 0.3                  # weight of the newest measurement
ITL_QUANTILE = 0.9          # the step-time quantile compared with the ITL target
RECENT_STEPS = 64           # at most this many step times kept for it
CHUNK_HEADROOM = 0.8        # prompt tokens per step fill at most this share of the ITL target
MIN_CHUNK = 16              # ... but at least this many, so that prompts always progress
MIN_COST_TOKENS = 8         # steps with fewer prompt tokens say too little about their cost


@dataclass
class ElasticController:
    target_itl: float | None                 # seconds
    target_ttft: float | None                # seconds
    scale: float = 1.0
    itl: float | None = None                 # ITL_QUANTILE of the recent step times
    ttft: float | None = None                # smoothed time to first token
    last_change: float = field(default=float("-inf"))
    reduced_steps: int = 0                   # steps run with the scale below 1
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    decode_step: float | None = None         # smoothed time of a step without prompt tokens
    prompt_token: float | None = None        # smoothed extra time per prompt token
    prompt_stall: float | None = None        # smoothed extra time of an unfloored prompt step

    def observe_step(self, seconds: float, prompt_tokens: int = 0,
                     unfloored_stall: bool = False) -> None:
        """One step's wall time; ``prompt_tokens``: tokens of its multi-token rows;
        ``unfloored_stall``: it computed prompt tokens beside decoding requests and ran
        nobody at a floor for it."""
        self.recent.append(seconds)
        ordered = sorted(self.recent)
        self.itl = ordered[min(len(ordered) - 1, int(ITL_QUANTILE * len(ordered)))]
        if prompt_tokens == 0:
            self.decode_step = _ewma(self.decode_step, seconds)
        elif self.decode_step is not None:
            extra = max(0.0, seconds - self.decode_step)
            if prompt_tokens >= MIN_COST_TOKENS:
                self.prompt_token = _ewma(self.prompt_token, extra / prompt_tokens)
            if unfloored_stall:
                self.prompt_stall = _ewma(self.prompt_stall, extra)

    def floor_prompt_steps(self) -> bool:
        """Whether a step computing prompt tokens beside decoding requests should run its
        elastic requests at their floor: the decode step plus the stall measured for such
        a step at the budgets would exceed ``CHUNK_HEADROOM`` of the ITL target."""
        if self.target_itl is None or self.prompt_stall is None or self.decode_step is None:
            return False
        return self.decode_step + self.prompt_stall > CHUNK_HEADROOM * self.target_itl

    def prefill_cap(self) -> int | None:
        """The most prompt tokens the next step should compute (None: no limit), so that
        it stays within ``CHUNK_HEADROOM`` of the ITL target."""
        if self.target_itl is None or self.decode_step is None or not self.prompt_token:
            return None
        room = CHUNK_HEADROOM * self.target_itl - self.decode_step
        return max(MIN_CHUNK, int(room / self.prompt_token))

    def observe_first_token(self, seconds: float) -> None:
        self.ttft = _ewma(self.ttft, seconds)

    def pressure(self, oldest_waiting_s: float) -> float:
        p = 0.0
        if self.target_itl is not None and self.itl is not None:
            p = max(p, self.itl / self.target_itl)
        if self.target_ttft is not None:
            ttft = max(self.ttft or 0.0, oldest_waiting_s)
            p = max(p, ttft / self.target_ttft)
        return p

    def update(self, now: float, oldest_waiting_s: float) -> float:
        """The scale for the next step."""
        if now - self.last_change >= WINDOW_S:
            p = self.pressure(oldest_waiting_s)
            new = self.scale
            if p > 1.0:
                new = self.scale * DECREASE
                if new < 0.01:
                    new = 0.0
            elif p < LOW_WATER and self.scale < 1.0:
                new = min(1.0, self.scale + INCREASE)
            if new != self.scale:
                self.scale, self.last_change = new, now
                self.recent.clear()          # judge the new scale by its own steps only
        return self.scale

    @staticmethod
    def budget(requested: float, floor: float, scale: float) -> float:
        return floor + scale * (requested - floor)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new
