"""Selection frontiers for the selection benchmark.

`grow_frontier` grows a tree with the mock policy and PRM under REBASE to a given depth at a
given width (no early finishes, so the last depth has exactly `width` candidates) and returns
that depth's candidates with cluster labels (hash embedder, cosine cut 0.05). The mock draws every
step from one phrase book, so identical steps recur all over the tree and clusters span
unrelated subtrees: a hard case for the coverage term. `load_frontier` reads a frontier captured from the real model by make_frontiers.py."""

from __future__ import annotations

import asyncio
import json

from ets.cluster import HashEmbedder, cluster_labels
from ets.config import SearchConfig
from ets.engines.mock import MockPolicy
from ets.prm.mock import MockPRM
from ets.search import search
from ets.strategies.base import Frontier
from ets.tree import Tree


def grow_frontier(width: int, depth: int, seed: int = 0):
    """(frontier at `depth`, cluster labels) from a mock REBASE search cut off at `depth`."""
    cfg = SearchConfig(strategy="rebase", width=width, max_depth=depth, seed=seed)
    policy = MockPolicy(seed=seed, finish_rate=0.0)
    result = asyncio.run(search("frontier", policy, MockPRM(seed=seed), cfg))
    cands = [n for n in result.tree.at_depth(depth) if n.score is not None]
    labels = cluster_labels(HashEmbedder().embed([c.text for c in cands]), 0.05)
    return Frontier(depth, cands, [], width, width), labels


def load_frontier(path: str):
    """(frontier, cluster labels) from a make_frontiers.py JSON file."""
    import numpy as np

    rec = json.load(open(path))
    tree = Tree([0] * rec["nodes"][0]["tokens"], "prompt")
    by_id = {rec["nodes"][0]["id"]: tree.root}
    for n in rec["nodes"][1:]:  # sorted by id: parents first
        by_id[n["id"]] = tree.add_child(by_id[n["parent"]], [0] * n["tokens"], "", "delimiter")
    cands = [by_id[i] for i in rec["candidates"]]
    for c, s, t in zip(cands, rec["scores"], rec["texts"]):
        c.score, c.text = s, t
    return Frontier(rec["depth"], cands, [], rec["remaining"], rec["width"]), np.array(rec["clusters"])
