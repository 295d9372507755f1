"""Grading by mathematical equivalence (SPEC section 4), never by string equality alone.

`equivalent(answer, gold)` parses both sides with math-verify (`math_verify.parse`) and compares
them with `math_verify.verify` (sympy: fractions = decimals, intervals, sets, tuples, percent,
LaTeX spacing, `\\dfrac`, `\\left(`...). `numeric=True` first normalises GSM8K-style answers to a
plain number (commas, `$`, units, trailing `.0`, percent), then compares with math-verify too.

math-verify guards parsing with SIGALRM timeouts, which only work in the main thread; elsewhere
the timeouts are switched off (a pathological expression could then be slow, not wrong).
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


# Generous: a timeout makes math-verify answer "not equal", so a busy machine must not turn a
# right answer wrong; only pathological expressions ever come near it.
TIMEOUT_S = 60


# Longest answer handed to math-verify: a real final answer is short; a pathological one (a
# 16,000-character boxed expression) would take seconds to parse. Longer ones are compared as
# text only (whitespace removed), so they are wrong unless they are the gold verbatim.
MAX_PARSE_CHARS = 500


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _wrap(expr: str) -> str:
    """math-verify finds LaTeX between delimiters; a bare answer gets `$...$` around it."""
    expr = expr.strip()
    if expr.startswith("$") or expr.startswith("\\(") or expr.startswith("\\["):
        return expr
    return f"${expr}$"


@lru_cache(maxsize=65536)
def _parse(expr: str):
    from math_verify import parse

    return parse(_wrap(expr), parsing_timeout=_timeout())


def normalize_number(text: str) -> str | None:
    """GSM8K numeric normalisation: the number a short answer states, as a plain string.

    "$1,234.00" -> "1234", "18 dollars" -> "18", "50%" -> "50", "\\$5" -> "5", "-3.50" -> "-3.5",
    "\\frac{3}{4}" -> "3/4". Returns None when the text holds no number, or several different
    ones (e.g. "3 or 4": not a single answer)."""
    s = _TEXT.sub(r" \1 ", text)
    s = s.replace("\\$", " ").replace("$", " ").replace("\\%", " ").replace("%", " ")
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", "")
    s = re.sub(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}", r"\1/\2", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators only
    nums = [_canon(n) for n in _NUMBER.findall(s)]
    if not nums or len(set(nums)) > 1:
        return None
    return nums[0]


def _canon(num: str) -> str:
    if "/" in num:
        return num
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return "0" if num in ("-0", "") else num


def gsm8k_gold(answer_field: str) -> str:
    """GSM8K's gold answer: the number after `####`."""
    if "####" not in answer_field:
        raise ValueError("a GSM8K answer must end with '#### <number>'")
    return answer_field.rsplit("####", 1)[1].strip().replace(",", "")


@lru_cache(maxsize=65536)
def equivalent(answer: str | None, gold: str | None, numeric: bool = False) -> bool:
    """True when `answer` and `gold` are mathematically the same (math-verify).

    numeric: GSM8K mode; both sides are first reduced to a plain number by `normalize_number`
    (falling back to the raw text when that finds no single number)."""
    if answer is None or gold is None or not answer.strip() or not gold.strip():
        return False
    if numeric:
        answer = normalize_number(answer) or answer
        gold = normalize_number(gold) or gold
    if len(answer) > MAX_PARSE_CHARS or len(gold) > MAX_PARSE_CHARS:
        return re.sub(r"\s+", "", answer) == re.sub(r"\s+", "", gold)
    from math_verify import verify

    try:
        g, a = _parse(gold), _parse(answer)
    except (RecursionError, MemoryError, ValueError):  # hostile text: not equal, the run goes on
        return False
    if not g or not a:
        # math-verify could not read one side: fall back to exact text after whitespace removal
        return re.sub(r"\s+", "", answer) == re.sub(r"\s+", "", gold)
    try:
        return bool(verify(g, a, timeout_seconds=_timeout()))
    except (RecursionError, MemoryError, ValueError):
        return False
