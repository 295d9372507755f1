"""MATH500: the 500-problem MATH test subset used by PRM800K and the ETS paper (MATH by
Hendrycks et al., MIT licence; see data/LICENSES.md). Ids are MATH's `unique_id`
(e.g. `test/precalculus/807.json`); gold = the `answer` field (LaTeX); graded by math-verify."""

from __future__ import annotations

from pathlib import Path

from ets.tasks.base import Problem, Task
from ets.tasks.jsonl import read_jsonl

DATA = Path(__file__).parent / "data" / "math500_test.jsonl"
TASK = Task("math500", numeric=False)


def load() -> list[Problem]:
    return read_jsonl(DATA, "problem", "answer", id_field="unique_id")
