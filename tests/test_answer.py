"""Final-answer selection: aggregation, votes, equivalence grouping, deterministic ties."""

import math

import pytest

from ets.answer import Solution, aggregate, select_answer, select_from_tree, solutions_of
from ets.tasks import Task
from ets.tree import ANSWER, CAP, Tree
from ets.treeio import tree_from_dict, tree_to_dict

MATH = Task("math500")


def test_aggregate():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8
    assert aggregate(s, "min") == 0.5
    assert math.isclose(aggregate(s, "prod"), 0.36)
    assert math.isclose(aggregate(s, "mean"), 2.2 / 3)
    with pytest.raises(ValueError):
        aggregate(s, "max")


def sols(*items):
    return [Solution(i, a, tuple(sc)) for i, (a, sc) in enumerate(items, 1)]


def test_votes_disagree_on_purpose():
    # A: two weak solutions (0.3 + 0.3 = 0.6); B: one strong (0.7) -> weighted B, majority A
    s = sols(("A", [0.3]), ("B", [0.7]), ("A", [0.3]))
    assert select_answer(s, "weighted").answer == "B"
    assert select_answer(s, "majority").answer == "A"
    assert select_answer(s, "best").answer == "B"


def test_aggregation_changes_the_winner():
    # last: X 0.9 beats Y 0.8; min: X 0.1 loses to Y 0.7
    s = sols(("X", [0.1, 0.9]), ("Y", [0.7, 0.8]))
    assert select_answer(s, "weighted", "last").answer == "X"
    assert select_answer(s, "weighted", "min").answer == "Y"
    assert select_answer(s, "best", "prod").answer == "Y"


def test_ties_go_to_the_earliest():
    s = sols(("A", [0.5]), ("B", [0.5]))
    assert select_answer(s, "weighted").answer == "A"
    assert select_answer(list(reversed(s)), "weighted").answer == "A"  # order given does not matter
    assert select_answer(s, "majority").answer == "A"
    assert select_answer(s, "best").answer == "A"
    # equal totals reached by different sums (float rounding) still tie
    s = sols(("A", [0.1]), ("A", [0.2]), ("B", [0.3]))
    assert select_answer(s, "weighted").answer == "A"


def test_best_tie_goes_to_earliest_solution_not_group():
    s = sols(("A", [0.5]), ("B", [0.9]), ("A", [0.9]))
    sel = select_answer(s, "best")
    assert (sel.answer, sel.node_id) == ("B", 2)


def test_equivalent_answers_grouped():
    s = sols(("\\frac{1}{2}", [0.4]), ("0.7", [0.6]), ("0.5", [0.4]))
    sel = select_answer(s, "weighted", same=MATH.same)
    assert sel.answer == "\\frac{1}{2}" and len(sel.groups) == 2
    assert sel.groups[0]["members"] == [1, 3]
    assert sel.node_id == 1  # highest-scoring member, earliest on ties
    # without equivalence they would split and 0.7 would win
    assert select_answer(s, "weighted").answer == "0.7"


def test_no_answers():
    sel = select_answer(sols((None, [0.9])))
    assert sel.answer is None and sel.node_id is None
    assert select_answer([]).answer is None


def build_tree():
    t = Tree([1, 2, 3], "prompt")
    a = t.add_child(t.root, [4, 5], "step a\n\n", "delimiter", [-0.1, -0.2])
    a.score, a.alloc, a.cluster = 0.6, 2, 0
    b = t.add_child(t.root, [6], "step b\n\n", "delimiter")
    b.score, b.alloc, b.cluster = 0.2, 0, 1
    a1 = t.add_child(a, [7, 8], "so \\boxed{0.5}", "eos")
    a1.score, a1.finish = 0.3, ANSWER
    a2 = t.add_child(a, [9], "so \\boxed{\\frac12}", "eos")
    a2.score, a2.finish = 0.35, ANSWER
    a3 = t.add_child(a, [10], "The answer is 7.", "delimiter")
    a3.score, a3.finish = 0.9, ANSWER
    a4 = t.add_child(a, [11] * 5, "still going", "length")
    a4.score, a4.finish = 0.99, CAP  # not a solution: never votes
    return t


def test_select_from_tree():
    t = build_tree()
    found = solutions_of(t, MATH.extract)
    assert [(s.node_id, s.answer, s.step_scores) for s in found] == [
        (3, "0.5", (0.6, 0.3)), (4, "\\frac12", (0.6, 0.35)), (5, "7", (0.6, 0.9))]
    assert select_from_tree(t, MATH, "weighted").answer == "7"  # 0.9 > 0.3 + 0.35
    assert select_from_tree(t, MATH, "majority").answer == "0.5"  # 2 votes (0.5 = 1/2) vs 1
    assert select_from_tree(t, MATH, "weighted", "min").answer == "0.5"  # 0.3+0.35 > 0.6


def test_tree_json_round_trip_recomputes_same_answer():
    t = build_tree()
    back = tree_from_dict(tree_to_dict(t))
    assert tree_to_dict(back) == tree_to_dict(t)
    assert back.nodes[1].logprobs == [-0.1, -0.2] and back.nodes[2].alloc == 0 and back.nodes[2].cluster == 1
    for vote in ("weighted", "majority", "best"):
        assert select_from_tree(back, MATH, vote).to_dict() == select_from_tree(t, MATH, vote).to_dict()


def test_corrupted_tree_rejected():
    d = tree_to_dict(build_tree())
    d["nodes"][3]["cum_tokens"] += 1
    with pytest.raises(ValueError, match="node 3"):
        tree_from_dict(d)
