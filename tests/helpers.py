"""Small builders shared by the core tests."""

from __future__ import annotations

import asyncio

from ets.cluster import HashEmbedder
from ets.config import SearchConfig
from ets.engines.mock import MockPolicy
from ets.prm.mock import MockPRM
from ets.search import search
from ets.tree import Tree


def tree_from_parents(parent: dict, tokens_per_node: int = 1, texts: dict | None = None):
    """Tree from {node id (str or int): parent id or None}; returns (tree, {id: Node})."""
    parent = {int(k): v for k, v in parent.items()}
    tree = Tree(list(range(tokens_per_node)), "prompt")
    nodes = {0: tree.root}
    pending = sorted(k for k in parent if k != 0)
    while pending:
        rest = []
        for i in pending:
            p = parent[i]
            if p in nodes:
                text = (texts or {}).get(i, f"step {i}")
                nodes[i] = tree.add_child(nodes[p], [100 + i] * tokens_per_node, text, "delimiter")
            else:
                rest.append(i)
        pending = rest
    return tree, nodes


def run_mock(strategy: str, width: int, seed: int = 0, **params):
    if strategy == "ets":
        params.setdefault("embedder", "hash")
    cfg = SearchConfig(strategy=strategy, width=width, seed=seed, strategy_params=params)
    policy = MockPolicy(seed=seed)
    result = asyncio.run(search("What is 6 * 7?", policy, MockPRM(seed=seed), cfg, embedder=HashEmbedder()))
    return result, policy


def step_path(steps, question_ids=(1,)):
    """The last node of a chain root -> steps[0] -> steps[1] ... (each step one token, 5): a
    path to hand a PRM in a ScoreRequest."""
    tree = Tree(list(question_ids), "q")
    node = tree.root
    for s in steps:
        node = tree.add_child(node, [5], s, "delimiter")
    return node
