"""Elastic thinking: under load, lower the think budget of requests that allow it, to hold
latency targets, and give it back when the load passes.

A request with ``min_think_budget`` runs at ``min + scale · (requested − min)``; one global
``scale`` in [0, 1] is set by this controller before every engine step. Routing is causal, so
a budget change between tokens is well defined: computed tokens keep their routing and KV,
later tokens use the new thresholds.

The controller is AIMD with a dead band, the scheme TCP uses for the same problem (share a
capacity whose size is only known by overshooting it):

  * pressure = max(ITL / target ITL, TTFT / target TTFT), each signal an exponentially
    weighted mean (ITL: the wall time of recent steps, which is the time between two tokens
    of every running request; TTFT: recent first-token latencies, or the age of the oldest
    waiting request if that is larger — it is a lower bound on that request's TTFT);
  * pressure > 1 (a target is missed): scale × DECREASE, at most once per window — a burst is
    answered within one window;
  * pressure < LOW_WATER: scale + INCREASE per window — recovery is gradual, and stops inside
    the dead band [LOW_WATER, 1] where nothing changes, so that a constant load settles
    instead of oscillating;
  * each change waits a window of fresh measurements, since steps after a change are the
    ones that show its effect.

Targets that cannot be met even at the minimum budgets leave the scale at 0 (every elastic
request at its floor); requests without ``min_think_budget`` are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DECREASE = 0.7              # multiplicative decrease of the scale when a target is missed
INCREASE = 0.05             # additive increase per window with headroom
LOW_WATER = 0.8             # pressure below this is headroom
WINDOW_S = 0.25             # seconds between two changes
EWMA = 0.3                  # weight of the newest measurement


@dataclass
class ElasticController:
    target_itl: float | None                 # seconds
    target_ttft: float | None                # seconds
    scale: float = 1.0
    itl: float | None = None                 # smoothed step time
    ttft: float | None = None                # smoothed time to first token
    last_change: float = field(default=float("-inf"))
    reduced_steps: int = 0                   # steps run with the scale below 1

    def observe_step(self, seconds: float) -> None:
        self.itl = seconds if self.itl is None else (1 - EWMA) * self.itl + EWMA * seconds

    def observe_first_token(self, seconds: float) -> None:
        self.ttft = seconds if self.ttft is None else (1 - EWMA) * self.ttft + EWMA * seconds

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
        return self.scale

    @staticmethod
    def budget(requested: float, floor: float, scale: float) -> float:
        return floor + scale * (requested - floor)
