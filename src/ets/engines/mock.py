"""A deterministic, seedable mock policy: the whole search loop on CPU in milliseconds.

Each child step is a pure function of (seed, parent sequence, child index), so results do not
depend on batching or order. Steps are drawn from a small phrase book so that identical and
near-identical steps occur (as real samples do), which gives clustering something to find.
A step finishes the solution with a probability that grows with depth, boxing an answer that
is right with probability `p_correct`."""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from ets.engines.sampling import SamplingConfig
from ets.engines.base import DELIMITER, EOS, LENGTH, Expansion, Policy, Step

PHRASES = [
    "First compute the total cost", "Next add the two amounts", "Subtract the discount",
    "Multiply by the number of days", "Divide the sum by four", "Check the units again",
    "Now find the remaining money", "Convert hours to minutes", "Let x be the unknown amount",
    "So the difference is small", "Compute half of the total", "Add the tax to the price",
]


def _word_id(word: str) -> int:
    return 10 + int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % 30000


def tokenize(text: str) -> list[int]:
    """Mock tokenizer: one id per whitespace-separated word (the delimiter is its own token)."""
    return [_word_id(w) for w in text.replace("\n\n", " \n\n ").split(" ") if w]


class MockPolicy(Policy):
    name = "mock"
    eos_token_id = 2

    def __init__(self, seed: int = 0, answer: str = "42", p_correct: float = 0.5,
                 finish_rate: float = 0.15, never_delimit: bool = False):
        self.seed, self.answer, self.p_correct = seed, answer, p_correct
        self.finish_rate, self.never_delimit = finish_rate, never_delimit
        self.calls = 0
        self.released: set[int] = set()

    def format_prompt(self, question: str) -> tuple[list[int], str]:
        text = f"Question: {question}\nAnswer step by step.\n\n"
        return tokenize(text), text

    def _step(self, parent_ids: list[int], depth: int, k: int, sampling: SamplingConfig) -> Step:
        key = hashlib.blake2b(repr((self.seed, parent_ids, k)).encode(), digest_size=8).digest()
        rng = random.Random(key)
        text = rng.choice(PHRASES[: 4 + depth % 8])
        if rng.random() < 0.5:
            text += f" giving {rng.randint(1, 9)}"
        finished = rng.random() < self.finish_rate * depth
        if finished:
            ans = self.answer if rng.random() < self.p_correct else str(rng.randint(1, 99))
            text += f" so the answer is \\boxed{{{ans}}}"
        if self.never_delimit:
            ids = tokenize(text + " and so on" * 50)[: sampling.max_step_tokens]
            return Step(tuple(ids), " ".join(["w"] * len(ids)), LENGTH)
        text += sampling.step_delimiter
        ids = tokenize(text)[: sampling.max_step_tokens]
        reason = EOS if finished and rng.random() < 0.5 else DELIMITER
        return Step(tuple(ids), text, reason, tuple(-rng.random() for _ in ids))

    async def expand(self, requests: Sequence[Expansion], sampling: SamplingConfig) -> list[list[Step]]:
        self.calls += 1
        out = []
        for req in requests:
            ids = req.node.path_token_ids()
            out.append([self._step(ids, req.node.depth + 1, k, sampling) for k in range(req.n)])
        return out

    def release(self, nodes) -> None:
        self.released.update(n.id for n in nodes)

    def stats(self) -> dict:
        return {"policy_calls": self.calls}
