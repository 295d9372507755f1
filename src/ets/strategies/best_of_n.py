"""Best-of-N (SPEC 2.4): W independent samples, each continued until it finishes; no pruning."""

from __future__ import annotations

from dataclasses import dataclass

from ets.strategies.base import Frontier, Strategy, StrategyConfig, register


@dataclass(frozen=True)
class BestOfNConfig(StrategyConfig):
    pass


@register
class BestOfN(Strategy):
    name = "best_of_n"
    Config = BestOfNConfig

    def select(self, frontier: Frontier):
        # Every unfinished sample continues by one step. Invariant: the candidates are exactly
        # the unfinished samples, so len(candidates) == remaining.
        return [1] * len(frontier.candidates), {}
