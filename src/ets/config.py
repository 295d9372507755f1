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


from ets.answer import AGGREGATIONS as AGG_CHOICES, VOTES as VOTE_CHOICES  # noqa: E402  (one vocabulary)


@dataclass(frozen=True)
class RunConfig:
    """Run-level options of the harness (ets.runner, ets.cli): which problems, which models,
    where results go. What changes a problem's result is in `identity` (it names the run
    directory); problem selection and concurrency are not, so a run can be extended or resumed."""

    dataset: str = "gsm8k"  # "gsm8k" | "math500" | a local JSONL path
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None
    limit: int | None = None
    offset: int = 0
    ids: tuple[str, ...] = ()
    policy: str = "default"  # ets.factory.make_policy spec
    prm: str = "default"  # ets.factory.make_prm spec
    embedder: str = "minilm"  # ETS clustering embedder (ets.cluster.EMBEDDERS)
    concurrency: int = 1  # problems in flight at once
    # KV tokens the embedded engine may hold at once, as a serving engine's cache size: beyond it
    # a depth's sequences are decoded in waves (None: unbounded). An error with server/mock policies.
    kv_capacity: int | None = None
    runs_dir: str = "runs"
    vote: str = "weighted"  # answer selection recorded in results (ets.answer)
    agg: str = "last"

    def __post_init__(self):
        from ets.cluster import EMBEDDERS
        from ets.factory import is_embedded

        if isinstance(self.ids, (list, str)):
            object.__setattr__(self, "ids", tuple([self.ids] if isinstance(self.ids, str) else self.ids))
        _check(self.limit is None or self.limit >= 0, f"limit must be >= 0, got {self.limit}")
        _check(self.offset >= 0, f"offset must be >= 0, got {self.offset}")
        _check(self.concurrency >= 1, f"concurrency must be >= 1, got {self.concurrency}")
        _check(self.kv_capacity is None or self.kv_capacity >= 1,
               f"kv_capacity must be a positive number of tokens, got {self.kv_capacity}")
        _check(self.kv_capacity is None or is_embedded(self.policy),
               f"kv_capacity applies to the embedded engine only, not to policy {self.policy!r}; a server's "
               "cache size is set where the server starts (vLLM: --gpu-memory-utilization or "
               "--num-gpu-blocks-override)")
        _check(self.embedder in EMBEDDERS, f"unknown embedder {self.embedder!r}; choose one of {sorted(EMBEDDERS)}")
        _check(self.vote in VOTE_CHOICES, f"vote must be one of {VOTE_CHOICES}, got {self.vote!r}")
        _check(self.agg in AGG_CHOICES, f"agg must be one of {AGG_CHOICES}, got {self.agg!r}")
        _check(bool(self.dataset), "dataset must not be empty")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ids"] = list(self.ids)
        return d

    def identity(self, search: SearchConfig, task: dict) -> dict:
        """Everything that changes a problem's result under `search`: hashed into the run name."""
        return {"search": search.to_dict(), "policy": self.policy, "prm": self.prm,
                "embedder": self.embedder if search.strategy == "ets" else None,
                "dataset": self.dataset, "fields": [self.question_field, self.answer_field, self.id_field],
                "task": task,
                # waves change the order of random draws, hence the samples; left out when unset
                # so that run names made before the option existed still resume
                **({"kv_capacity": self.kv_capacity} if self.kv_capacity is not None else {})}
