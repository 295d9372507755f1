"""Replaying saved decisions under other selection settings (benchmarks/replay.py)."""

import sys
from pathlib import Path

import pytest

# the analysis code beside the benchmark scripts (benchmarks/replay.py), not in the package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ets.cluster import make_embedder
from replay import grid, replay, summarize
from ets.strategies.ets import ETSConfig
from ets.strategies.rebase import rebase_allocate
from ets.tree import Tree
from ets.treeio import tree_to_dict

SCORES = [0.6, 0.55, 0.5, 0.1]


def record():
    """A width-4 tree: root (3 tokens) -> 4 scored steps of 2..5 tokens -> 4 children (6 tokens
    each) under the best step; traced as the search traces it."""
    tree = Tree([1, 2, 3], "prompt")
    steps = [tree.add_child(tree.root, range(10 * i, 10 * i + 2 + i), f"step {i} " * (i + 1), "delimiter")
             for i in range(4)]
    for node, s in zip(steps, SCORES):
        node.score = s
    for j in range(4):
        tree.add_child(steps[0], range(100 + j, 106 + j), f"next {j}", "delimiter")
    trace = [{"depth": 0, "alloc": [4], "candidate_ids": [0], "remaining": 4},
             {"depth": 1, "alloc": rebase_allocate(SCORES, 4, 0.2), "candidate_ids": [1, 2, 3, 4], "remaining": 4}]
    return {"id": "p1", "tree": tree_to_dict(tree), "trace": trace}


def test_replay_measures_what_each_setting_keeps():
    greedy = ETSConfig.for_width(4, lambda_c=50.0, lambda_s=0.0, embedder="hash")
    out = replay([record()], {"rebase": None, "greedy": greedy}, make_embedder("hash"))
    (rb,), (gr,) = out["rebase"], out["greedy"]
    assert rb["depth"] == gr["depth"] == 1
    # REBASE keeps what its allocation funds; the KV is the root plus each kept step's tokens
    alloc = rebase_allocate(SCORES, 4, 0.2)
    kept = [i for i, a in enumerate(alloc) if a > 0]
    assert rb["kept"] == len(kept) > 1
    assert rb["kept_tokens"] == 3 + sum(2 + i for i in kept)
    assert rb["kept_nodes"] == 1 + len(kept)
    # a node cost this heavy keeps one candidate, the best-scored one, with the whole width
    assert gr["kept"] == 1 and gr["kept_nodes"] == 2 and gr["kept_tokens"] == 3 + 2
    assert gr["top_share"] == 1.0
    # next-depth estimate: kept KV + remaining x mean step length at depth 2 (6 tokens)
    assert gr["next_kv"] == pytest.approx(5 + 4 * 6)
    rows = {r["setting"]: r for r in summarize(out, "rebase")}
    assert rows["rebase"]["kept_ratio"] == 1.0
    assert rows["greedy"]["kept_ratio"] == pytest.approx(rb["kept_tokens"] / 5)
    assert rows["greedy"]["next_ratio"] == pytest.approx(rb["next_kv"] / gr["next_kv"])


def test_grid_scales_the_papers_coverage_weight():
    settings = grid(16, lambda_c=(1.0, 4.0), lambda_s_scale=(0.0, 2.0), embedder="hash")
    assert settings["rebase"] is None
    paper = ETSConfig.for_width(16).lambda_s
    assert settings[f"ets lambda_c=4 lambda_s={2 * paper:g}"].lambda_s == pytest.approx(2 * paper)
    assert settings["ets lambda_c=1 lambda_s=0"].lambda_c == 1.0
    assert len(settings) == 1 + 4


def test_decisions_without_a_choice_are_skipped():
    r = record()
    r["trace"][1]["candidate_ids"] = [1]
    out = replay([r], {"rebase": None}, make_embedder("hash"))
    assert out["rebase"] == []


def test_rescore_replaces_the_saved_scores_before_replaying():
    """A sharper PRM's view of the same candidates: REBASE then funds only the one it favours."""
    seen = []

    def rescore(question, tree):
        seen.append(question)
        for n in tree.nodes[1:]:
            n.score = 1.0 if n.id == 4 else 0.0  # the worst-saved step becomes the clear best

    r = record() | {"question": "q?"}
    (rb,) = replay([r], {"rebase": None}, make_embedder("hash"), rescore)["rebase"]
    assert seen == ["q?"]
    assert rb["kept"] == 1 and rb["kept_tokens"] == 3 + 5 and rb["top_share"] == 1.0
    (saved,) = replay([r], {"rebase": None}, make_embedder("hash"))["rebase"]
    assert saved["kept"] > 1  # without it, the saved scores
