"""ETS (SPEC 2.5): REBASE weights, then an exact binary program that prunes the tree to few
distinct nodes (shared KV) while a coverage term keeps semantically different steps alive,
then REBASE reallocation of the full remaining width among the kept candidates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ets.cluster import cluster_labels, embed_unique, make_embedder
from ets.selection import build_problem, solve
from ets.strategies.base import Frontier, Strategy, StrategyConfig, option, register
from ets.strategies.rebase import rebase_allocate

# The paper's MATH500 lambda_s per width; other widths take the nearest listed width's value.
PAPER_LAMBDA_S = {16: 1.5, 64: 1.4, 256: 1.45}


def paper_lambda_s(width: int) -> float:
    nearest = min(PAPER_LAMBDA_S, key=lambda w: (abs(np.log2(width) - np.log2(w)), w))
    return PAPER_LAMBDA_S[nearest]


@dataclass(frozen=True)
class ETSConfig(StrategyConfig):
    lambda_c: float = option(1.0, "ETS node-cost weight (default 1.0)")
    lambda_s: float = option(1.5, "ETS coverage weight (default: the paper's value for the width)")
    softmax_temperature: float = option(0.2, "REBASE/ETS softmax temperature (default 0.2)")
    cluster_threshold: float = option(0.05, "ETS clustering cut, a cosine distance (default 0.05)")
    # "nodes": uniform 1/(M+N) (reference); "tokens": tokens / total
    node_cost: str = option("nodes", "ETS node cost (default nodes)", choices=("nodes", "tokens"))
    kv_budget: int | None = option(None, "ETS hard cap on kept KV tokens, prompt included (default off)")
    # "auto": tree DP, or fixing + coverage DP, HiGHS past its caps; "milp": HiGHS only (the cross-check)
    solver: str = option("auto", "ETS program solver (default auto)", choices=("auto", "milp"))
    # "minilm" (default, offline) | "hash" (deterministic, no model); the CLI's --embedder sets it
    embedder: str = "minilm"

    @classmethod
    def for_width(cls, width: int, **params):
        params.setdefault("lambda_s", paper_lambda_s(width))
        return super().for_width(width, **params)

    def __post_init__(self):
        super().__post_init__()
        if self.lambda_c < 0 or self.lambda_s < 0:
            raise ValueError(f"lambda_c and lambda_s must be >= 0, got {self.lambda_c}, {self.lambda_s}")
        if not self.softmax_temperature > 0:
            raise ValueError(f"softmax_temperature must be > 0, got {self.softmax_temperature}")
        if not 0 <= self.cluster_threshold <= 2:
            raise ValueError(f"cluster_threshold is a cosine distance in [0, 2], got {self.cluster_threshold}")
        if self.kv_budget is not None and self.kv_budget < 1:
            raise ValueError(f"kv_budget must be a positive number of tokens, got {self.kv_budget}")


def ets_select(scores, candidates, remaining: int, config: ETSConfig, labels) -> tuple[list[int], dict]:
    """One ETS decision given cluster labels (None: coverage term off)."""
    # outcome weights exactly as the reference computes them (uncapped; see rebase_allocate)
    rebase = rebase_allocate(scores, remaining, config.softmax_temperature, cap=False)
    problem = build_problem(candidates, rebase, config.lambda_c, config.lambda_s, labels,
                            config.node_cost, config.kv_budget)
    sol = solve(problem, config.solver)
    alloc = rebase_allocate(scores, remaining, config.softmax_temperature, keep=sol.keep)
    info = {"objective": sol.objective, "solver": sol.solver, "fixed": sol.fixed,
            "num_clusters": problem.num_clusters, "rebase_alloc": rebase, "keep": sol.keep.tolist(),
            "kept_nodes": int(problem.kept_nodes(sol.keep).sum())}
    return alloc, info


@register
class ETS(Strategy):
    name = "ets"
    Config = ETSConfig
    needs_embedder = True

    def __init__(self, config: ETSConfig, width: int, embedder=None):
        super().__init__(config, width)
        self._embedder = embedder

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = make_embedder(self.config.embedder)
        return self._embedder

    def select(self, frontier: Frontier):
        cands = frontier.candidates
        texts = [c.text for c in cands]
        labels = None
        if self.config.lambda_s > 0 and len(cands) > 1 and len(set(texts)) > 1:
            labels = cluster_labels(embed_unique(self.embedder, texts), self.config.cluster_threshold)
        alloc, info = ets_select([c.score for c in cands], cands, frontier.remaining, self.config, labels)
        info["embedder"] = self.embedder.name if labels is not None else None
        info["clusters"] = None if labels is None else labels.tolist()
        return alloc, info
