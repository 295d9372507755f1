"""The reference-guided PRM: a benchmarking instrument that KNOWS THE ANSWERS.

It reads each problem's answer key, which no real search has, so it is never a default and its
name (`reference(noise=X)`) is in every record, table and plot made with it. It exists to make
PRM quality a dial: `noise` mixes seeded Gaussian noise into its logits, and the quality that
results is measured (`ets worth`) as the AUROC of its scores on saved trees, so a strategy can be
compared under PRMs of known quality (docs/results.md).

GSM8K's gold solutions carry calculator annotations, `<<48/2=24>>`: their results are the
solution's intermediate values G (the final answer among them). Values the question already
states are free (restating the question proves nothing), so the targets are T = G - Q, Q the
question's numbers. For step i of a path, with S_i the numbers stated in steps 1..i:
    reached_i = |S_i & T| / |T|                          (0 when T is empty)
    strays_i  = #results of steps 1..i (numbers right of an "=") in neither G nor Q
    logit_i   = 4 * reached_i - 3 * strays_i / (strays_i + 1) - 1          in (-4, 3]
and a step that states a final answer scores by whether it is right, graded by the task's own
grader, with the path's progress kept so that a softmax still has something to weigh:
    logit_i   = 3 + reached_i  (right)   |   -3 - strays_i / (strays_i + 1)  (wrong)
score_i = sigmoid(logit_i + noise * z), z ~ N(0, 1) drawn from a hash of (seed, question, steps
1..i): the same path gets the same score wherever and whenever it is scored, and a step's score
depends only on the path up to it, as a causal PRM's does.

Without annotations (other data sets) T is empty and strays are not counted: open steps get the
neutral logit -1 and final answers are scored right or wrong.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from typing import Sequence

from ets.prm.base import PRMError, Reference, RewardModel, ScoreRequest
from ets.prm.registry import Option, PRMKind, SpecError, register

_ANNOTATION = re.compile(r"<<[^<>=]*=([^<>]*)>>")
# a number as written in a solution: optional sign, digits with thousands commas, decimals
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\d])")
_RESULT = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def _value(text: str) -> float | None:
    t = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _key(v: float) -> float:
    return round(v, 6)


def numbers(text: str) -> set[float]:
    """Every number written in `text` ("1,200", "$18", "0.5"), as rounded floats."""
    out = set()
    for m in _NUMBER.finditer(text):
        v = _value(m.group(0))
        if v is not None:
            out.add(_key(v))
    return out


def results(text: str) -> list[float]:
    """The numbers `text` states as results: right after an "=" sign."""
    out = []
    for m in _RESULT.finditer(text):
        v = _value(m.group(1))
        if v is not None:
            out.append(_key(v))
    return out


def gold_values(solution: str | None) -> set[float]:
    """The results of a GSM8K gold solution's calculator annotations <<expr=value>>."""
    out = set()
    for m in _ANNOTATION.finditer(solution or ""):
        v = _value(m.group(1))
        if v is not None:
            out.add(_key(v))
    return out


class ReferencePRM(RewardModel):
    """See the module docstring. `noise`: standard deviation of the noise added to each logit
    (0: the clean instrument). `seed`: the run's seed (the noise is a function of it and the path)."""

    uses_answer_key = True

    def __init__(self, noise: float = 0.0, seed: int = 0):
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0, got {noise}")
        self.noise, self.seed = float(noise), int(seed)
        self.name = f"reference(noise={self.noise:g})"
        self.calls = self.paths = 0

    def logits(self, question: str, steps: Sequence[str], ref: Reference) -> list[float]:
        """The clean logit of every step of a path (module docstring)."""
        from ets.extract import extract_answer
        from ets.tasks.grading import equivalent

        q = numbers(question)
        gold = gold_values(ref.solution)
        targets = gold - q
        stated: set[float] = set()
        strays = 0
        out = []
        for text in steps:
            stated |= numbers(text)
            if gold:
                strays += sum(1 for v in results(text) if v not in gold and v not in q)
            reached = len(stated & targets) / len(targets) if targets else 0.0
            stray = strays / (strays + 1)
            answer = extract_answer(text)
            if answer is None:
                out.append(4.0 * reached - 3.0 * stray - 1.0)
            elif equivalent(answer, ref.gold, ref.numeric):
                out.append(3.0 + reached)
            else:
                out.append(-3.0 - stray)
        return out

    def _z(self, question: str, steps: Sequence[str]) -> float:
        h = hashlib.blake2b(repr((self.seed, question, tuple(steps))).encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(h, "little")).gauss(0.0, 1.0)

    def path_scores(self, question: str, steps: Sequence[str], ref: Reference) -> list[float]:
        scores = []
        for i, logit in enumerate(self.logits(question, steps, ref)):
            x = logit + (self.noise * self._z(question, steps[: i + 1]) if self.noise else 0.0)
            scores.append(1.0 / (1.0 + math.exp(-x)))
        return scores

    async def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self.calls += 1
        self.paths += len(requests)
        out = []
        for r in requests:
            if r.reference is None:
                raise PRMError("the reference PRM reads each problem's answer key, and this search was given "
                               "none: run it through `ets run`/`ets compare` on a data set with gold answers")
            out.append(self.path_scores(r.question, r.node.step_texts(), r.reference))
        return out

    def stats(self) -> dict:
        return {"prm_calls": self.calls, "prm_paths": self.paths}


def _build(spec, ctx):
    return ReferencePRM(noise=spec.get("noise"), seed=ctx.seed)


def _check(spec) -> None:
    if spec.get("noise") < 0:
        raise SpecError(f"--prm {spec}: noise must be >= 0 (0 = the clean instrument)")


register(PRMKind(
    "reference", "KNOWS THE ANSWERS (a benchmarking instrument, never for real use): each step by how the "
    "values the path has stated agree with the gold solution's <<a*b=c>> results, a final answer by the "
    "grader; `noise` (logit units) sets its quality", ("none",), _build,
    options=(Option("noise", float, 0.0, "standard deviation of the seeded noise added to each step's logit"),),
    check=_check, uses_answer_key=True,
    tested="hand-computed logits on planted GSM8K paths, noise determinism (tests/test_prm_reference.py)"))
