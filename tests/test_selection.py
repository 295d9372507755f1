"""The selection program: exactness of the DP and of variable fixing against HiGHS and brute
force, the token-cost and KV-budget options, and the coverage term."""

import itertools
import random

import numpy as np
import pytest

from ets.selection import InfeasibleSelection, build_problem, fix_variables, solve, solve_milp
from ets.selection.tree_dp import TreeDP
from ets.strategies.rebase import rebase_allocate

from helpers import tree_from_parents


def random_frontier(rng: random.Random, n_leaves: int, depth: int, branching: int = 3):
    """A random tree whose deepest level holds the candidates."""
    parent, level, next_id = {0: None}, [0], 1
    for d in range(depth):
        new = []
        for p in level:
            for _ in range(rng.randint(1, branching)):
                parent[next_id] = p
                new.append(next_id)
                next_id += 1
        level = new
    rng.shuffle(level)
    cands = level[:n_leaves]
    keep_ids = set()
    for c in cands:  # drop branches with no candidate
        j = c
        while j is not None and j not in keep_ids:
            keep_ids.add(j)
            j = parent[j]
    parent = {k: v for k, v in parent.items() if k in keep_ids}
    _, nodes = tree_from_parents(parent, tokens_per_node=1)
    for n in nodes.values():
        n.token_ids = [0] * rng.randint(1, 30)
    return [nodes[c] for c in cands]


def brute_force(problem):
    best = -np.inf
    for bits in itertools.product([0, 1], repeat=problem.n_cand):
        x = np.array(bits, bool)
        if problem.violations(x):
            continue
        best = max(best, problem.objective(x))
    return best


def _random_problem(seed, n=8, clusters=True, **kw):
    rng = random.Random(seed)
    cands = random_frontier(rng, n, rng.randint(1, 4))
    scores = [rng.random() for _ in cands]
    width = rng.choice([4, 8, 16])
    alloc = rebase_allocate(scores, width, 0.2, cap=False)
    labels = [rng.randint(0, max(1, len(cands) // 2)) for _ in cands] if clusters else None
    lam_c = kw.pop("lambda_c", rng.choice([0.0, 0.5, 1.0, 3.0]))
    lam_s = kw.pop("lambda_s", rng.choice([0.0, 0.5, 1.5]))
    return build_problem(cands, alloc, lam_c, lam_s, labels, **kw)


@pytest.mark.parametrize("seed", range(40))
def test_solver_matches_brute_force(seed):
    problem = _random_problem(seed)
    opt = brute_force(problem)
    for sol in (solve(problem), solve_milp(problem)):
        assert problem.violations(sol.keep) == []
        assert sol.objective == pytest.approx(opt, abs=1e-9)


@pytest.mark.parametrize("seed", range(30))
def test_tree_dp_is_exact_without_coverage(seed):
    problem = _random_problem(seed, n=9, clusters=False)
    sol = solve(problem)
    assert sol.solver == "dp"
    assert sol.objective == pytest.approx(brute_force(problem), abs=1e-9)


@pytest.mark.parametrize("seed", range(30))
def test_fixing_never_changes_the_optimum(seed):
    problem = _random_problem(seed, n=40, lambda_c=1.0, lambda_s=1.5)
    f_in, f_out = fix_variables(problem)
    assert not (f_in & f_out).any()
    fixed = solve_milp(problem, f_in, f_out)
    free = solve_milp(problem)
    assert fixed.objective == pytest.approx(free.objective, abs=1e-9)


def test_dp_keeps_one_child_when_none_pays():
    # root -> a -> {c1, c2}; tiny weights, big cost: the best is one cheapest candidate.
    _, nodes = tree_from_parents({0: None, 1: 0, 2: 1, 3: 1})
    cands = [nodes[2], nodes[3]]
    p = build_problem(cands, [2, 2], lambda_c=10.0, lambda_s=0.0, clusters=None)
    value, keep = TreeDP(p.parent, p.depth, p.n_cand).solve(p.outcome, p.cost)
    assert keep.sum() == 1
    assert value == pytest.approx(0.5 - 10.0 * 3 / 4)


def test_token_cost_prunes_the_long_branch():
    # two equal-score candidates: one under a 200-token step, one under a 5-token step
    _, nodes = tree_from_parents({0: None, 1: 0, 2: 0, 3: 1, 4: 2})
    nodes[1].token_ids = [0] * 200
    nodes[2].token_ids = [0] * 5
    cands = [nodes[3], nodes[4]]
    per_node = build_problem(cands, [4, 4], 1.0, 0.0, None, node_cost="nodes")
    per_token = build_problem(cands, [4, 4], 1.0, 0.0, None, node_cost="tokens")
    assert solve(per_node).keep.tolist() == [True, True]  # 0.5 > 2/5 for each branch
    assert solve(per_token).keep.tolist() == [False, True]


def test_kv_budget_is_a_hard_cap():
    rng = random.Random(3)
    cands = random_frontier(rng, 12, 3)
    scores = [rng.random() for _ in cands]
    alloc = rebase_allocate(scores, 16, 0.5, cap=False)
    free = build_problem(cands, alloc, 0.0, 0.0, None)
    full = int(free.tokens[free.kept_nodes(solve(free).keep)].sum())
    budget = full // 2
    p = build_problem(cands, alloc, 0.0, 0.0, None, kv_budget=budget)
    sol = solve(p)
    assert p.violations(sol.keep) == []
    assert p.tokens[p.kept_nodes(sol.keep)].sum() <= budget


def test_infeasible_kv_budget_names_the_fix():
    _, nodes = tree_from_parents({0: None, 1: 0, 2: 1})
    p = build_problem([nodes[2]], [4], 1.0, 0.0, None, kv_budget=1)
    with pytest.raises(InfeasibleSelection, match=r"Raise --kv-budget to at least 3"):
        solve(p)


def test_larger_lambda_s_keeps_more_clusters():
    rng = random.Random(7)
    kept = []
    cands = random_frontier(rng, 30, 4)
    scores = [rng.random() for _ in cands]
    labels = [i % 10 for i in range(len(cands))]
    alloc = rebase_allocate(scores, 32, 0.2, cap=False)
    for lam_s in (0.0, 0.5, 1.5, 5.0):
        p = build_problem(cands, alloc, 1.0, lam_s, labels)
        keep = solve(p).keep
        kept.append(len(set(np.array(labels)[keep])))
    assert kept == sorted(kept) and kept[-1] > kept[0]


def test_objective_counts_each_cluster_once():
    _, nodes = tree_from_parents({0: None, 1: 0, 2: 0})
    p = build_problem([nodes[1], nodes[2]], [1, 1], 1.0, 1.0, [0, 0])
    both = p.objective(np.array([True, True]))
    assert both == pytest.approx(1.0 - 3 / 3 + 1.0)


# --- the coverage DP (selection/coverage.py) against brute force and HiGHS -------------------

def _coverage_problem(seed, n):
    rng = random.Random(1000 + seed)
    cands = random_frontier(rng, n, rng.randint(1, 5), branching=rng.choice([2, 3, 4]))
    scores = [rng.random() ** rng.choice([1, 4]) for _ in cands]
    alloc = rebase_allocate(scores, rng.choice([4, 8, 16, 64]), rng.choice([0.2, 1.0]), cap=False)
    labels = [rng.randint(0, rng.choice([1, 3, max(1, len(cands) // 2)])) for _ in cands]
    lam_c = rng.choice([0.3, 1.0, 3.0, 10.0])
    lam_s = rng.choice([0.2, 1.5, 5.0])
    return build_problem(cands, alloc, lam_c, lam_s, labels, node_cost=rng.choice(["nodes", "tokens"]))


@pytest.mark.parametrize("seed", range(60))
def test_coverage_dp_matches_brute_force_and_highs(seed):
    problem = _coverage_problem(seed, n=11)
    opt = brute_force(problem)
    sol = solve(problem)
    assert sol.solver == ("cover" if problem.cluster is not None else "dp")
    assert problem.violations(sol.keep) == []
    assert sol.objective == pytest.approx(opt, abs=1e-9)
    assert solve_milp(problem).objective == pytest.approx(opt, abs=1e-9)


def test_coverage_dp_covers_the_empty_fixing():
    # nothing pays for its own path (F empty): the DP must still keep at least one candidate
    seen = 0
    for seed in range(200):
        problem = _coverage_problem(seed, n=9)
        if fix_variables(problem)[0].any():
            continue
        seen += 1
        sol = solve(problem)
        assert problem.violations(sol.keep) == []
        assert sol.objective == pytest.approx(brute_force(problem), abs=1e-9)
    assert seen >= 5


@pytest.mark.parametrize("seed", range(20))
def test_coverage_dp_matches_highs_on_larger_trees(seed):
    problem = _coverage_problem(seed, n=60)
    sol = solve(problem)
    assert problem.violations(sol.keep) == []
    assert sol.objective == pytest.approx(solve_milp(problem).objective, abs=1e-9)


@pytest.mark.parametrize("seed", range(40))
def test_cluster_fixing_never_changes_the_optimum(seed):
    problem = _coverage_problem(seed, n=30)
    f_in, f_out = fix_variables(problem)
    assert not (f_in & f_out).any()
    assert solve_milp(problem, f_in, f_out).objective == pytest.approx(
        solve_milp(problem).objective, abs=1e-9)


def test_coverage_dp_falls_back_to_highs_when_tables_grow(monkeypatch):
    import ets.selection.coverage as coverage
    monkeypatch.setattr(coverage, "MAX_PAIRS", 1)
    monkeypatch.setattr(coverage, "MAX_CELLS", 0)
    problem = _coverage_problem(3, n=40)
    sol = solve(problem)
    assert sol.solver == "milp"
    assert sol.objective == pytest.approx(solve_milp(problem).objective, abs=1e-9)


@pytest.mark.parametrize("seed", range(40))
def test_mask_merge_of_tops_matches_brute_force(seed):
    from ets.selection.coverage import _merge_by_mask

    rng = random.Random(seed)
    bits = rng.randint(1, 6)
    nonempty = (1 << bits) if rng.random() < 0.3 else 0
    tabs = []
    for _ in range(rng.randint(1, 4)):
        tab = {0: 0.0} if rng.random() < 0.7 else {}
        for _ in range(rng.randint(1, 4)):
            tab[rng.randrange(1 << bits) | nonempty] = rng.uniform(-1, 1)
        tabs.append(tab)
    g = rng.choice([0.1, 0.5, 2.0])

    def score(masks):
        m = 0
        for x in masks:
            m |= x
        if nonempty and not m & nonempty:
            return -np.inf
        return sum(t[x] for t, x in zip(tabs, masks)) + g * (m & ~nonempty).bit_count()

    best = max(score(c) for c in itertools.product(*[list(t) for t in tabs]))
    chosen = _merge_by_mask(tabs, g, nonempty)
    assert all(m in t for t, m in zip(tabs, chosen))
    assert score(chosen) == pytest.approx(best, abs=1e-12)


def _mock_frontier_problem(width, seed):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from frontiers import grow_frontier
    from ets.strategies.ets import ETSConfig

    frontier, labels = grow_frontier(width, 6, seed)
    cands = frontier.candidates
    config = ETSConfig.for_width(width)
    alloc = rebase_allocate([c.score for c in cands], frontier.remaining, config.softmax_temperature, cap=False)
    return build_problem(cands, alloc, config.lambda_c, config.lambda_s, labels)


@pytest.mark.parametrize("width,seed", [(64, s) for s in range(12)] + [(256, s) for s in (0, 3, 6)])
def test_solver_matches_highs_on_mock_frontiers(width, seed):
    # clusters span the whole tree here (group-Steiner-like); (256, 6) needs the HiGHS fallback
    problem = _mock_frontier_problem(width, seed)
    sol = solve(problem)
    assert problem.violations(sol.keep) == []
    assert sol.objective == pytest.approx(solve_milp(problem).objective, abs=1e-9)
    if width == 64:
        assert sol.solver == "cover"


@pytest.mark.parametrize("seed", range(5))
def test_guard_with_coverage_keeps_everything(seed):
    # lambda_c == 0: every node earns the guard's 1e-4 * c, so keeping every candidate is optimal
    problem = _random_problem(seed, n=10, lambda_c=0.0, lambda_s=1.5)
    if problem.cluster is None:
        return
    sol = solve(problem)
    assert sol.solver == "all" and sol.keep.all()
    assert sol.objective == pytest.approx(solve_milp(problem).objective, abs=1e-9)
