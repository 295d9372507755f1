"""What every model PRM shares: step scores cached by path prefix, and forwards off the event loop.

A PRM is causal: the score of step k depends only on the question and steps 1..k. So every score
a forward gives is kept under (question, steps 1..k), and a path whose every prefix is cached is
never encoded or sent again (a search scores each child once, but ETS/REBASE rescore nothing,
and `ets worth` rescoring saved trees meets each prefix many times).

In-process PRMs run their forwards in ONE worker thread (`in_worker`), never on the event loop,
so problems in flight keep generating while a PRM computes; one thread keeps the PRM's memory
and CPU use bounded and serialises use of the one model.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

Path = tuple[str, tuple[str, ...]]  # (question, step texts)

_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ets-prm")


async def in_worker(fn: Callable, *args):
    """fn(*args) in the PRM worker thread, awaited."""
    return await asyncio.get_running_loop().run_in_executor(_WORKER, fn, *args)


class PrefixCache:
    """LRU of step scores by path prefix. `todo(paths)`: the distinct paths some prefix of which is
    not cached, in first-seen order; `store(path, scores)`: the scores of every step of `path`;
    `scores(path)`: all of them (KeyError if one was evicted: the cache is smaller than a batch)."""

    def __init__(self, size: int = 200_000):
        if size < 1:
            raise ValueError(f"cache size must be >= 1, got {size}")
        self.size = size
        self._d: OrderedDict[tuple, float] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> float | None:
        """The cached score of the last step of the prefix `key` = (question, steps), or None."""
        return self._get(key)

    def _get(self, key: tuple) -> float | None:
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        return None

    def todo(self, paths: Sequence[Path]) -> list[Path]:
        out: dict[Path, None] = {}
        for q, steps in paths:
            if any(self._get((q, steps[: k + 1])) is None for k in range(len(steps))):
                out[(q, steps)] = None
                self.misses += 1
            else:
                self.hits += 1
        return list(out)

    def store(self, path: Path, scores: Sequence[float]) -> None:
        q, steps = path
        if len(scores) != len(steps):
            raise ValueError(f"{len(scores)} scores for a path of {len(steps)} steps")
        for k, s in enumerate(scores):
            self._d[(q, steps[: k + 1])] = float(s)
            self._d.move_to_end((q, steps[: k + 1]))
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def scores(self, path: Path) -> list[float]:
        q, steps = path
        out = []
        for k in range(len(steps)):
            s = self._get((q, steps[: k + 1]))
            if s is None:
                raise KeyError(f"step {k + 1} of a path was evicted: the PRM's cache ({self.size}) is smaller than one batch")
            out.append(s)
        return out
