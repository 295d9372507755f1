"""Exact coverage-term solver after variable fixing: a tree DP over sets of covered clusters.

After `fix_variables`, the fixed-in candidates F pay for their paths (P(F)) and cover their
clusters. What is left decomposes:
- the free candidates hang off P(F) in small unpaid subtrees ("tops": unpaid nodes whose parent
  is paid; when F is empty the root itself is the one top);
- only clusters not covered by F ("open" clusters) still earn the bonus g;
- two tops interact only through an open cluster they share, so tops linked by shared open
  clusters form a component, and components are solved independently.

Within a subtree the DP keeps, per node v, a table G_v: mask -> best value, where mask is the
exact set of open clusters covered by the kept candidates below v and value is their outcome
minus the cost of every kept node below v, v included. A node's table is the (OR, +)
product of its children's tables, each child optional (mask 0, value 0). Only Pareto states are
kept: (m, v) is dropped when some (m', v') has m' a superset of m and v' >= v, since every
completion of the first is matched by the same completion of the second. A component's optimum
is max over its masks of value + g * |mask|.

Exact as long as every node cost is >= 0 (checked by the caller). The table size is 2^(open
clusters in the subtree) at worst; past `max_states` the DP gives up (returns None) and the
caller falls back to HiGHS, so correctness never depends on the tables staying small.
"""

from __future__ import annotations

import numpy as np

from ets.selection.program import SelectionProblem

MAX_STATES = 512


class TooManyStates(Exception):
    pass


def _pareto(table: dict[int, float]) -> dict[int, float]:
    """Drop states dominated by a superset mask with at least the same value."""
    if len(table) <= 1:
        return table
    order = sorted(table.items(), key=lambda mv: (-mv[1], -bin(mv[0]).count("1")))
    kept: list[tuple[int, float]] = []
    for m, v in order:
        if not any(km & m == m for km, _ in kept):
            kept.append((m, v))
    return dict(kept)


def _product(a: dict[int, float], b: dict[int, float], max_states: int):
    """(OR, +) product of two tables, with a back pointer per resulting mask."""
    out: dict[int, float] = {}
    back: dict[int, tuple[int, int]] = {}
    for ma, va in a.items():
        for mb, vb in b.items():
            m, v = ma | mb, va + vb
            if v > out.get(m, -np.inf):
                out[m], back[m] = v, (ma, mb)
    if len(out) > max_states:
        raise TooManyStates
    return _pareto(out), back


def solve_open(p: SelectionProblem, f_in: np.ndarray, f_out: np.ndarray, paths: np.ndarray,
               max_states: int | None = None) -> np.ndarray | None:
    """[N] bool optimal selection given the fixing (f_in kept, f_out dropped), or None when a
    table outgrows max_states (default MAX_STATES). Needs p.cost >= 0 and the coverage term on."""
    max_states = MAX_STATES if max_states is None else max_states
    n = p.n_cand
    cl, g = p.cluster, p.bonus
    paid = np.zeros(len(p.parent), bool)
    paid[paths[f_in].ravel()] = True
    covered = np.zeros(int(cl.max()) + 1, bool)
    covered[cl[f_in]] = True
    free = np.flatnonzero(~f_in & ~f_out)
    keep = f_in.copy()
    if not len(free):
        return keep
    open_k = np.unique(cl[free][~covered[cl[free]]])
    bit = {int(k): 1 << b for b, k in enumerate(open_k)}
    # F empty: the root is unpaid and some candidate must be kept; a pseudo-cluster bit that
    # every candidate sets (and the optimum must contain) enforces sum x >= 1
    nonempty = (1 << len(open_k)) if not f_in.any() else 0

    # the unpaid forest: children of every unpaid node on a free candidate's path
    sub = paths[free]
    unpaid = ~paid[sub]
    children: dict[int, list[int]] = {}
    tops: list[int] = []
    depth_of: dict[int, int] = {}
    for r in range(len(free)):
        row, up = sub[r], unpaid[r]
        for d in range(len(row) - 1, -1, -1):
            j = int(row[d])
            if not up[d] or j in depth_of:
                break  # the rest of the path is paid or already recorded
            depth_of[j] = d
            if d == 0 or not up[d - 1]:
                tops.append(j)
            else:
                children.setdefault(int(row[d - 1]), []).append(j)

    try:
        return _solve_tables(p, free, keep, bit, nonempty, children, tops, depth_of, max_states)
    except TooManyStates:
        return None


def _solve_tables(p, free, keep, bit, nonempty, children, tops, depth_of, max_states):
    n, cl, g = p.n_cand, p.cluster, p.bonus
    table: dict[int, dict[int, float]] = {}
    backs: dict[int, list] = {}
    empty_wins: dict[int, bool] = {}
    outcome, cost = p.outcome, p.cost

    def optional(j):
        """G_j with the 'not kept' option at mask 0 (ties go to keeping)."""
        t = table[j]
        if t.get(0, -np.inf) >= 0.0:
            empty_wins[j] = False
            return t
        empty_wins[j] = True
        t = dict(t)
        t[0] = 0.0
        return t

    for j in sorted(depth_of, key=depth_of.get, reverse=True):  # children before parents
        if j < n:
            m = bit.get(int(cl[j]), 0) | nonempty
            table[j] = {m: float(outcome[j] - cost[j])}
            continue
        acc, chain = {0: 0.0}, []
        for c in children[j]:
            acc, back = _product(acc, optional(c), max_states)
            chain.append((c, back))
        table[j] = {m: v - float(cost[j]) for m, v in acc.items()}
        backs[j] = chain

    def take(j, m):
        """Keep the candidates below j that realise mask m of table[j]."""
        if j < n:
            keep[j] = True
            return
        for c, back in reversed(backs[j]):
            m, mc = back[m]
            if mc != 0 or not empty_wins[c]:
                take(c, mc)

    # components: tops linked by a shared open cluster (union-find over tops)
    top_mask = {}
    for t in tops:
        mm = 0
        for m in table[t]:
            mm |= m
        top_mask[t] = mm & ~nonempty
    group = list(range(len(tops)))

    def find(a):
        while group[a] != a:
            group[a] = group[group[a]]
            a = group[a]
        return a

    owner: dict[int, int] = {}
    for a, t in enumerate(tops):
        mm = top_mask[t]
        while mm:
            low = mm & -mm
            mm ^= low
            if low in owner:
                group[find(a)] = find(owner[low])
            else:
                owner[low] = a
    comps: dict[int, list[int]] = {}
    for a, t in enumerate(tops):
        comps.setdefault(find(a), []).append(t)

    for members in comps.values():
        acc, chain = {0: 0.0}, []
        for t in members:
            acc, back = _product(acc, optional(t), max_states)
            chain.append((t, back))
        best_m, best_v = None, -np.inf
        for m, v in acc.items():
            if nonempty and not m & nonempty:
                continue
            score = v + g * bin(m & ~nonempty).count("1")
            if score > best_v:
                best_m, best_v = m, score
        m = best_m
        for t, back in reversed(chain):
            m, mt = back[m]
            if mt != 0 or not empty_wins[t]:
                take(t, mt)
    return keep
