"""The default offline PRM: arithmetic checking + the policy's own token confidence.

What it IS: a rule-based process reward for arithmetic word problems (GSM8K-like). For every
step of a path it (1) finds the arithmetic statements the step makes ("3 * 4 = 12",
"$1,200 / 4 = $300", "12 apples + 5 apples = 17 apples", "2 x 3 = 6", "\\frac{6}{2} = 3") and
checks them exactly, and (2) reads the policy's confidence in the step, the geometric-mean
probability of its tokens (from `node.logprobs`). Errors count against every later step of the
path too, so the last score (the node's weight in the search) remembers earlier mistakes.

What it is NOT: a learned verifier. It cannot tell whether a correct computation is the right
one for the problem, whether the reasoning is relevant, or whether a step without arithmetic is
any good; those steps get only the confidence term and a neutral arithmetic term. It needs no
model and no network, so it runs everywhere, and it gives the search a real (if weak) signal.

Score of step i (in [0, 1]):
    arith_i = penalty ** E_i * (C_i + 1) / (C_i + 2)
              (C_i, E_i: correct / wrong statements in steps 1..i; 0.5 when none yet)
    conf_i  = exp(mean token log-prob of step i)  (0.5 when the engine gave no log-probs)
    s_i     = arith_weight * arith_i + (1 - arith_weight) * conf_i
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Sequence

from ets.prm.base import RewardModel, ScoreRequest
from ets.prm.registry import Option, PRMKind, register

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
# maximal runs of arithmetic characters (linear time: no nested quantifiers)
_RUN = re.compile(r"[-+*/().\d\s=]+")


def normalise(text: str) -> str:
    """Arithmetic-friendly text: no currency, thousands separators, units inside expressions;
    one spelling per operator."""
    t = text.replace("\\$", "").replace("$", "")
    t = re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"((\1)/(\2))", t)
    for a, b in (("\\times", "*"), ("\\cdot", "*"), ("×", "*"), ("·", "*"), ("\\div", "/"), ("÷", "/"),
                 ("−", "-"), ("\\left", ""), ("\\right", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", "")):
        t = t.replace(a, b)
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)  # 1,200 -> 1200
    t = re.sub(r"(?<=\d)\s*[xX]\s*(?=[\d(])", " * ", t)  # 3 x 4 -> 3 * 4
    # a unit word (or two) between a number and an operator: "12 apples + 5 apples = 17 apples"
    t = re.sub(r"(?<=\d)\s*(?:[A-Za-z]+\s+){0,1}[A-Za-z]+\s*(?=[-+*/=](?!\w))", " ", t)
    t = re.sub(r"(?<=\d)%", "/100", t)
    return t


# Longest side of a statement that is checked: real ones are short; a 5,000-term chain would
# cost time and recursion depth, so it is not checked (neither right nor wrong).
MAX_EXPR_CHARS = 300


def evaluate(expr: str) -> float | None:
    """Value of a plain arithmetic expression (numbers, + - * /, parentheses), else None (also
    for one longer than MAX_EXPR_CHARS, or nested too deep)."""
    if len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        return None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        raise ValueError("not arithmetic")

    try:
        value = ev(tree)
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def _close(a: float, b: float, shown: str) -> bool:
    """a == b up to float error, or up to the rounding of the written number `shown`."""
    if math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9):
        return True
    m = re.search(r"\.(\d+)\s*$", shown.strip())
    decimals = len(m.group(1)) if m else 0
    return abs(a - b) <= 0.5 * 10 ** -decimals + 1e-9 and decimals > 0


def check_arithmetic(text: str) -> tuple[int, int]:
    """(correct, wrong) arithmetic statements in `text`. A statement is each `=` of a chain
    whose sides are arithmetic and at least one side has an operator. The running-total style
    "3 * 4 = 12 + 5 = 17" is accepted: a left side may equal the right side's leading number."""
    correct = wrong = 0
    for run in _RUN.finditer(normalise(text)):
        if "=" not in run.group(0):
            continue
        parts = run.group(0).split("=")
        parts[0] = re.sub(r"^[\s.)*/+=]+", "", parts[0])  # sentence punctuation before the expression
        for left, right in zip(parts, parts[1:]):
            if not re.search(r"\d\s*[-+*/]\s*[\d(]|\)\s*[-+*/]", left + " " + right):
                continue
            lv, rv = evaluate(left), evaluate(right)
            if lv is None or rv is None:
                continue
            lead = re.match(r"\s*(-?[\d.]+)", right)
            ok = _close(lv, rv, right) or (lead is not None and evaluate(lead.group(1)) is not None
                                          and _close(lv, evaluate(lead.group(1)), lead.group(1)))
            correct, wrong = correct + ok, wrong + (not ok)
    return correct, wrong


def confidence(logprobs: Sequence[float] | None) -> float | None:
    """Geometric-mean token probability of a step, or None without log-probs."""
    if not logprobs:
        return None
    return math.exp(sum(logprobs) / len(logprobs))


class DefaultPRM(RewardModel):
    """Offline rule-based PRM (see module docstring). Deterministic; needs no model."""

    name = "default"

    def __init__(self, arith_weight: float = 0.7, penalty: float = 0.25):
        if not 0 <= arith_weight <= 1 or not 0 <= penalty <= 1:
            raise ValueError("arith_weight and penalty must lie in [0, 1]")
        self.arith_weight, self.penalty = arith_weight, penalty
        self.calls = self.paths = 0

    def path_scores(self, steps: Sequence[str], logprobs: Sequence[Sequence[float] | None]) -> list[float]:
        scores, c_tot, e_tot = [], 0, 0
        for text, lps in zip(steps, logprobs):
            c, e = check_arithmetic(text)
            c_tot, e_tot = c_tot + c, e_tot + e
            arith = self.penalty ** e_tot * (c_tot + 1) / (c_tot + 2)
            conf = confidence(lps)
            conf = 0.5 if conf is None else conf
            scores.append(self.arith_weight * arith + (1 - self.arith_weight) * conf)
        return scores

    async def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self.calls += 1
        self.paths += len(requests)
        out = []
        for req in requests:
            path = req.node.path()
            out.append(self.path_scores([n.text for n in path], [n.logprobs for n in path]))
        return out

    def stats(self) -> dict:
        return {"prm_calls": self.calls, "prm_paths": self.paths}


def _build(spec, ctx):
    return DefaultPRM(arith_weight=spec.get("arith_weight"), penalty=spec.get("penalty"))


register(PRMKind(
    "default", "the policy's own token confidence and exact checks of the arithmetic each step states "
    "(no model); the embedded default", ("none",), _build,
    options=(Option("arith_weight", float, 0.7, "weight of the arithmetic term (the rest: confidence)"),
             Option("penalty", float, 0.25, "factor per wrong statement so far")),
    tested="hand-computed scores on planted statements (tests/test_prm_default.py)"))
