"""Final-answer selection (SPEC section 4), recomputable from a saved tree.

A solution is a finished-by-answer leaf: its extracted answer and the PRM scores of every step on
its path. Its score is an aggregate of those step scores (`agg`): "last" (reference), "min",
"prod" or "mean". Then `vote`:
- "weighted" (reference): answers grouped by equivalence, each group's weight = sum of its
  solutions' scores; the heaviest group wins;
- "majority": the same with every solution weighing 1;
- "best": the single highest-scoring solution (best-of-N / argmax).

Equivalence: two answers are the same when `same(a, b)` (a task's math-verify comparison). A
solution joins the first earlier group whose representative (its first member) is the same.

Deterministic tie-breaking: solutions are taken in node-id (= creation) order; among groups of
equal weight (exactly equal, or within 1e-12 relative) the group whose first member came first
wins; under "best" the earliest solution among equal top scores wins. The chosen node is the
highest-scoring member of the winning group (earliest on ties).

Solutions with no extractable answer take no part; with none left the answer is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

AGGREGATIONS = ("last", "min", "prod", "mean")
VOTES = ("weighted", "majority", "best")


def aggregate(step_scores: Sequence[float], agg: str = "last") -> float:
    """One score for a solution from its per-step PRM scores (root-most first)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; choose one of {AGGREGATIONS}")
    if not step_scores:
        raise ValueError("a solution needs at least one step score")
    s = [float(x) for x in step_scores]
    if agg == "last":
        return s[-1]
    if agg == "min":
        return min(s)
    if agg == "prod":
        return math.prod(s)
    return sum(s) / len(s)


@dataclass(frozen=True)
class Solution:
    node_id: int
    answer: str | None
    step_scores: tuple[float, ...]


@dataclass
class Selection:
    answer: str | None  # the winning group's representative answer (None: no answer found)
    node_id: int | None  # the solution standing for it (highest score within the group)
    groups: list[dict] = field(default_factory=list)  # [{answer, weight, members: [node ids]}] in order
    vote: str = "weighted"
    agg: str = "last"

    def to_dict(self) -> dict:
        return {"answer": self.answer, "node_id": self.node_id, "vote": self.vote, "agg": self.agg,
                "groups": self.groups}


def _exact(a: str, b: str) -> bool:
    return a == b


def _close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b))


def select_answer(solutions: Sequence[Solution], vote: str = "weighted", agg: str = "last",
                  same: Callable[[str, str], bool] = _exact) -> Selection:
    """Pick the final answer among `solutions` (see the module docstring for the exact rule)."""
    if vote not in VOTES:
        raise ValueError(f"unknown vote {vote!r}; choose one of {VOTES}")
    sols = sorted((s for s in solutions if s.answer is not None), key=lambda s: s.node_id)
    scores = {s.node_id: aggregate(s.step_scores, agg) for s in sols}
    groups: list[dict] = []
    for s in sols:
        for g in groups:
            if same(s.answer, g["answer"]):
                g["members"].append(s.node_id)
                break
        else:
            groups.append({"answer": s.answer, "members": [s.node_id]})
    for g in groups:
        g["weight"] = (len(g["members"]) if vote == "majority"
                       else sum(scores[m] for m in g["members"]) if vote == "weighted"
                       else max(scores[m] for m in g["members"]))
        g["best_node"] = _argmax(g["members"], scores)
    if not groups:
        return Selection(None, None, [], vote, agg)
    if vote == "best":  # the earliest top-scoring solution, whatever its group
        top = _argmax([s.node_id for s in sols], scores)
        win = next(g for g in groups if top in g["members"])
        return Selection(win["answer"], top, groups, vote, agg)
    win = groups[0]
    for g in groups[1:]:  # strict improvement only: earlier groups win ties
        if g["weight"] > win["weight"] and not _close(g["weight"], win["weight"]):
            win = g
    return Selection(win["answer"], win["best_node"], groups, vote, agg)


def _argmax(ids: list[int], scores: dict[int, float]) -> int:
    best = ids[0]
    for i in ids[1:]:
        if scores[i] > scores[best] and not _close(scores[i], scores[best]):
            best = i
    return best


def solutions_of(tree, extract: Callable[[str], str | None]) -> list[Solution]:
    """The finished-by-answer leaves of a tree (ets.tree.Tree) with their answers and scores.

    The answer is extracted from the leaf's last step first (where the search saw it finish),
    then from the whole path's text."""
    out = []
    for node in tree.solutions():
        ans = extract(node.text)
        if ans is None:
            ans = extract("".join(node.step_texts()))
        scores = tuple(s for s in node.step_scores() if s is not None)
        if scores:
            out.append(Solution(node.id, ans, scores))
    return out


def select_from_tree(tree, task, vote: str = "weighted", agg: str = "last") -> Selection:
    """`select_answer` on a tree's solutions, with the task's extraction and equivalence."""
    return select_answer(solutions_of(tree, task.extract), vote, agg, task.same)
