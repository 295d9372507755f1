"""Exact maximisation over a tree without the coverage term, in O(nodes) numpy work.

Given a value per candidate leaf and a cost per node, the best non-empty set of leaves, paying
every node on the kept paths once, is a bottom-up DP:

    f(leaf) = value(leaf)
    f(b)    = -cost(b) + (sum of positive f(child))  if any child is positive
                         else max f(child)           (b is kept, so at least one child is)

f(root) is the optimum (the root is on every path). Levels are processed deepest first, so each
level is a handful of vectorised calls (bincount / maximum.at) rather than a Python loop.
"""

from __future__ import annotations

import numpy as np


class TreeDP:
    def __init__(self, parent: np.ndarray, depth: np.ndarray, n_leaves: int):
        self.parent, self.n = parent, n_leaves
        self.size = len(parent)
        top = int(depth.max())
        if np.any(depth[:n_leaves] != top):
            raise ValueError("all candidates must be at the same (deepest) depth")
        self.levels = [np.flatnonzero(depth == d) for d in range(top + 1)]
        self.root = int(self.levels[0][0])

    def solve(self, leaf_value: np.ndarray, cost: np.ndarray) -> tuple[float, np.ndarray]:
        """(optimal value, [n_leaves] bool selection). leaf_value may hold -inf (forbidden)."""
        val = np.empty(self.size)
        val[: self.n] = leaf_value - cost[: self.n]
        pos = np.zeros(self.size)
        best = np.full(self.size, -np.inf)
        for d in range(len(self.levels) - 2, -1, -1):
            ch = self.levels[d + 1]
            par = self.parent[ch]
            pos += np.bincount(par, weights=np.maximum(val[ch], 0.0), minlength=self.size)
            np.maximum.at(best, par, val[ch])
            nd = self.levels[d]
            val[nd] = -cost[nd] + np.where(pos[nd] > 0, pos[nd], best[nd])
        root_val = float(val[self.root])
        keep = np.zeros(self.size, bool)
        keep[self.root] = np.isfinite(root_val)
        for d in range(1, len(self.levels)):
            ch = self.levels[d]
            par = self.parent[ch]
            live = keep[par]
            take = live & (pos[par] > 0) & (val[ch] > 0)
            # parents with no positive child keep exactly one child: the first argmax
            argmax = live & (pos[par] <= 0) & (val[ch] == best[par]) & np.isfinite(val[ch])
            if argmax.any():
                idx = np.flatnonzero(argmax)
                _, first = np.unique(par[idx], return_index=True)
                take[idx[first]] = True
            keep[ch] = take
        return root_val, keep[: self.n]
