"""Frozen, self-validating configuration: sampling (ets.engines.sampling) -> search. Strategy configs live beside
their strategies (ets.strategies.*) and are looked up by name in the registry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ets.engines.sampling import SamplingConfig  # noqa: F401  (beside the engines; re-exported)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class SearchConfig:
    """One problem's search (SPEC section 1). `strategy_params` are the strategy's own
    parameters by field name; the registry validates them into the strategy's frozen config."""

    strategy: str = "ets"
    width: int = 16
    max_tokens: int = 1024
    max_depth: int = 25
    kv_block_size: int = 16
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    strategy_params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        from ets.strategies import STRATEGIES  # late import: strategies import config

        _check(self.strategy in STRATEGIES,
               f"unknown strategy {self.strategy!r}; choose one of {sorted(STRATEGIES)}")
        _check(self.width >= 1, f"width must be >= 1, got {self.width}")
        _check(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        _check(self.max_depth >= 1, f"max_depth must be >= 1, got {self.max_depth}")
        _check(self.kv_block_size >= 1, f"kv_block_size must be >= 1, got {self.kv_block_size}")
        if isinstance(self.strategy_params, dict):
            object.__setattr__(self, "strategy_params", tuple(sorted(self.strategy_params.items())))
        self.strategy_config()  # validates the parameters now, not half-way through a run

    def strategy_config(self):
        from ets.strategies import STRATEGIES

        return STRATEGIES[self.strategy].Config.for_width(self.width, **dict(self.strategy_params))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["strategy_params"] = dict(self.strategy_params)
        d["strategy_config"] = asdict(self.strategy_config())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        d = {k: v for k, v in d.items() if k != "strategy_config"}
        d["sampling"] = SamplingConfig(**d.get("sampling", {}))
        d["strategy_params"] = tuple(sorted(dict(d.get("strategy_params", {})).items()))
        return cls(**d)


def __getattr__(name: str):
    """RunConfig lives beside the runner (ets.runner); `from ets.config import RunConfig` still
    works (resolved lazily: the runner imports this module)."""
    if name == "RunConfig":
        from ets.runner import RunConfig

        return RunConfig
    if name in ("VOTE_CHOICES", "AGG_CHOICES"):
        from ets import answer

        return answer.VOTES if name == "VOTE_CHOICES" else answer.AGGREGATIONS
    raise AttributeError(f"module 'ets.config' has no attribute {name!r}")
