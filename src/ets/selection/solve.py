"""Solve the selection program exactly, in-process.

- Coverage term off, no KV budget: the tree DP (selection/tree_dp.py), exact, O(nodes).
- Coverage term on: exact variable fixing (`fix_variables`), then the DP over sets of covered
  clusters on what fixing left (selection/coverage.py, "cover"); when its tables outgrow their
  caps, HiGHS (scipy.optimize.milp, mip_rel_gap 0) on the program with the fixed candidates'
  bounds pinned. Under the lambda_c == 0 guard (every node cost < 0) keeping all is optimal.
- KV budget: HiGHS.
A KV budget makes the program a knapsack across the tree; an infeasible budget raises
InfeasibleSelection naming the smallest budget that would do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from ets.selection.coverage import common_chain, solve_open
from ets.selection.program import InfeasibleSelection, SelectionProblem
from ets.selection.tree_dp import TreeDP


@dataclass(frozen=True)
class Solution:
    keep: np.ndarray  # [N] bool
    objective: float
    solver: str  # "dp" | "cover" | "all" | "milp"
    fixed: int = 0  # candidates decided by fix_variables before the search


def solve(p: SelectionProblem, method: str = "auto") -> Solution:
    """method "auto" (tree DP without coverage; else fixing, then the coverage DP, then HiGHS if
    the DP gives up) or "milp" (HiGHS on the program as written, no fixing: the cross-check).
    Either way the objective is the exact optimum; `solver` names the path that found it."""
    if method not in ("auto", "milp"):
        raise ValueError(f"method must be 'auto' or 'milp', got {method!r}")
    if method == "auto" and p.kv_budget is None and (p.cluster is None or p.bonus == 0.0):
        value, keep = TreeDP(p.parent, p.depth, p.n_cand).solve(p.outcome.astype(float), p.cost)
        return Solution(keep, value, "dp")
    if method == "auto" and p.kv_budget is None:
        if np.all(p.cost <= 0):
            # the lambda_c == 0 guard: every term grows with x, so keeping everything is optimal
            keep = np.ones(p.n_cand, bool)
            return Solution(keep, p.objective(keep), "all")
        f_in, f_out = fix_variables(p)
        keep = solve_open(p, f_in, f_out, candidate_paths(p))
        if keep is not None:
            return Solution(keep, p.objective(keep), "cover", int(f_in.sum() + f_out.sum()))
        return solve_milp(p, f_in, f_out)
    return solve_milp(p)


def candidate_paths(p: SelectionProblem) -> np.ndarray:
    """[N, depth + 1] node indices root..candidate (all candidates share one depth)."""
    depth = int(p.depth[0])
    paths = np.empty((p.n_cand, depth + 1), np.int64)
    cur = np.arange(p.n_cand)
    for d in range(depth, -1, -1):
        paths[:, d] = cur
        cur = p.parent[cur]
    return paths


def _starts(sorted_keys: np.ndarray) -> np.ndarray:
    """bool per position: the first of its run of equal keys (np.r_ is slow for this)."""
    out = np.ones(len(sorted_keys), bool)
    out[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return out


def fix_variables(p: SelectionProblem) -> tuple[np.ndarray, np.ndarray]:
    """Candidates in (out of) some optimal selection, decided before the solver runs.

    Needs every node cost >= 0 (not the lambda_c == 0 guard, where nothing is fixed). F = fixed
    in, P(F) = their path nodes plus the common chain (the nodes on every candidate's path, kept
    by every feasible selection); until nothing changes:
    - in:  O_i >= cost of i's path outside P(F): adding i to any optimum containing F loses
           nothing, so some optimum contains i (ties go to keeping, as in the DP);
    - out: F is not empty, i's cluster is covered by F (or there is no coverage term) and
           O_i <= cost_i (its own leaf, never shared): adding i never helps;
    - out: zero weight and a same-parent, same-cluster twin with a leaf as cheap: swapping to
           the cheaper twin, or dropping the dearer one, never hurts, so only the cheapest
           (first on ties) of each such group stays free;
    and per cluster k not covered by F, with net_i = O_i - (cost of i's path outside P(F)),
    leaf_i = O_i - cost_i and t the free member of k with the largest net:
    - out: a free j != t with leaf_j <= 0 and leaf_j <= net_t: in an optimum holding j, either
           t is there too (drop j: loses O_j, saves cost_j, keeps k covered) or swap j for t
           (gains >= net_t - leaf_j >= 0, k stays covered);
    - in:  t, when net_t + g >= 0 and leaf_j <= net_t for every other free j in k: an optimum
           without t either misses k (add t: gains >= net_t + g) or holds some j of k (swap).
    Each rule only needs F to be inside the optimum it rewrites, so applying them one after
    another, each to the problem the earlier ones left, keeps an optimum."""
    n = p.n_cand
    f_in, f_out = np.zeros(n, bool), np.zeros(n, bool)
    if np.any(p.cost < 0):
        return f_in, f_out
    cl = p.cluster if p.cluster is not None else np.zeros(n, np.int64)
    k_num = int(cl.max()) + 1
    zero = np.flatnonzero(p.outcome == 0)
    if len(zero):
        group = p.parent[zero] * k_num + cl[zero]
        zero = zero[np.lexsort((p.cost[zero], group))]  # per twin group, cheapest leaf first
        group = p.parent[zero] * k_num + cl[zero]
        first = _starts(group)
        f_out[zero[~first]] = True
    paths = candidate_paths(p)
    path_cost = p.cost[paths]
    kept = np.zeros(len(p.parent), bool)
    kept[common_chain(paths)] = True  # kept by every feasible selection: already paid for
    covered = np.zeros(k_num, bool) if p.cluster is not None else np.ones(k_num, bool)
    by_cluster = p.cluster is not None and p.bonus > 0
    while True:
        free = np.flatnonzero(~f_in & ~f_out)
        net = p.outcome[free] - (path_cost[free] * ~kept[paths[free]]).sum(axis=1)
        new_in = free[net >= 0]
        if len(new_in):
            f_in[new_in] = True
            kept[paths[new_in].ravel()] = True
            covered[cl[new_in]] = True
        # (F non-empty: dropping i must leave some candidate kept)
        new_out = ~f_in & ~f_out & covered[cl] & (p.outcome <= p.cost[:n]) & f_in.any()
        f_out |= new_out
        grew = len(new_in) > 0
        if by_cluster:
            # net from before this step's fixing in: never above the current one, so still sound
            grew |= _fix_by_cluster(p, free, net, paths, f_in, f_out, kept, covered)
        if not grew:
            # Nothing fixed in: P(F) and the covered clusters are as they were, so net, the
            # covered-cluster rule and each cluster's champion and rivals (the members fixed
            # out this round were already left out of them) are too: a fixed point.
            return f_in, f_out


def _fix_by_cluster(p: SelectionProblem, free: np.ndarray, net: np.ndarray, paths: np.ndarray,
                    f_in: np.ndarray, f_out: np.ndarray, kept: np.ndarray, covered: np.ndarray) -> bool:
    """The per-cluster rules of fix_variables, once, given a lower bound `net` on net_i for the
    candidates `free`; updates the arrays in place, True if any candidate was fixed in."""
    cl = p.cluster
    sel = ~f_in[free] & ~f_out[free] & ~covered[cl[free]]
    idx, net = free[sel], net[sel]
    if not len(idx):
        return False
    order = np.lexsort((-net, cl[idx]))  # by cluster, largest net first
    idx, net = idx[order], net[order]
    leaf = p.outcome[idx] - p.cost[idx]
    k = cl[idx]
    champ = _starts(k)
    champ_net = net[champ][np.cumsum(champ) - 1]  # per member: its cluster's champion's net
    out = ~champ & (leaf <= 0) & (leaf <= champ_net)
    rest = ~champ & ~out
    rival = np.full(len(covered), -np.inf)  # per cluster: best leaf_j among the other free members
    np.maximum.at(rival, k[rest], leaf[rest])
    win = champ & (net + p.bonus >= 0) & (rival[k] <= net)
    f_out[idx[out]] = True
    new_in = idx[win]
    f_in[new_in] = True
    kept[paths[new_in].ravel()] = True
    covered[k[win]] = True
    return bool(win.any())


def solve_milp(p: SelectionProblem, fixed_in: np.ndarray | None = None,
               fixed_out: np.ndarray | None = None) -> Solution:
    """The program as written (SPEC 2.5), solved by HiGHS. Variables: v (one per node: x for
    candidates, y for ancestors), then z (one per cluster). y_b >= x_i below b is written as
    y_parent >= v_child along every edge, and y_b <= sum of x below b as y_b <= sum of its
    children: equivalent for binaries, and far fewer rows."""
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
            row([(par, 1.0), (j, -1.0)], 0, np.inf)
            children.setdefault(par, []).append(j)
    for b, ch in children.items():
        row([(b, -1.0)] + [(c, 1.0) for c in ch], 0, np.inf)
    for k in range(k_num):  # z_k <= sum_{i in k} x_i
        row([(n_nodes + k, -1.0)] + [(int(i), 1.0) for i in np.flatnonzero(p.cluster == k)], 0, np.inf)
    row([(i, 1.0) for i in range(n)], 1, np.inf)  # sum x >= 1
    if p.kv_budget is not None:
        row([(j, float(p.tokens[j])) for j in range(n_nodes)], -np.inf, float(p.kv_budget))
    a = coo_matrix((vals, (rows, cols)), shape=(r, nv)).tocsr()
    c = np.concatenate([p.cost.copy(), np.full(k_num, -p.bonus)])
    c[:n] -= p.outcome
    lb, ub = np.zeros(nv), np.ones(nv)
    if fixed_in is not None:
        lb[:n][fixed_in] = 1.0
        ub[:n][fixed_out] = 0.0
    res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=np.ones(nv),
               bounds=Bounds(lb, ub), options={"mip_rel_gap": 0.0})
    if res.x is None:
        if p.kv_budget is not None:
            need = min_path_tokens(p)
            raise InfeasibleSelection(
                f"KV budget {p.kv_budget} tokens is infeasible: the cheapest single trajectory "
                f"already holds {need} tokens (prompt included). Raise --kv-budget to at least "
                f"{need}, or drop it.")
        raise InfeasibleSelection(f"selection program infeasible: {res.message}")
    keep = res.x[:n] > 0.5
    fixed = 0 if fixed_in is None else int(fixed_in.sum() + fixed_out.sum())
    return Solution(keep, p.objective(keep), "milp", fixed)


def min_path_tokens(p: SelectionProblem) -> int:
    return int(p.tokens[candidate_paths(p)].sum(axis=1).min())
