"""DVTS, diverse verifier tree search (SPEC 2.3).

m = ceil(sqrt(W)) independent subtrees with budget W // m each. Depth 1 (the root's W children,
in generation order) is split into m contiguous groups; the best unfinished child of each group
roots that subtree. Deeper, each subtree keeps only its best child and expands it by the
subtree's remaining budget, which drops by one for every trajectory of the subtree that
finishes (finished depth-1 children count against their group's subtree)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ets.strategies.base import Frontier, Strategy, StrategyConfig, register


@dataclass(frozen=True)
class DVTSConfig(StrategyConfig):
    pass


@register
class DVTS(Strategy):
    name = "dvts"
    Config = DVTSConfig

    def __init__(self, config, width):
        super().__init__(config, width)
        self.m = math.ceil(math.sqrt(width))
        self.budget = [width // self.m] * self.m
        self.subtree_of: dict[int, int] = {}  # node id -> subtree index

    def _assign_groups(self, frontier: Frontier) -> None:
        nodes = sorted(frontier.candidates + frontier.finished, key=lambda n: n.id)  # generation order
        for pos, node in enumerate(nodes):  # m contiguous groups of near-equal size
            self.subtree_of[node.id] = pos * self.m // len(nodes)

    def select(self, frontier: Frontier):
        if frontier.depth == 1:
            self._assign_groups(frontier)
        else:
            for node in frontier.candidates + frontier.finished:
                self.subtree_of[node.id] = self.subtree_of[node.parent.id]
        for node in frontier.finished:
            self.budget[self.subtree_of[node.id]] -= 1
        best: dict[int, int] = {}  # subtree -> index of its best candidate
        for i, node in enumerate(frontier.candidates):
            j = self.subtree_of[node.id]
            if j not in best or node.score > frontier.candidates[best[j]].score:
                best[j] = i
        alloc = [0] * len(frontier.candidates)
        for j, i in best.items():
            alloc[i] = max(self.budget[j], 0)
        return alloc, {"subtrees": [self.subtree_of[n.id] for n in frontier.candidates]}
