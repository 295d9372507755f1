"""Beam search (SPEC 2.2): top k = ceil(sqrt(remaining)) candidates, ceil(remaining / k) each.

The rule as written can overshoot the width (k * ceil(R / k) > R). Default here: capped, i.e.
the top candidates get ceil(R / k) each in score order until R is used up, so the width budget
is never exceeded. `overshoot=True` keeps the uncapped rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ets.strategies.base import Frontier, Strategy, StrategyConfig, option, register


@dataclass(frozen=True)
class BeamConfig(StrategyConfig):
    overshoot: bool = option(False, "beam: allow overshooting the width (the rule as written)")


@register
class BeamSearch(Strategy):
    name = "beam"
    Config = BeamConfig

    def __init__(self, config, width):
        super().__init__(config, width)
        self.may_overshoot = config.overshoot

    def select(self, frontier: Frontier):
        r = frontier.remaining
        k = math.ceil(math.sqrt(r))
        per = math.ceil(r / k)
        order = sorted(range(len(frontier.candidates)), key=lambda i: -frontier.candidates[i].score)
        alloc = [0] * len(frontier.candidates)
        left = r
        for i in order[:k]:
            n = per if self.config.overshoot else min(per, left)
            alloc[i] = n
            left -= n
        return alloc, {}
