"""Exact maximisation over a tree without the coverage term, in O(nodes) numpy work.

Given a value per candidate leaf and a cost per node, the best non-empty set of leaves, paying
every node on the kept paths once, is a bottom-up DP:

    f(leaf) = value(leaf) - cost(leaf)
    f(b)    = -cost(b) + (sum of non-negative f(child))  if any child is >= 0
                         else max f(child)               (b is kept, so at least one child is)

Ties go to keeping: a child worth exactly 0 is kept (so ETS with nothing to gain from pruning,
e.g. at depth 1, keeps what REBASE keeps).

f(root) is the optimum (the root is on every path). Invariants the layout relies on: all leaves
(candidates) sit at the deepest level, and every other node has at least one child, so level d
is exactly the set of parents of level d+1. Each level's children are stored sorted by parent,
so one `reduceat` per level gives every parent's max and positive sum.
"""

from __future__ import annotations

import numpy as np


class TreeDP:
    def __init__(self, parent: np.ndarray, depth: np.ndarray, n_leaves: int):
        self.n, self.size = n_leaves, len(parent)
        top = int(depth.max())
        if np.any(depth[:n_leaves] != top):
            raise ValueError("all candidates must be at the same (deepest) depth")
        self.root = int(np.flatnonzero(depth == 0)[0])
        self.levels = []  # per depth 1..top: (children sorted by parent, segment starts, segment parents)
        for d in range(1, top + 1):
            ch = np.flatnonzero(depth == d)
            ch = ch[np.argsort(parent[ch], kind="stable")]
            par = parent[ch]
            starts = np.flatnonzero(np.concatenate(([True], par[1:] != par[:-1])))
            self.levels.append((ch, starts, par[starts], np.diff(np.append(starts, len(ch)))))

    def solve(self, leaf_value: np.ndarray, cost: np.ndarray) -> tuple[float, np.ndarray]:
        """(optimal value, [n_leaves] bool selection). leaf_value may hold -inf (forbidden)."""
        val = np.empty(self.size)
        val[: self.n] = leaf_value - cost[: self.n]
        seg_pos, seg_best = [], []
        for ch, starts, seg_par, _ in reversed(self.levels):
            v = val[ch]
            best = np.maximum.reduceat(v, starts)
            pos = np.add.reduceat(np.maximum(v, 0.0), starts)
            val[seg_par] = -cost[seg_par] + np.where(best >= 0, pos, best)
            seg_pos.append(pos)
            seg_best.append(best)
        root_val = float(val[self.root])
        keep = np.zeros(self.size, bool)
        keep[self.root] = np.isfinite(root_val)
        for (ch, starts, seg_par, lens), pos, best in zip(self.levels, reversed(seg_pos), reversed(seg_best)):
            v = val[ch]
            live = np.repeat(keep[seg_par], lens)
            any_pos = np.repeat(best >= 0, lens)
            take = live & any_pos & (v >= 0)
            # a kept parent with no positive child keeps exactly one child: its first argmax
            is_max = live & ~any_pos & (v == np.repeat(best, lens)) & np.isfinite(v)
            if is_max.any():
                before = np.cumsum(is_max) - is_max  # maxima strictly before each position
                first = is_max & (before == np.repeat(before[starts], lens))
                take |= first
            keep[ch] = take
        return root_val, keep[: self.n]
