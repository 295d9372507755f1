"""Best-of-n accuracy at n = 1, 2, 4, ..., W from one best-of-W run, by subsampling its trees (as
search-and-learn reports best-of-N curves): for each problem and each n, `draws` random subsets
of n of its W samples (seeded by the problem id, n and the draw) are voted on as the run would
vote, and the mean share of right answers is the problem's expected accuracy at n.

A sample is one root-to-leaf chain (best-of-N trees are W independent chains); a chain that
stopped without an answer is a sample that votes for nothing. Answers are grouped once per
problem, with the task's equivalence, over all W samples (ets.answer.select_answer's groups), so
a subset's vote is the heaviest of its members' groups; ties go to the group whose earliest
member in the subset came first (the rule of ets.answer).
"""

from __future__ import annotations

import hashlib
import random

from ets.answer import aggregate, select_answer, solutions_of
from ets.tasks import Task
from ets.tree import ANSWER
from ets.treeio import tree_from_dict


def powers_of_two(width: int) -> list[int]:
    ns, n = [], 1
    while n < width:
        ns.append(n)
        n *= 2
    return ns + [width]


def problem_samples(record: dict, agg: str = "last") -> tuple[list[tuple[int | None, float]], dict[int, bool]]:
    """(samples, right): per leaf in id order, (its answer group or None, its score); and whether
    each group's answer is right."""
    task = Task.from_dict(record["task"])
    tree = tree_from_dict(record["tree"])
    sols = solutions_of(tree, task.extract)
    sel = select_answer(sols, "majority", agg, task.same)  # groups over every answered sample
    group_of = {m: g for g, grp in enumerate(sel.groups) for m in grp["members"]}
    right = {g: bool(task.grade(grp["answer"], record["gold"])) for g, grp in enumerate(sel.groups)}
    score = {s.node_id: aggregate(s.step_scores, agg) for s in sols}
    leaves = [n for n in tree.nodes if not n.children and not n.is_root]
    samples = [(group_of.get(n.id) if n.finish == ANSWER else None, score.get(n.id, 0.0)) for n in leaves]
    return samples, right


def vote(subset: list[tuple[int | None, float]], weighted: bool) -> int | None:
    weight: dict[int, float] = {}
    for g, s in subset:
        if g is not None:
            weight[g] = weight.get(g, 0.0) + (s if weighted else 1.0)
    if not weight:
        return None
    top = max(weight.values())
    for g, _ in subset:  # earliest member first
        if g is not None and weight[g] == top:
            return g
    return None


def subsampled_accuracy(records: list[dict], ns: list[int] | None = None, draws: int = 64,
                        agg: str = "last") -> dict:
    """{"n": [...], "weighted": [...], "majority": [...], "problems": P, "width": W}: the mean
    accuracy over problems at each n (each problem's expectation over `draws` subsets; at n = W
    the one full set)."""
    per = [(r["id"], *problem_samples(r, agg)) for r in records]
    width = min(len(s) for _, s, _ in per) if per else 0
    ns = ns or powers_of_two(width)
    out = {"n": ns, "weighted": [], "majority": [], "problems": len(per), "width": width, "draws": draws}
    for n in ns:
        acc = {"weighted": 0.0, "majority": 0.0}
        for pid, samples, right in per:
            k = draws if n < len(samples) else 1
            hits = {"weighted": 0, "majority": 0}
            for d in range(k):
                seed = hashlib.blake2b(f"{pid}/{n}/{d}".encode(), digest_size=8).digest()
                idx = sorted(random.Random(int.from_bytes(seed, "little")).sample(range(len(samples)), min(n, len(samples))))
                subset = [samples[i] for i in idx]
                for v in hits:
                    g = vote(subset, v == "weighted")
                    hits[v] += g is not None and right[g]
            for v in acc:
                acc[v] += hits[v] / k
        for v in acc:
            out[v].append(acc[v] / len(per) if per else 0.0)
    return out


def subsample_markdown(s: dict) -> str:
    lines = [f"Best-of-n from {s['problems']} best-of-{s['width']} trees (mean over {s['draws']} random subsets "
             "of n samples per problem):", "", "| n | " + " | ".join(str(n) for n in s["n"]) + " |",
             "|---|" + "---|" * len(s["n"])]
    for v in ("weighted", "majority"):
        lines.append(f"| {v} | " + " | ".join(f"{a:.3f}" for a in s[v]) + " |")
    return "\n".join(lines)
