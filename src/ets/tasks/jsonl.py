"""Any local JSONL file as a data set: one JSON object per line, fields chosen by name.

Every line is validated before anything runs; all problems found are reported together, each
with its file and line number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ets.tasks.base import DatasetError, Problem

MAX_REPORTED = 10


def read_jsonl(path: str | Path, question_field: str = "question", answer_field: str = "answer",
               id_field: str | None = None, gold: Callable[[str], str] = str.strip,
               id_prefix: str | None = None) -> list[Problem]:
    """Problems from `path`, in file order. Blank lines are skipped.

    id: the `id_field` value when given, else `<id_prefix or file stem>-<index>` (index of the
    problem in the file, from 0). gold: `gold(answer text)`; numbers are turned into text.
    Raises DatasetError naming `path:line` for malformed JSON, non-objects, missing or empty
    fields, a gold that cannot be read, and duplicate ids."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path} is a directory: --dataset takes a JSONL file (or gsm8k, math500)")
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if not path.is_file():  # a FIFO, socket or device: read once, or forever; never a data set
        raise DatasetError(f"{path} is not a regular file (a FIFO, socket or device): --dataset takes a JSONL "
                           "file saved on disk (or gsm8k, math500)")
    prefix = id_prefix or path.stem
    problems: list[Problem] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    index = -1  # position among the non-blank lines
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                index += 1
                errors.append(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                              "save the file as UTF-8")
                continue
            if not line.strip():
                continue
            index += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
                continue
            bad = [k for k in (question_field, answer_field, id_field)
                   if k and (k not in obj or not isinstance(obj[k], (str, int, float)) or str(obj[k]).strip() == "")]
            if bad:
                errors.append(f"{where}: missing or empty field(s) {bad} (fields present: {sorted(obj)})")
                continue
            try:
                gold_text = gold(str(obj[answer_field]))
            except ValueError as e:
                errors.append(f"{where}: cannot read the gold answer from {answer_field!r}: {e}")
                continue
            pid = str(obj[id_field]) if id_field else f"{prefix}-{index}"
            if pid in seen:
                errors.append(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
                continue
            seen[pid] = lineno
            meta = {k: v for k, v in obj.items() if k not in (question_field,)}
            problems.append(Problem(pid, str(obj[question_field]), gold_text, meta, str(obj[answer_field])))
    if len(errors) == 1:
        raise DatasetError(f"{errors[0]}; nothing was run")
    if errors:
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise DatasetError(f"{len(errors)} malformed line(s) in {path}; nothing was run:\n  "
                           + "\n  ".join(errors[:MAX_REPORTED]) + more)
    if not problems:
        raise DatasetError(f"{path}: no problems in the file")
    return problems
