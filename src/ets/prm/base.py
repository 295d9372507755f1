"""The RewardModel interface: score every step of a path."""

from __future__ import annotations

import contextvars
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from ets.tree import Node


# The counters of the problem whose search runs in this context: ets.runner.run_jobs sets a dict
# per problem, and a PRM that counts the tokens it reads charges them there as it scores
# (`charge("prm_tokens", n)`), so each problem gets its own count however many are in flight.
PROBLEM_COUNTERS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ets_problem_counters", default=None)


def charge(key: str, n: int | float) -> None:
    """Add n to the running problem's counter `key` (nothing outside a problem's search)."""
    counters = PROBLEM_COUNTERS.get()
    if counters is not None:
        counters[key] = counters.get(key, 0) + n


class PRMError(RuntimeError):
    """A PRM could not score a step: never silently dropped (SPEC section 1)."""


@dataclass(frozen=True)
class Reference:
    """A problem's answer key, handed to a PRM only where the search is told to (ets.runner does
    for every problem): `gold` the final answer, `solution` the reference solution's text (GSM8K:
    with its <<a*b=c>> annotations) or None, `numeric` how the task grades. Real PRMs ignore it;
    the reference PRM (ets.prm.reference), a benchmarking instrument, reads it."""

    gold: str
    solution: str | None = None
    numeric: bool = False


@dataclass(frozen=True)
class ScoreRequest:
    """Score the path root -> `node`: its steps are `node.path()` (texts: `node.step_texts()`)."""

    question: str
    node: Node
    reference: Reference | None = None


class RewardModel(ABC):
    """Contract: `score(requests)` returns, per request and in order, one float per step of the
    path (len == node.depth), aligned with the steps; the last is the node's score. Scores are
    finite; a step that could not be scored raises PRMError naming the step. The call is async
    and batched: all children of a depth are scored in one call."""

    name: str = "prm"

    @abstractmethod
    async def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]: ...

    def stats(self) -> dict:
        return {}

    async def aclose(self) -> None:
        return None
