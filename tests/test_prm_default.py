import asyncio
import math

import pytest

from ets.prm.base import ScoreRequest
from ets.prm.default import DefaultPRM, check_arithmetic, confidence, evaluate
from ets.tree import Tree


@pytest.mark.parametrize("text, expected", [
    ("3 * 4 = 12", (1, 0)),
    ("So she pays $12 + $5 = $17.", (1, 0)),
    ("1,200 / 4 = 300 dollars each", (1, 0)),
    ("12 apples + 5 apples = 17 apples", (1, 0)),
    ("2 x 3 = 6 and 6 × 2 = 12", (2, 0)),
    ("$5 \\times 7 = 35$", (1, 0)),
    ("\\frac{6}{2} = 3", (1, 0)),
    ("3 * 4 = 13", (0, 1)),
    ("3 * 4 = 12 + 5 = 17", (2, 0)),  # running-total style
    ("3 * 4 = 12 + 5 = 18", (1, 1)),
    ("10 / 3 = 3.33 hours", (1, 0)),  # rounding as written
    ("10 / 3 = 3.5 hours", (0, 1)),
    ("In 2023 she had 5 cats. She has 5 = 5", (0, 0)),  # no operator: not a computation
    ("Let's think step by step.", (0, 0)),
])
def test_check_arithmetic(text, expected):
    assert check_arithmetic(text) == expected


def test_evaluate_is_arithmetic_only():
    assert evaluate("(2 + 3) * 4") == 20
    assert evaluate("__import__('os')") is None
    assert evaluate("1 / 0") is None


def path_tree(steps, logprobs):
    tree = Tree([1, 2], "q")
    node = tree.root
    for text, lps in zip(steps, logprobs):
        node = tree.add_child(node, [7] * len(lps), text, "delimiter", lps)
    return node


def test_scores_one_per_step_in_unit_interval_and_errors_persist():
    prm = DefaultPRM()
    good = path_tree(["48 / 2 = 24 clips in May.", "48 + 24 = 72", "The answer is 72."], [[-0.1] * 5] * 3)
    bad = path_tree(["48 / 2 = 24 clips in May.", "48 + 24 = 82", "The answer is 82."], [[-0.1] * 5] * 3)
    s_good, s_bad = asyncio.run(prm.score([ScoreRequest("q", good), ScoreRequest("q", bad)]))
    assert len(s_good) == len(s_bad) == 3
    assert all(0 <= s <= 1 for s in s_good + s_bad)
    assert s_good[0] == s_bad[0]  # same first step, same score
    assert s_bad[1] < s_good[1] and s_bad[2] < s_good[2]  # the error is remembered by later steps
    assert s_good[1] > s_good[0]  # more checked arithmetic, more trust


def test_confidence_term_orders_equal_arithmetic():
    prm = DefaultPRM()
    sure = prm.path_scores(["We add them."], [[-0.01, -0.02]])[0]
    unsure = prm.path_scores(["We add them."], [[-3.0, -4.0]])[0]
    assert sure > unsure
    assert math.isclose(confidence([-1.0, -3.0]), math.exp(-2.0))
    assert prm.path_scores(["no logprobs"], [None]) == [0.7 * 0.5 + 0.3 * 0.5]


def test_bad_parameters_rejected():
    with pytest.raises(ValueError):
        DefaultPRM(arith_weight=1.5)
