"""REBASE (SPEC 2.1): softmax-weighted sequential ceil allocation over all candidates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ets.strategies.base import Frontier, Strategy, StrategyConfig, option, register


def rebase_allocate(scores: Sequence[float], remaining: int, temperature: float,
                    keep: Sequence[bool] | None = None, cap: bool = True) -> list[int]:
    """Children per candidate (aligned with `scores`); pruned (keep False) candidates get 0.

    Sorted by score descending (stable), w_i = exp(s_i / T), S = sum(w) in that order, then
    sequentially n_i = ceil(R * w_i / S); R -= n_i; S -= w_i. This is the reference's float
    arithmetic exactly: in exact arithmetic the total is at most `remaining`, but the running
    S can round below the last w_i and give one extra child (13 of the 200 reference vectors).
    `cap=True` (what the search uses) clips each n_i to R so the width is never exceeded;
    `cap=False` reproduces the reference bit for bit."""
    alloc = [0] * len(scores)
    if len(scores) == 0 or remaining <= 0:
        return alloc
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = [True] * len(scores) if keep is None else [bool(k) for k in keep]
    weights = [math.exp(scores[i] / temperature) if kept[i] else 0.0 for i in range(len(scores))]
    r, s = int(remaining), sum(weights[i] for i in order)
    for i in order:
        if not kept[i] or s <= 0:
            continue
        n = math.ceil(r * weights[i] / s)
        alloc[i] = max(0, min(n, r)) if cap else n
        r -= alloc[i]
        s -= weights[i]
    return alloc


@dataclass(frozen=True)
class RebaseConfig(StrategyConfig):
    softmax_temperature: float = option(0.2, "REBASE/ETS softmax temperature (default 0.2)")

    def __post_init__(self):
        super().__post_init__()
        if not self.softmax_temperature > 0:
            raise ValueError(f"softmax_temperature must be > 0, got {self.softmax_temperature}")


@register
class Rebase(Strategy):
    name = "rebase"
    Config = RebaseConfig

    def select(self, frontier: Frontier):
        scores = [c.score for c in frontier.candidates]
        return rebase_allocate(scores, frontier.remaining, self.config.softmax_temperature), {}
