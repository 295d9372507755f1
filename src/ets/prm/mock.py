"""A deterministic, seedable mock PRM: score = hash of (seed, path) in (0, 1), nudged up for
steps that box the mock policy's right answer, so voting has a signal to find."""

from __future__ import annotations

import hashlib
from typing import Sequence

from ets.prm.base import RewardModel, ScoreRequest, charge
from ets.prm.registry import PRMKind, register


class MockPRM(RewardModel):
    name = "mock-prm"

    def __init__(self, seed: int = 0, answer: str = "42", drop_last_for: str | None = None):
        self.seed, self.answer = seed, answer
        self.drop_last_for = drop_last_for  # a substring: paths whose last step has it lose a score
        self.calls = self.paths = self.tokens = 0

    def _score(self, texts: list[str]) -> float:
        h = hashlib.blake2b(repr((self.seed, texts)).encode(), digest_size=8).digest()
        u = int.from_bytes(h, "little") / 2**64
        if f"\\boxed{{{self.answer}}}" in texts[-1]:
            u = 0.5 + 0.5 * u
        return round(u, 6)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self.calls += 1
        out = []
        for req in requests:
            texts = req.node.step_texts()
            # input tokens as the mock tokenizer counts them: words of the question and the steps
            n = len(" ".join([req.question, *texts]).split())
            self.paths, self.tokens = self.paths + 1, self.tokens + n
            charge("prm_tokens", n)
            scores = [self._score(texts[: i + 1]) for i in range(len(texts))]
            if self.drop_last_for and self.drop_last_for in texts[-1]:
                scores = scores[:-1]
            out.append(scores)
        return out

    def stats(self) -> dict:
        return {"prm_calls": self.calls, "prm_paths": self.paths, "prm_tokens": self.tokens}


register(PRMKind(
    "mock", "a seeded hash of (seed, path) in (0, 1), raised for a step that boxes the mock policy's "
    "answer 42 (no model; for tests and smoke runs)", ("none",), lambda spec, ctx: MockPRM(seed=ctx.seed),
    tested="tests/test_strategies.py, tests/test_cli.py (every mock run)"))
