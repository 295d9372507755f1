"""GSM8K train split (7,473 problems; openai/grade-school-math, MIT licence; see
data/LICENSES.md): the data `ets train-prm` learns from by default, never the test split.
Gold = the number after `####`; graded numerically, as the test split."""

from __future__ import annotations

from pathlib import Path

from ets.tasks.base import Problem, Task
from ets.tasks.grading import gsm8k_gold
from ets.tasks.jsonl import read_jsonl

DATA = Path(__file__).parent / "data" / "gsm8k_train.jsonl"
TASK = Task("gsm8k", numeric=True)


def load() -> list[Problem]:
    """All problems, ids `gsm8k-train-<index>` (0-based position in the train split)."""
    return read_jsonl(DATA, "question", "answer", gold=gsm8k_gold, id_prefix="gsm8k-train")
