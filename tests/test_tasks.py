"""Data sets: bundled GSM8K / MATH500, local JSONL with a field mapping, validation."""

import json
from pathlib import Path

import pytest

import ets.tasks
from ets.tasks import DatasetError, load_dataset


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_bundled():
    task, problems = load_dataset("gsm8k")
    assert len(problems) == 1319 and task.numeric
    assert problems[0].id == "gsm8k-0" and problems[0].gold == "18"
    assert "Janet" in problems[0].question
    assert all(p.gold and "####" not in p.gold for p in problems)


def test_math500_bundled():
    task, problems = load_dataset("math500")
    assert len(problems) == 500 and not task.numeric
    assert problems[0].id == "test/precalculus/807.json"
    assert problems[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert problems[0].meta["subject"] == "Precalculus"


def test_licences_shipped():
    data = Path(ets.tasks.__file__).parent / "data"
    text = (data / "LICENSES.md").read_text()
    assert "openai/grade-school-math" in text and "Hendrycks" in text and text.count("MIT License") == 2


def test_limit_offset_ids():
    _, ps = load_dataset("gsm8k", limit=3, offset=2)
    assert [p.id for p in ps] == ["gsm8k-2", "gsm8k-3", "gsm8k-4"]
    _, ps = load_dataset("gsm8k", ids=["gsm8k-7", "gsm8k-1"])
    assert [p.id for p in ps] == ["gsm8k-7", "gsm8k-1"]
    with pytest.raises(DatasetError, match="unknown problem id"):
        load_dataset("gsm8k", ids=["nope"])


def test_prompt_asks_for_boxed():
    task, ps = load_dataset("gsm8k", limit=1)
    prompt = task.prompt(ps[0])
    assert prompt.startswith(ps[0].question.strip()) and "\\boxed{}" in prompt


def test_task_evaluate():
    task, ps = load_dataset("gsm8k", limit=1)
    assert task.evaluate(ps[0], "She earns 9 * 2 = 18 dollars.\n\nThe answer is \\boxed{\\$18}.")
    assert not task.evaluate(ps[0], "So \\boxed{19}")


def test_jsonl_field_mapping(tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", [{"q": "1+1?", "a": "2", "key": "a1"}, {"q": "half?", "a": "\\frac12", "key": "a2"}])
    task, ps = load_dataset(str(f), question_field="q", answer_field="a", id_field="key")
    assert [p.id for p in ps] == ["a1", "a2"] and ps[1].gold == "\\frac12" and not task.numeric
    assert task.grade("0.5", ps[1].gold)


def test_jsonl_gsm8k_style_is_numeric(tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [{"question": "x?", "answer": "work\n#### 1,200"}])
    task, ps = load_dataset(str(f))
    assert task.numeric and ps[0].gold == "1200" and ps[0].id == "g-0"


def test_malformed_lines_reported_with_line_numbers(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "ok", "answer": "1"},
        '{"question": "broken", "answer": ',  # line 2: bad JSON
        {"question": "no answer"},  # line 3: missing field
        "",  # line 4: blank, fine
        "[1, 2]",  # line 5: not an object
        {"question": "ok too", "answer": "2"},
    ])
    with pytest.raises(DatasetError) as e:
        load_dataset(str(f))
    msg = str(e.value)
    assert f"{f}:2:" in msg and f"{f}:3:" in msg and f"{f}:5:" in msg
    assert f"{f}:1:" not in msg and f"{f}:6:" not in msg
    assert "3 malformed" in msg and "nothing was run" in msg


def test_duplicate_ids_rejected(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "question": "a", "answer": "1"},
                                          {"id": "x", "question": "b", "answer": "2"}])
    with pytest.raises(DatasetError, match=r"d.jsonl:2: duplicate id 'x' \(first on line 1\)"):
        load_dataset(str(f), id_field="id")


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="neither a bundled one"):
        load_dataset("no-such-set")
