"""Does the PRM carry signal? Answer-selection rules compared on saved trees (no generation).

For each run directory (typically best-of-N, whose W samples are independent) and each problem:

- `weighted`: the reference vote, answers weighted by the solution's aggregated PRM score;
- `majority`: every solution weighs 1 (no PRM);
- `best`: the single highest-scoring solution (PRM-best);
- `random`: the weighted vote with every step score replaced by an independent uniform draw
  (what a PRM without signal would give); its accuracy is the mean over `draws` draws per
  problem, seeded by the problem id, so it is reproducible;
- `oracle`: any solution's answer is right (an upper bound no rule can pass);
- AUROC of the solution's aggregated score against its own correctness, pooled over every
  solution of every problem (0.5 = no signal), and the mean within-problem AUROC over problems
  that have both right and wrong solutions (what a selection rule actually sees).

Every accuracy comes with its 95% Wilson interval (for `random`, of the rounded expected count).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from ets.answer import Solution, aggregate, select_answer, solutions_of
from ets.report.record import wilson
from ets.runs import RunDir
from ets.tasks import Task
from ets.treeio import tree_from_dict

RULES = ("weighted", "majority", "best", "random", "oracle")


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """Probability that a random right solution outscores a random wrong one (ties count half);
    None when one class is empty."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    # rank-sum form, O(n log n): average ranks for ties
    ranked = sorted((s, y) for s, y in zip(scores, labels))
    ranks: list[float] = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    r_pos = sum(r for r, (_, y) in zip(ranks, ranked) if y)
    return (r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def _rng(problem_id: str, draw: int) -> random.Random:
    seed = hashlib.blake2b(f"{problem_id}/{draw}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(seed, "little"))


def problem_worth(record: dict, agg: str = "last", draws: int = 32) -> dict:
    """Correctness of each rule on one saved problem, plus its solutions' (score, right) pairs."""
    task = Task.from_dict(record["task"])
    sols = solutions_of(tree_from_dict(record["tree"]), task.extract)
    gold = record["gold"]
    right = {s.node_id: s.answer is not None and task.grade(s.answer, gold) for s in sols}
    out = {rule: bool(task.grade(select_answer(sols, rule, agg, task.same).answer, gold))
           for rule in ("weighted", "majority", "best")}
    hits = 0
    for d in range(draws):
        rng = _rng(record["id"], d)
        fake = [Solution(s.node_id, s.answer, tuple(rng.random() for _ in s.step_scores)) for s in sols]
        hits += task.grade(select_answer(fake, "weighted", agg, task.same).answer, gold)
    out["random"] = hits / draws
    out["oracle"] = any(right.values())
    out["pairs"] = [(aggregate(s.step_scores, agg), right[s.node_id]) for s in sols if s.answer is not None]
    out["id"] = record["id"]
    return out


def run_worth(run_dir: str | Path, agg: str = "last", draws: int = 32, ids: list[str] | None = None,
              records: list[dict] | None = None) -> dict:
    """Every rule's accuracy over a run's saved problems (or those in `ids`; `records`: those
    records, already read), with intervals and the two AUROCs (see the module docstring)."""
    run = RunDir(run_dir)
    wanted = set(ids) if ids is not None else None
    records = run.iter_problems() if records is None else records
    per = [problem_worth(r, agg, draws) for r in records if wanted is None or r["id"] in wanted]
    return {"run": run.name, "agg": agg, "random_draws": draws, **summarize_worth(per)}


def summarize_worth(per: list[dict]) -> dict:
    """Rule accuracies with intervals and the two AUROCs over `problem_worth` results."""
    n = len(per)
    rows = {}
    for rule in RULES:
        k = sum(p[rule] for p in per)
        lo, hi = wilson(round(k), n)
        rows[rule] = {"correct": k, "accuracy": k / n if n else 0.0, "lo": lo, "hi": hi}
    pairs = [pr for p in per for pr in p["pairs"]]
    within = [a for a in (auroc([s for s, _ in p["pairs"]], [y for _, y in p["pairs"]]) for p in per)
              if a is not None]
    return {"problems": n, "rules": rows,
            "solutions": len(pairs), "solutions_right": sum(1 for _, y in pairs if y),
            "auroc_pooled": auroc([s for s, _ in pairs], [y for _, y in pairs]),
            "auroc_within_mean": sum(within) / len(within) if within else None,
            "auroc_within_problems": len(within)}


def worth_markdown(w: dict) -> str:
    """The PRM-signal table of one run as markdown."""
    names = {"weighted": "PRM-weighted vote", "majority": "majority vote", "best": "PRM-best",
             "random": f"random-score vote (mean of {w['random_draws']} draws)", "oracle": "any correct (oracle)"}
    lines = [f"{w['problems']} problems, {w['solutions']} solutions with an answer "
             f"({w['solutions_right']} right), step scores aggregated by `{w['agg']}`", "",
             "| rule | accuracy | 95% CI |", "|---|---|---|"]
    for rule in RULES:
        r = w["rules"][rule]
        lines.append(f"| {names[rule]} | {r['accuracy']:.3f} ({r['correct']:g}/{w['problems']}) "
                     f"| [{r['lo']:.3f}, {r['hi']:.3f}] |")

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines += ["", f"AUROC of the solution score against its correctness: pooled {f(w['auroc_pooled'])}; "
              f"within problem (mean over the {w['auroc_within_problems']} problems with both right and wrong "
              f"solutions) {f(w['auroc_within_mean'])}."]
    return "\n".join(lines)


def rules_markdown(arms: list[tuple[str, list[dict]]], agg: str = "last", draws: int = 16) -> str:
    """Every method's accuracy under every selection rule on the same problems, with the AUROCs:
    whether the PRM's weighting beats a plain majority (and chance) for each search."""
    lines = ["## Answer selection", "",
             f"Each method's saved trees re-scored under every rule (step scores aggregated by `{agg}`; "
             f"random: mean of {draws} uniform score draws per problem; oracle: any solution right).", "",
             "| method | n | PRM-weighted | majority | PRM-best | random scores | oracle | AUROC pooled | AUROC within |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for label, recs in arms:
        w = summarize_worth([problem_worth(r, agg, draws) for r in recs])
        acc = {rule: (w["rules"][rule]["accuracy"] if w["problems"] else None) for rule in RULES}
        lines.append(f"| {label} | {w['problems']} | " + " | ".join(f(acc[r]) for r in RULES) +
                     f" | {f(w['auroc_pooled'])} | {f(w['auroc_within_mean'])} |")
    return "\n".join(lines)
