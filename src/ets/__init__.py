"""ets: test-time compute scaling by tree search against a process reward model.

The public API (docs/api.md has a runnable example for each interface):

    from ets import search, SearchConfig, SamplingConfig        # run one problem's search
    from ets import Policy, RewardModel, Strategy               # the three interfaces (ABCs)
    from ets import make_policy, make_prm, load_dataset         # the CLI's specs, as objects

Names are imported on first use, so `import ets` loads no model library (torch, transformers).
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# public name -> (module, attribute)
_API = {
    "search": ("ets.search", "search"),
    "SearchResult": ("ets.search", "SearchResult"),
    "SearchConfig": ("ets.config", "SearchConfig"),
    "SamplingConfig": ("ets.engines.sampling", "SamplingConfig"),
    "Tree": ("ets.tree", "Tree"),
    "Node": ("ets.tree", "Node"),
    "Policy": ("ets.engines.base", "Policy"),
    "Expansion": ("ets.engines.base", "Expansion"),
    "Step": ("ets.engines.base", "Step"),
    "RewardModel": ("ets.prm.base", "RewardModel"),
    "ScoreRequest": ("ets.prm.base", "ScoreRequest"),
    "Reference": ("ets.prm.base", "Reference"),
    "PRMError": ("ets.prm.base", "PRMError"),
    "Strategy": ("ets.strategies.base", "Strategy"),
    "StrategyConfig": ("ets.strategies.base", "StrategyConfig"),
    "Frontier": ("ets.strategies.base", "Frontier"),
    "option": ("ets.strategies.base", "option"),
    "register_strategy": ("ets.strategies.base", "register"),
    "STRATEGIES": ("ets.strategies", "STRATEGIES"),
    "make_policy": ("ets.factory", "make_policy"),
    "make_prm": ("ets.factory", "make_prm"),
    "prm_kinds": ("ets.prm.registry", "kinds"),
    "load_dataset": ("ets.tasks", "load_dataset"),
    "select_from_tree": ("ets.answer", "select_from_tree"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'ets' has no attribute {name!r}")
    mod, attr = _API[name]
    value = getattr(importlib.import_module(mod), attr)
    globals()[name] = value  # once
    return value


def __dir__():
    return __all__
