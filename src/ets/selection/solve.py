"""Solve the selection program exactly, in-process.

Default ("auto"): without a KV budget, the tree DP (selection/tree_dp.py) is exact when the
coverage term is off; with it on, a branch and bound whose bound is the DP in which every
candidate of a not-yet-covered cluster earns the whole cluster bonus (an over-count, so an upper
bound; it is exact when no cluster has two kept members). It branches on one over-counted
member (kept / not kept) and falls back to HiGHS if it ever needs more than `node_limit` nodes.
With a KV budget (a knapsack across the tree) the program goes to HiGHS (scipy.optimize.milp).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from ets.selection.program import InfeasibleSelection, SelectionProblem
from ets.selection.tree_dp import TreeDP

EPS = 1e-12
BIG = 1e3  # added to forced-in leaves; objective values are O(1)


@dataclass(frozen=True)
class Solution:
    keep: np.ndarray  # [N] bool
    objective: float
    solver: str  # "dp" | "bnb" | "milp"
    nodes: int = 1  # branch-and-bound nodes (or 1)


def solve(p: SelectionProblem, method: str = "auto", node_limit: int = 5000) -> Solution:
    if method not in ("auto", "exact", "milp"):
        raise ValueError(f"method must be auto, exact or milp, got {method!r}")
    if method == "milp" or p.kv_budget is not None:
        if method == "exact":
            raise ValueError("the exact tree algorithm does not handle a KV budget; use auto or milp")
        return solve_milp(p)
    sol = solve_exact(p, node_limit)
    if sol is None:
        if method == "exact":
            raise RuntimeError(f"branch and bound needed more than {node_limit} nodes")
        return solve_milp(p)
    return sol


def solve_exact(p: SelectionProblem, node_limit: int = 5000) -> Solution | None:
    n = p.n_cand
    dp = TreeDP(p.parent, p.depth, n)
    base = p.outcome.astype(float)
    if p.cluster is None or p.bonus == 0.0:
        value, keep = dp.solve(base, p.cost)
        return Solution(keep, value, "dp")
    g, cl, k_num = p.bonus, p.cluster, int(p.cluster.max()) + 1
    best_val, best_keep, visited = -np.inf, None, 0
    stack = [(np.zeros(n, bool), np.zeros(n, bool))]  # (forced in, forced out)
    while stack:
        f_in, f_out = stack.pop()
        visited += 1
        if visited > node_limit:
            return None
        covered = np.zeros(k_num, bool)
        covered[cl[f_in]] = True
        leaf = base + np.where(covered[cl], 0.0, g)
        leaf[f_in] += BIG
        leaf[f_out] = -np.inf
        value, keep = dp.solve(leaf, p.cost)
        if not np.isfinite(value):
            continue
        bound = value - BIG * f_in.sum() + g * covered.sum()
        if bound <= best_val + EPS:
            continue
        counts = np.bincount(cl[keep], minlength=k_num)
        over = np.where(covered, 0, np.maximum(counts - 1, 0))
        true_val = bound - g * over.sum()
        if true_val > best_val + EPS:
            best_val, best_keep = true_val, keep
        if over.sum() == 0:
            continue  # the bound is attained here
        k = int(np.argmax(over))
        members = np.flatnonzero(keep & (cl == k) & ~f_in)
        j = int(members[np.argmax(leaf[members])])
        f_in2, f_out2 = f_in.copy(), f_out.copy()
        f_in2[j], f_out2[j] = True, True
        stack.append((f_in, f_out2))
        stack.append((f_in2, f_out))  # depth-first, "keep it" first
    return Solution(best_keep, float(best_val), "bnb", visited)


def solve_milp(p: SelectionProblem) -> Solution:
    """The program as written (SPEC 2.5), solved by HiGHS. Variables: v (one per node, x for
    candidates, y for ancestors), then z (one per cluster)."""
    n_nodes, n = len(p.parent), p.n_cand
    k_num = p.num_clusters or 0
    nv = n_nodes + k_num
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def row(entries, lower, upper):
        nonlocal r
        for c, v in entries:
            rows.append(r), cols.append(c), vals.append(v)
        lo.append(lower), hi.append(upper)
        r += 1

    children: dict[int, list[int]] = {}
    for j in range(n_nodes):
        par = int(p.parent[j])
        if par >= 0:
            row([(par, 1.0), (j, -1.0)], 0, np.inf)  # y_parent >= v_j (so y_b >= x_i below b)
            children.setdefault(par, []).append(j)
    for b, ch in children.items():  # y_b <= sum of children (so y_b <= sum of x below b)
        row([(b, -1.0)] + [(c, 1.0) for c in ch], 0, np.inf)
    for k in range(k_num):  # z_k <= sum_{i in k} x_i
        row([(n_nodes + k, -1.0)] + [(int(i), 1.0) for i in np.flatnonzero(p.cluster == k)], 0, np.inf)
    row([(i, 1.0) for i in range(n)], 1, np.inf)  # sum x >= 1
    if p.kv_budget is not None:
        row([(j, float(p.tokens[j])) for j in range(n_nodes)], -np.inf, float(p.kv_budget))
    a = coo_matrix((vals, (rows, cols)), shape=(r, nv)).tocsr()
    c = np.concatenate([p.cost.copy(), np.full(k_num, -p.bonus)])
    c[:n] -= p.outcome
    res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=np.ones(nv),
               bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.status == 2 or res.x is None:
        if p.kv_budget is not None:
            need = min_path_tokens(p)
            raise InfeasibleSelection(
                f"KV budget {p.kv_budget} tokens is infeasible: the cheapest single trajectory "
                f"already holds {need} tokens (prompt included). Raise --kv-budget to at least {need} "
                "or drop it.")
        raise InfeasibleSelection(f"selection program infeasible: {res.message}")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the selection program: {res.message}")
    keep = res.x[:n] > 0.5
    return Solution(keep, p.objective(keep), "milp")


def min_path_tokens(p: SelectionProblem) -> int:
    best = None
    for i in range(p.n_cand):
        total, j = 0.0, i
        while j >= 0:
            total += p.tokens[j]
            j = int(p.parent[j])
        best = total if best is None else min(best, total)
    return int(best or 0)
