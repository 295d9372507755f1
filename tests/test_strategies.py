"""Strategy behaviour over whole mock searches (SPEC section 2)."""

import asyncio
import math

import pytest

from ets.config import SearchConfig
from ets.engines.mock import MockPolicy
from ets.prm.base import PRMError
from ets.prm.mock import MockPRM
from ets.search import StepDelimiterError, search
from ets.strategies import STRATEGIES, Frontier, build_strategy
from ets.strategies.ets import ETSConfig, ets_select, paper_lambda_s
from ets.strategies.rebase import rebase_allocate

from helpers import run_mock, tree_from_parents

ALL = ["best_of_n", "beam", "dvts", "rebase", "ets", "particle_filter"]


def test_registry_has_the_five():
    assert set(ALL) <= set(STRATEGIES)


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("width", [1, 3, 4, 9, 16, 30])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_width_budget_never_exceeded(strategy, width, seed):
    """Every depth: children allocated <= width left; over the search: trajectories <= W.
    Beam search's rule is capped by default (top candidates get ceil(R/k) until R is used)."""
    result, _ = run_mock(strategy, width, seed)
    for t in result.trace:
        assert sum(t.alloc) <= t.remaining
    finished = [n for n in result.tree.nodes if n.finish in ("answer", "cap")]
    assert len(finished) <= width
    assert len(result.tree.at_depth(1)) == width  # depth 0: the whole width from the root


def test_beam_overshoot_option_keeps_the_uncapped_rule():
    result, _ = run_mock("beam", 10, seed=0, overshoot=True)
    later = [t for t in result.trace if t.depth >= 1]
    r = later[0].remaining
    k = math.ceil(math.sqrt(r))
    assert sorted(later[0].alloc, reverse=True)[:k] == [math.ceil(r / k)] * min(k, len(later[0].alloc))


def _tree_signature(result):
    return [(n.id, n.parent.id if n.parent else None, tuple(n.token_ids), n.alloc) for n in result.tree.nodes]


@pytest.mark.parametrize("seed", range(4))
def test_ets_equals_rebase_without_penalties(seed):
    ets, _ = run_mock("ets", 16, seed, lambda_c=0.0, lambda_s=0.0)
    rebase, _ = run_mock("rebase", 16, seed)
    assert _tree_signature(ets) == _tree_signature(rebase)


@pytest.mark.parametrize("seed", range(6))
def test_ets_equals_rebase_at_depth_one(seed):
    """All depth-1 candidates share only the root, so pruning saves nothing there: ETS keeps
    exactly the candidates REBASE gives children to (with coverage on, possibly more: never
    fewer). The counts then differ only because the reallocation (SPEC 2.5 step 5) runs over
    the kept candidates, so pruned zero-weight ones no longer dilute the running sum."""
    for lam_s, same in ((0.0, True), (None, False)):
        params = {} if lam_s is None else {"lambda_s": lam_s}
        ets, _ = run_mock("ets", 16, seed, **params)
        t = ets.trace[1]
        assert t.depth == 1
        rebase_kept = [a > 0 for a in t.info["rebase_alloc"]]
        if same:
            assert t.info["keep"] == rebase_kept
        else:
            assert all(k for k, r in zip(t.info["keep"], rebase_kept) if r)


def test_ets_prunes_from_depth_two():
    pruned_at = set()
    for seed in range(6):
        ets, _ = run_mock("ets", 32, seed, lambda_s=0.0)
        for t in ets.trace[1:]:
            if any(r > 0 and not k for k, r in zip(t.info["keep"], t.info["rebase_alloc"])):
                pruned_at.add(t.depth)
    assert pruned_at and min(pruned_at) >= 2


def test_ets_keeps_fewer_nodes_where_pruning_pays():
    # Four depth-2 candidates in four different depth-1 subtrees, scores close together:
    # REBASE spreads over all four paths; ETS concentrates on shared ones.
    parent = {0: None, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1, 7: 2, 8: 3, 9: 4}
    _, nodes = tree_from_parents(parent, texts={i: "same step" for i in range(10)})
    cands = [nodes[i] for i in (5, 6, 7, 8, 9)]
    scores = [0.80, 0.79, 0.78, 0.77, 0.76]
    for c, s in zip(cands, scores):
        c.score = s
    frontier = Frontier(2, cands, [], 16, 16)
    rebase = build_strategy(SearchConfig(strategy="rebase", width=16)).select(frontier)[0]
    ets_alloc, info = ets_select(scores, cands, 16, ETSConfig(lambda_c=1.0, lambda_s=0.0), None)
    def distinct(alloc):
        kept = [c for c, a in zip(cands, alloc) if a > 0]
        return len({n.id for c in kept for n in [c, *c.ancestors()]})
    assert distinct(ets_alloc) < distinct(rebase)
    assert sum(ets_alloc) == sum(rebase) == 16


def test_ets_uses_less_kv_than_rebase_over_searches():
    ets_kv = rebase_kv = 0.0
    for seed in range(6):
        ets_kv += run_mock("ets", 32, seed, lambda_s=0.0)[0].kv_summary()["kv_mean"]
        rebase_kv += run_mock("rebase", 32, seed)[0].kv_summary()["kv_mean"]
    assert ets_kv < rebase_kv


def test_ets_coverage_keeps_more_clusters_with_larger_lambda_s():
    parent = {0: None, 1: 0, 2: 0, 3: 0}
    for i in range(4, 16):
        parent[i] = 1 + (i % 3)
    texts = {i: f"idea {i % 4}" for i in range(16)}
    _, nodes = tree_from_parents(parent, texts=texts)
    cands = [nodes[i] for i in range(4, 16)]
    scores = [0.9 - 0.05 * k for k in range(len(cands))]
    labels = [i % 4 for i in range(4, 16)]
    kept = []
    for lam_s in (0.0, 1.0, 3.0):
        alloc, _ = ets_select(scores, cands, 16, ETSConfig(lambda_c=2.0, lambda_s=lam_s), labels)
        kept.append(len({labels[i] for i, a in enumerate(alloc) if a > 0}))
    assert kept[0] < kept[-1] and kept == sorted(kept)


def test_ets_embeds_each_distinct_step_once_with_the_same_clusters():
    """Repeated candidate steps are embedded once (ets.cluster.embed_unique); the clusters and
    the decision are those of embedding every candidate's text."""
    from ets.cluster import HashEmbedder, cluster_labels

    class Counting(HashEmbedder):
        def __init__(self):
            super().__init__()
            self.seen = []

        def embed(self, texts):
            self.seen.append(list(texts))
            return super().embed(texts)

    parent = {0: None, 1: 0, 2: 0}
    for i in range(3, 11):
        parent[i] = 1 + (i % 2)
    texts = {i: ["add 3 and 4", "so 7 apples", "multiply 7 by 2", "add 3 and 4"][i % 4] for i in range(11)}
    _, nodes = tree_from_parents(parent, texts=texts)
    cands = [nodes[i] for i in range(3, 11)]
    for k, c in enumerate(cands):
        c.score = 0.9 - 0.05 * k
    frontier = Frontier(depth=2, candidates=cands, finished=[], remaining=8, width=8)
    emb = Counting()
    strategy = build_strategy(SearchConfig(strategy="ets", width=8, strategy_params={"lambda_c": 2.0}), embedder=emb)
    alloc, info = strategy.select(frontier)
    assert emb.seen == [["add 3 and 4", "so 7 apples", "multiply 7 by 2"]]  # each once, first appearance order
    every = cluster_labels(HashEmbedder().embed([c.text for c in cands]), 0.05)
    assert info["clusters"] == every.tolist()
    assert len(set(info["clusters"])) == 3
    assert alloc == ets_select([c.score for c in cands], cands, 8, ETSConfig.for_width(8, lambda_c=2.0), every)[0]


def test_embedder_benchmark_compares_both_ways_on_saved_decisions(tmp_path, capsys):
    """benchmarks/bench_embedder.py reads decisions from a run directory and reports both timings
    and whether the partitions agree (the real MiniLM, as ETS uses it)."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from bench_embedder import main

    steps = ["Add 3 and 4 to get 7.", "Add 3 and 4 to get 7.", "Multiply 7 by 2: 14.", "The answer is 14."]
    nodes = [{"id": 0, "text": ""}] + [{"id": i + 1, "text": t} for i, t in enumerate(steps)]
    trace = [{"depth": 0, "candidate_ids": []}, {"depth": 1, "candidate_ids": [1, 2, 3, 4]},
             {"depth": 2, "candidate_ids": [1, 2]}]  # the last: one distinct text, not a clustering
    (tmp_path / "problems").mkdir()
    (tmp_path / "problems" / "p0.json").write_text(json.dumps({"tree": {"nodes": nodes}, "trace": trace}))
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "decisions: 1 (4 candidate texts, 3 distinct)" in out
    assert "identical partitions 1/1" in out


@pytest.mark.parametrize("seed", range(3))
def test_dvts_subtrees_stay_independent(seed):
    width = 16
    result, _ = run_mock("dvts", width, seed)
    m = math.ceil(math.sqrt(width))
    depth1 = sorted(result.tree.at_depth(1), key=lambda n: n.id)
    group = {n.id: pos * m // len(depth1) for pos, n in enumerate(depth1)}
    for t in result.trace:
        if t.depth < 1:
            continue
        expanded = [cid for cid, a in zip(t.candidate_ids, t.alloc) if a > 0]
        subtrees = [group[result.tree.nodes[cid].path()[0].id] for cid in expanded]
        assert len(subtrees) == len(set(subtrees))  # at most one node grown per subtree
        for cid, a in zip(t.candidate_ids, t.alloc):
            if a > 0:
                assert a <= width // m
    for n in result.tree.nodes:
        if n.depth >= 2:  # a subtree's nodes descend from its own depth-1 root
            assert group[n.path()[0].id] == group[n.parent.path()[0].id]


@pytest.mark.parametrize("seed", range(3))
def test_best_of_n_never_prunes(seed):
    result, _ = run_mock("best_of_n", 12, seed)
    for t in result.trace[1:]:
        assert t.alloc == [1] * t.candidates
    leaves = [n for n in result.tree.nodes if not n.children and not n.is_root]
    assert len(leaves) == 12
    assert all(n.finish is not None for n in leaves)


def test_missing_prm_score_is_an_error():
    cfg = SearchConfig(strategy="rebase", width=8)
    prm = MockPRM(drop_last_for="Subtract")
    with pytest.raises(PRMError, match="scores for a path"):
        asyncio.run(search("q", MockPolicy(), prm, cfg))


def test_policy_that_never_delimits_is_a_clear_error():
    cfg = SearchConfig(strategy="rebase", width=4, max_tokens=64)
    with pytest.raises(StepDelimiterError, match="--step-delimiter"):
        asyncio.run(search("q", MockPolicy(never_delimit=True), MockPRM(), cfg))


def test_long_steps_are_capped_by_max_tokens():
    cfg = SearchConfig(strategy="rebase", width=4, max_tokens=12, max_depth=10)
    result = asyncio.run(search("q", MockPolicy(finish_rate=0.0), MockPRM(), cfg))
    leaves = [n for n in result.tree.nodes if not n.children and not n.is_root]
    assert leaves and all(n.finish == "cap" and n.cum_tokens >= 12 for n in leaves if n.finish)
    assert result.solutions == []


def test_paper_lambda_s_by_width():
    assert [paper_lambda_s(w) for w in (16, 64, 256)] == [1.5, 1.4, 1.45]
    assert ETSConfig.for_width(64).lambda_s == 1.4
    assert ETSConfig.for_width(64, lambda_s=0.3).lambda_s == 0.3


@pytest.mark.parametrize("bad", [{"lambda_c": -1}, {"softmax_temperature": 0}, {"node_cost": "bytes"},
                                 {"kv_budget": 0}, {"solver": "cbc"}, {"nonsense": 1}])
def test_ets_config_validates(bad):
    with pytest.raises(ValueError):
        SearchConfig(strategy="ets", width=8, strategy_params=bad)


def test_search_config_validates():
    with pytest.raises(ValueError, match="unknown strategy"):
        SearchConfig(strategy="mcts")
    with pytest.raises(ValueError, match="width"):
        SearchConfig(width=0)


def test_rebase_allocation_favours_the_top():
    alloc = rebase_allocate([0.9, 0.1, 0.5], 10, 0.2)
    assert sum(alloc) == 10 and alloc[0] > alloc[2] > alloc[1] or alloc[1] == 0


def test_depth_cap_stops_the_search():
    cfg = SearchConfig(strategy="rebase", width=8, max_depth=2)
    result = asyncio.run(search("q", MockPolicy(finish_rate=0.0), MockPRM(), cfg))
    assert max(n.depth for n in result.tree.nodes) == 2
    assert all(n.finish == "depth" for n in result.tree.at_depth(2))
