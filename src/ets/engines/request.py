"""A request (one caller's `expand` call) and its rows (the children being generated).

A row moves WAITING -> RUNNING -> FINISHED; a preempted row goes RUNNING -> WAITING and keeps
its tokens, log-probs and random stream, so when it runs again only its KV is recomputed and
its step is the one it would have produced without the preemption. A request is done when all
its rows are FINISHED; its steps then go back to the caller in request order.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import torch

from ets.engines.base import Expansion
from ets.engines.kv_store import KV, Segment
from ets.engines.sampling import SamplingConfig

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Row:
    """One child being generated: `tokens` continue `parent`'s sequence (the node expanded).
    `tokens[-1]` is sampled but not fed; while RUNNING the KV of `tokens[:-1]` is in the decode
    batch (slot `slot`), beside a copy of the parent's path."""

    __slots__ = ("req", "parent", "gen", "tokens", "logprobs", "stop", "state", "slot", "tail", "child")

    def __init__(self, req: Request, parent: Segment, gen: torch.Generator):
        self.req, self.parent, self.gen = req, parent, gen  # gen: this child's own random stream
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.stop: str | None = None  # DELIMITER | EOS | LENGTH once finished
        self.state = WAITING
        self.slot: int | None = None  # index in the decode batch while RUNNING
        self.tail: KV | None = None  # recomputed KV of tokens[:-1], between prefill and joining
        self.child: Segment | None = None  # the step's segment once FINISHED (holds one claim)

    @property
    def fed(self) -> int:
        """Tokens of this step whose KV the row holds while running."""
        return max(len(self.tokens) - 1, 0)


class Request:
    """One `expand` call: rows for every child asked for, in request order."""

    def __init__(self, expansions: Sequence[Expansion], parents: Sequence[Segment],
                 generators: Sequence[Sequence[torch.Generator]], sampling: SamplingConfig,
                 future: asyncio.Future):
        self.expansions, self.parents = list(expansions), list(parents)
        self.sampling, self.future = sampling, future
        self.rows = [[Row(self, seg, g) for g in gens] for seg, gens in zip(parents, generators)]
        self.unfinished = sum(len(r) for r in self.rows)
        self.started = False  # a row of it has joined the decode batch (or finished)

    def all_rows(self) -> list[Row]:
        return [row for rows in self.rows for row in rows]

    @property
    def abandoned(self) -> bool:
        """The caller stopped waiting (cancelled): the request is dropped."""
        return self.future.done()
