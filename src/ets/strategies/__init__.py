"""Strategy registry: every strategy registers itself by name on import."""

from ets.strategies.base import STRATEGIES, Frontier, Strategy, StrategyConfig, build_strategy, register
from ets.strategies import best_of_n, beam, dvts, rebase, ets, particle_filter  # noqa: F401  (registration)

__all__ = ["STRATEGIES", "Frontier", "Strategy", "StrategyConfig", "build_strategy", "register"]
