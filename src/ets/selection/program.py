"""The binary program of SPEC 2.5 as arrays, and its objective.

Indexing: nodes 0..N-1 are the candidates (in the caller's order), N..N+M-1 their distinct
ancestors, root included. `parent[j]` is an index in the same space (-1 for the root). Every
candidate is a leaf (all candidates are at one depth, so none is another's ancestor).

    maximise  sum_i O_i x_i - sum_j cost_j v_j + bonus * |{clusters k : some x_i = 1, i in k}|
    where v_j = x_j for candidates and y_j for ancestors; y_b = OR of the candidates below b;
    sum_i x_i >= 1; optionally sum_j tokens_j v_j <= kv_budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ets.tree import Node

# lambda_c == 0: the reference replaces lambda_c by -1e-4, so every node earns 1e-4 * c instead of
# costing lambda_c * c; that keeps every node, i.e. exactly REBASE.
GUARD = 1e-4


class InfeasibleSelection(ValueError):
    """The program has no feasible selection (only possible with a KV budget)."""


@dataclass(frozen=True)
class SelectionProblem:
    n_cand: int
    parent: np.ndarray  # [N+M] int, -1 for the root
    depth: np.ndarray  # [N+M] int, depth in the search tree
    outcome: np.ndarray  # [N] O_i
    cost: np.ndarray  # [N+M] objective coefficient charged per kept node (negative under the guard)
    cluster: np.ndarray | None  # [N] labels 0..K-1, or None when the coverage term is off
    bonus: float  # lambda_s / K (0 when off)
    tokens: np.ndarray  # [N+M] tokens per node (prompt for the root)
    kv_budget: int | None = None

    @property
    def num_clusters(self) -> int | None:
        return None if self.cluster is None else int(self.cluster.max()) + 1

    def kept_nodes(self, x: np.ndarray) -> np.ndarray:
        """[N+M] bool: the kept candidates and every ancestor of one."""
        kept = np.zeros(len(self.parent), bool)
        cur = np.flatnonzero(x)
        for _ in range(int(self.depth[0]) + 1):  # all candidates share one depth: one level a step
            kept[cur] = True
            cur = self.parent[cur]
        return kept

    def objective(self, x: np.ndarray) -> float:
        x = np.asarray(x, bool)
        kept = self.kept_nodes(x)
        value = float(self.outcome[x].sum()) - float(self.cost[kept].sum())
        if self.cluster is not None:
            value += self.bonus * len(np.unique(self.cluster[x]))
        return value

    def violations(self, x: np.ndarray) -> list[str]:
        """Constraints a selection breaks (y is implied by x, so these are all that can fail)."""
        x = np.asarray(x, bool)
        out = []
        if x.shape != (self.n_cand,):
            out.append(f"selection has shape {x.shape}, expected ({self.n_cand},)")
        elif not x.any():
            out.append("no candidate kept (sum x >= 1)")
        elif self.kv_budget is not None:
            used = int(self.tokens[self.kept_nodes(x)].sum())
            if used > self.kv_budget:
                out.append(f"kept {used} tokens > kv_budget {self.kv_budget}")
        return out


def build_problem(candidates: Sequence[Node], outcome_alloc: Sequence[int],
                  lambda_c: float, lambda_s: float, clusters: Sequence[int] | None,
                  node_cost: str = "nodes", kv_budget: int | None = None) -> SelectionProblem:
    """The program for one depth. `clusters` None (or coverage condition unmet) drops the
    coverage term; node_cost "nodes" is the reference's uniform 1/(M+N), "tokens" charges
    each node its tokens over the total."""
    n = len(candidates)
    index = {c.id: i for i, c in enumerate(candidates)}
    nodes = list(candidates)
    for c in candidates:
        a = c.parent
        while a is not None and a.id not in index:  # a seen node's ancestors are all seen too
            index[a.id] = len(nodes)
            nodes.append(a)
            a = a.parent
    parent = np.array([-1 if v.parent is None else index[v.parent.id] for v in nodes], dtype=np.int64)
    depth = np.array([v.depth for v in nodes], dtype=np.int64)
    tokens = np.array([len(v.token_ids) for v in nodes], dtype=np.float64)
    alloc = np.asarray(outcome_alloc, dtype=float)
    outcome = alloc / alloc.sum() if alloc.sum() > 0 else np.zeros(n)
    if node_cost == "nodes":
        unit = np.full(len(nodes), 1.0 / len(nodes))
    elif node_cost == "tokens":
        unit = tokens / max(tokens.sum(), 1.0)
    else:
        raise ValueError(f"node_cost must be 'nodes' or 'tokens', got {node_cost!r}")
    cost = (lambda_c if lambda_c > 0 else -GUARD) * unit
    cl, bonus = None, 0.0
    if clusters is not None and lambda_s > 0 and n > 1:
        cl = _dense_labels(clusters)
        bonus = lambda_s / (int(cl.max()) + 1)
    return SelectionProblem(n, parent, depth, outcome, cost, cl, bonus, tokens, kv_budget)


def _dense_labels(labels: Sequence[int]) -> np.ndarray:
    _, dense = np.unique(np.asarray(labels), return_inverse=True)
    return dense.astype(np.int64)
