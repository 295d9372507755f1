"""GSM8K test split (1,319 grade-school word problems; openai/grade-school-math, MIT licence;
see data/LICENSES.md). Gold = the number after `####`; graded numerically."""

from __future__ import annotations

from pathlib import Path

from ets.tasks.base import Problem, Task
from ets.tasks.grading import gsm8k_gold
from ets.tasks.jsonl import read_jsonl

DATA = Path(__file__).parent / "data" / "gsm8k_test.jsonl"
TASK = Task("gsm8k", numeric=True)


def load() -> list[Problem]:
    """All problems, ids `gsm8k-<index>` (0-based position in the test split)."""
    return read_jsonl(DATA, "question", "answer", gold=gsm8k_gold, id_prefix="gsm8k")
