"""What is a PRM worth on saved trees? Any PRM spec rescoring a run's trees, without generating.

For a best-of-N run (its samples do not depend on the PRM) every node of every saved tree is
scored again by the PRM under test, as the search would have sent it (the problem's prompt as
the question, the answer key beside it for the reference PRM), and judged by
ets.prm.train.heldout_figures:
- final-step AUROC of whole solutions against their correctness, pooled and within problems;
- open-prefix AUROC within one depth of one problem (`auroc_open_within`): the unfinished
  prefixes a search ranks, against whether their rollout ends right; the mean over groups with
  both outcomes. This is the figure that decides what REBASE and ETS keep;
- best-of-N accuracy of the PRM-weighted vote, the PRM's single best, the majority, any-correct.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ets.prm.base import Reference, ScoreRequest
from ets.runs import RunDir
from ets.tasks import Task
from ets.treeio import tree_from_dict


def solution_of(record: dict) -> str | None:
    """The reference solution of a saved problem: its source's answer field (kept in meta)."""
    meta = record.get("meta") or {}
    sol = meta.get("answer", meta.get("solution"))
    return sol if isinstance(sol, str) else None


async def rescore_records(records: list[dict], prm, task: Task, concurrency: int = 8) -> list[float]:
    """The PRM's score of every non-root node of every record's tree, in the order of
    ets.prm.train.examples_from_records (records in order, nodes by id)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(rec: dict) -> list[float]:
        tree = tree_from_dict(rec["tree"])
        ref = Reference(rec["gold"], solution_of(rec), task.numeric)
        nodes = tree.nodes[1:]
        async with sem:
            scores = await prm.score([ScoreRequest(rec["prompt"], n, ref) for n in nodes])
        if len(scores) != len(nodes):
            raise ValueError(f"PRM {prm.name} returned {len(scores)} results for {len(nodes)} paths")
        return [s[-1] for s in scores]

    parts = await asyncio.gather(*(one(r) for r in records))
    return [s for part in parts for s in part]


def worth_of(run_dir: str | Path, prm, limit: int | None = None, concurrency: int = 8) -> dict:
    """heldout_figures of `prm` (a RewardModel) on the first `limit` saved problems of `run_dir`,
    with the wall time the scoring took."""
    import numpy as np

    from ets.prm.train import examples_from_records, heldout_figures

    records = list(RunDir(run_dir).iter_problems())[:limit]
    if not records:
        raise ValueError(f"{run_dir} has no saved problems to judge a PRM on; run `ets run` or `ets compare` first")
    task = Task.from_dict(records[0]["task"])
    ex = examples_from_records(records, task)
    t0 = time.perf_counter()
    scores = asyncio.run(_scored(records, prm, task, concurrency))
    wall = time.perf_counter() - t0
    figs = heldout_figures(ex, scores, np.ones(len(scores), bool), task)
    return {"prm": getattr(prm, "name", "?"), "run": str(run_dir), "score_s": round(wall, 1), **figs}


async def _scored(records, prm, task, concurrency):
    try:
        return await rescore_records(records, prm, task, concurrency)
    finally:
        if hasattr(prm, "aclose"):
            await prm.aclose()


def rescore_markdown(rows: list[dict]) -> str:
    """One line per PRM: the AUROCs that say what it ranks, and best-of-N under it."""
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| PRM | problems | solutions | AUROC final (pooled) | AUROC final (within) | AUROC open prefixes "
             "(within a depth) | groups | weighted | best | majority | any | weighted - majority [95%] | scoring s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        d, lo, hi = (100 * v for v in w["weighted_minus_majority"])
        lines.append(f"| {w['prm']} | {w['problems']} | {w['solutions']} | {f(w['auroc_final'])} | "
                     f"{f(w['auroc_final_within'])} | {f(w['auroc_open_within'])} | {w['open_groups_mixed']} | "
                     f"{f(w['acc_weighted'])} | {f(w['acc_best'])} | {f(w['acc_majority'])} | {f(w['acc_oracle'])} | "
                     f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}] | {w['score_s']:g} |")
    return "\n".join(lines)
