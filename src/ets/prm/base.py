"""The RewardModel interface: score every step of a path."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from ets.tree import Node


class PRMError(RuntimeError):
    """A PRM could not score a step: never silently dropped (SPEC section 1)."""


@dataclass(frozen=True)
class ScoreRequest:
    """Score the path root -> `node`: its steps are `node.path()` (texts: `node.step_texts()`)."""

    question: str
    node: Node


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
