"""SamplingConfig: how a policy samples one step. It lives beside the engines that read it
(ets.engines.*); ets.config re-exports it for SearchConfig and older imports."""

from __future__ import annotations

from dataclasses import dataclass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class SamplingConfig:
    """How the policy samples one step (SPEC section 1)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_step_tokens: int = 256
    step_delimiter: str = "\n\n"

    def __post_init__(self):
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.max_step_tokens >= 1, f"max_step_tokens must be >= 1, got {self.max_step_tokens}")
        _check(len(self.step_delimiter) > 0, "step_delimiter must not be empty")
