"""Grading by mathematical equivalence (SPEC 4): tricky cases both ways."""

import pytest

from ets.tasks import grade, gsm8k_gold, normalize_number

MATH_SAME = [
    ("\\frac{1}{2}", "0.5"), ("\\dfrac12", "\\frac{1}{2}"), ("\\tfrac{3}{4}", "0.75"),
    ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("[1,2)", "[1, 2)"), ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\{1,2\\}", "\\{2,1\\}"), ("50\\%", "0.5"), ("x^2+2x+1", "(x+1)^2"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("10", "10 \\text{ cm}"), ("5", "5.0"), ("1,2", "2,1"),
]
MATH_DIFFERENT = [
    ("(1,2]", "[1,2)"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("\\{1,2\\}", "\\{1,3\\}"), ("x+1", "x-1"),
    ("3", "\\text{(C)}"), ("12", "1,2"),
]


@pytest.mark.parametrize("gold,answer", MATH_SAME)
def test_math_equivalent(gold, answer):
    assert grade(answer, gold)
    assert grade(gold, answer)


@pytest.mark.parametrize("gold,answer", MATH_DIFFERENT)
def test_math_not_equivalent(gold, answer):
    assert not grade(answer, gold)


GSM_SAME = [
    ("1000", "1,000"), ("1000", "\\$1,000.00"), ("18", "18 dollars"), ("18", "$18"), ("50", "50%"),
    ("50", "50\\%"), ("5", "5.0"), ("-3", "-3"), ("0.5", "\\frac{1}{2}"), ("1234567", "1,234,567"),
    ("70", "70 \\text{ miles}"), ("3", "3 hours"),
]
GSM_DIFFERENT = [("18", "17"), ("1000", "100"), ("5", "50%"), ("18", None), ("18", ""), ("3", "3 or 4")]


@pytest.mark.parametrize("gold,answer", GSM_SAME)
def test_gsm8k_numeric(gold, answer):
    assert grade(answer, gold, numeric=True)


@pytest.mark.parametrize("gold,answer", GSM_DIFFERENT)
def test_gsm8k_numeric_wrong(gold, answer):
    assert not grade(answer, gold, numeric=True)


def test_not_string_equality():
    # different strings, same number: a string comparison would fail these
    assert grade("0.50", "\\frac{1}{2}") and grade("1{,}000", "1000", numeric=True)


def test_normalize_number():
    assert normalize_number("\\$1,234.50 per week") == "1234.5"
    assert normalize_number("-7.000") == "-7"
    assert normalize_number("no number") is None
    assert normalize_number("3 or 4") is None


def test_gsm8k_gold():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_gold("...\n#### 1,200") == "1200"
    with pytest.raises(ValueError):
        gsm8k_gold("no hashes here")
