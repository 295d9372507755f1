"""Strategy interface and registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import ClassVar

from ets.tree import Node


@dataclass(frozen=True)
class Frontier:
    """What a strategy sees at one depth (>= 1)."""

    depth: int
    candidates: list[Node]  # unfinished nodes of this depth, in generation order, each scored
    finished: list[Node]  # nodes of this depth that finished (already subtracted from remaining)
    remaining: int  # trajectories of the width still unused (> 0)
    width: int


def option(default, help: str, choices: tuple[str, ...] | None = None):
    """A strategy parameter: its default, the help of its command-line flag (ets.cli builds the
    strategy flags from these fields), and for a string the values it may take (checked by
    StrategyConfig.__post_init__, listed by the flag: one vocabulary for both)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class StrategyConfig:
    """Base for strategy configs: frozen, validated in __post_init__ (subclasses that add
    checks call super().__post_init__()). `for_width` builds the config for a given width (so
    width-dependent defaults are resolved once, visibly). Fields are made with `option`."""

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}, got {getattr(self, f.name)!r}")

    @classmethod
    def for_width(cls, width: int, **params):
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {cls.__name__}; "
                             f"known: {sorted(known)}")
        return cls(**params)


class Strategy(ABC):
    """Contract: `select(frontier)` returns `(alloc, info)`: alloc[i] >= 0 children for
    frontier.candidates[i], with sum(alloc) <= frontier.remaining (unless `may_overshoot`) and
    sum(alloc) >= 1; info is a JSON-able dict for the trace (key "clusters": a label per
    candidate, stored on the nodes). A Strategy instance serves ONE problem (it may keep state
    across depths, e.g. DVTS subtrees); build a new one per problem with `build_strategy`."""

    name: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]]
    may_overshoot: bool = False

    def __init__(self, config: StrategyConfig, width: int):
        self.config = config
        self.width = width

    @abstractmethod
    def select(self, frontier: Frontier) -> tuple[list[int], dict]: ...


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def build_strategy(cfg, embedder=None) -> Strategy:
    """A fresh strategy for one problem, from a SearchConfig."""
    cls = STRATEGIES[cfg.strategy]
    conf = cfg.strategy_config()
    extra = {}
    if getattr(cls, "needs_embedder", False):
        extra["embedder"] = embedder
    if getattr(cls, "needs_seed", False):  # a strategy that draws at random does so from the run's seed
        extra["seed"] = cfg.seed
    return cls(conf, cfg.width, **extra)
