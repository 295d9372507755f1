"""The Policy interface: grow tree nodes by sampled reasoning steps."""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Sequence

from ets.engines.sampling import SamplingConfig
from ets.tree import Node

# Step.stop_reason values
DELIMITER = "delimiter"  # the step delimiter was generated (it is part of the step's tokens)
EOS = "eos"  # the model ended the sequence
LENGTH = "length"  # max_step_tokens reached without delimiter or EOS


# Set (from a signal handler) to stop: an engine that computes synchronously checks it between
# decode steps and raises Stopped, so SIGTERM ends a long expansion within one step.
STOP = threading.Event()


class Stopped(RuntimeError):
    """An expansion was abandoned because STOP was set."""


SEED_BITS = 31  # servers take the seed as a (signed) int and seed child i with seed + i


def node_seed(run_seed: int, path_token_ids: Sequence[int]) -> int:
    """The sampling seed of one node's expansion: a function of the run's seed and the node's
    whole path (the prompt's ids, which name the problem, then every step's ids), nothing else.
    Child i of the node is drawn with `node_seed(...) + i`, so a node's k-th sample is the same
    whichever strategy asks for it, however many siblings are asked for, and whatever else is
    in flight (common random numbers across methods; resumed == uninterrupted)."""
    h = hashlib.blake2b(digest_size=8, key=int(run_seed).to_bytes(8, "little", signed=True))
    h.update(b"".join(int(t).to_bytes(4, "little") for t in path_token_ids))
    # leave room for + child index below 2**SEED_BITS
    return int.from_bytes(h.digest(), "little") % (2 ** SEED_BITS - 2 ** 16)


@dataclass(frozen=True)
class Step:
    """One sampled reasoning step: exactly the tokens generated after the parent's sequence."""

    token_ids: tuple[int, ...]
    text: str
    stop_reason: str  # DELIMITER | EOS | LENGTH
    logprobs: tuple[float, ...] | None = None  # one per token, when the engine gives them


@dataclass(frozen=True)
class Expansion:
    """Sample `n` children of `node`; the prompt is `node.path_token_ids()`."""

    node: Node
    n: int


class Policy(ABC):
    """Contract:
    - `format_prompt(question)` returns the prompt's token ids and text (chat template applied).
    - `expand(requests, sampling)` returns, per request and in order, exactly `request.n` Steps,
      each continuing `request.node`'s sequence by one step. All requests of one call are
      independent and may be (and should be) generated together. The call is async so that many
      problems can be in flight against one server.
    - `release(nodes)` tells the engine these nodes will never be expanded nor extended again
      (pruned or finished), so KV held only for them may be freed. Default: nothing to free.
    - The policy never changes the tree; the search adds the returned steps as children.
    """

    name: str = "policy"
    eos_token_id: int | None = None

    @abstractmethod
    def format_prompt(self, question: str) -> tuple[list[int], str]: ...

    @abstractmethod
    async def expand(self, requests: Sequence[Expansion], sampling: SamplingConfig) -> list[list[Step]]: ...

    def release(self, nodes: Iterable[Node]) -> None:
        return None

    def observe(self, root: Node) -> dict:
        """Engine measurements for the problem rooted at `root`, read right after its latest
        `expand` (e.g. KV tokens actually held, prefix-cache hit rate); stored in that depth's
        trace as `engine`. Default: none."""
        return {}

    def stats(self) -> dict:
        """Engine counters (e.g. prefilled tokens, calls); merged into a run's results."""
        return {}

    async def aclose(self) -> None:
        return None
