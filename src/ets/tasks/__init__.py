"""Data sets and grading.

    from ets.tasks import load_dataset, grade
    task, problems = load_dataset("gsm8k", limit=5)  # bundled: "gsm8k", "gsm8k-train", "math500"
    task, problems = load_dataset("my.jsonl", question_field="q", answer_field="a", id_field="id")
    task.prompt(problems[0])        # question + "put your final answer within \\boxed{}"
    task.grade("\\frac12", "0.5")   # math-verify equivalence (GSM8K: numeric normalisation first)

`load_dataset(name_or_path, limit=None, offset=0, ids=None, question_field="question",
answer_field="answer", id_field=None, numeric=None) -> (Task, list[Problem])`:
- the whole file is validated first (DatasetError names file:line of every bad line);
- then `ids` (keep those, in the given order; unknown ids are an error), else
  `problems[offset : offset + limit]`.
- a local JSONL whose answers end in `#### <number>` is read GSM8K-style (gold = that number,
  numeric grading) unless `numeric` says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ets.tasks import gsm8k, gsm8k_train, math500
from ets.tasks.base import BOXED_INSTRUCTION, DatasetError, Problem, Task
from ets.tasks.grading import equivalent, gsm8k_gold, normalize_number
from ets.tasks.jsonl import read_jsonl

BUILTIN = {"gsm8k": gsm8k, "gsm8k-train": gsm8k_train, "math500": math500}


def grade(answer: str | None, gold: str, numeric: bool = False) -> bool:
    """Mathematical equivalence of an answer and a gold answer (see ets.tasks.grading)."""
    return equivalent(answer, gold, numeric)


def load_dataset(name_or_path: str, limit: int | None = None, offset: int = 0,
                 ids: Sequence[str] | None = None, question_field: str = "question",
                 answer_field: str = "answer", id_field: str | None = None,
                 numeric: bool | None = None) -> tuple[Task, list[Problem]]:
    if name_or_path in BUILTIN:
        mod = BUILTIN[name_or_path]
        task, problems = mod.TASK, mod.load()
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise DatasetError(f"unknown data set {name_or_path!r}: neither a bundled one "
                               f"({', '.join(BUILTIN)}) nor an existing JSONL file")
        if numeric is None:
            numeric = _ends_with_hashes(path, answer_field)
        gold = gsm8k_gold if numeric else str.strip
        problems = read_jsonl(path, question_field, answer_field, id_field,
                              gold=_lenient(gold) if numeric else gold)
        task = Task(path.stem, numeric=numeric)
    return task, select(problems, limit, offset, ids)


def select(problems: list[Problem], limit: int | None = None, offset: int = 0,
           ids: Sequence[str] | None = None) -> list[Problem]:
    if offset < 0 or (limit is not None and limit < 0):
        raise DatasetError(f"offset and limit must be >= 0, got {offset}, {limit}")
    if ids:
        by_id = {p.id: p for p in problems}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DatasetError(f"unknown problem id(s) {missing[:5]}; ids look like {problems[0].id!r}")
        return [by_id[i] for i in ids]
    end = None if limit is None else offset + limit
    return problems[offset:end]


def _ends_with_hashes(path: Path, field: str) -> bool:
    import json

    if not path.is_file():
        return False  # read_jsonl reports it
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    return "####" in str(json.loads(line).get(field, ""))
                except (json.JSONDecodeError, AttributeError):
                    return False  # read_jsonl reports the bad line
    return False


def _lenient(gold):
    """GSM8K gold, but a plain number without #### is accepted as it is."""
    def read(text: str) -> str:
        return gold(text) if "####" in text else text.strip().replace(",", "")
    return read


__all__ = ["BOXED_INSTRUCTION", "BUILTIN", "DatasetError", "Problem", "Task", "equivalent", "grade",
           "gsm8k_gold", "load_dataset", "normalize_number", "read_jsonl", "select"]
