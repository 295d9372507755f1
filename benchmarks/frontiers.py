"""Realistic selection frontiers: grow a tree with the mock policy and PRM under REBASE to a
given depth at a given width, then return the last depth's candidates with their cluster
labels (hash embedder; the mock's phrase book gives many near-duplicate steps, as real samples
at large widths do). Used by the selection benchmark and the solver tests."""

from __future__ import annotations

import asyncio

from ets.cluster import HashEmbedder, cluster_labels
from ets.config import SearchConfig
from ets.engines.mock import MockPolicy
from ets.prm.mock import MockPRM
from ets.search import search
from ets.strategies.base import Frontier


def grow_frontier(width: int, depth: int, seed: int = 0):
    """(frontier at `depth`, cluster labels) from a REBASE search cut off at `depth`."""
    cfg = SearchConfig(strategy="rebase", width=width, max_depth=depth, seed=seed)
    policy = MockPolicy(seed=seed, finish_rate=0.0)
    result = asyncio.run(search("frontier", policy, MockPRM(seed=seed), cfg))
    nodes = [n for n in result.tree.nodes if n.depth == depth and n.finish is not None and n.finish != "answer"
             or (n.depth == depth and n.finish is None)]
    cands = [n for n in nodes if n.score is not None]
    labels = cluster_labels(HashEmbedder().embed([c.text for c in cands]), 0.05)
    remaining = width - sum(1 for n in result.tree.nodes if n.finish in ("answer", "cap") and n.depth < depth)
    return Frontier(depth, cands, [], max(remaining, 1), width), labels
