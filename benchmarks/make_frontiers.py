"""Capture real-model selection frontiers for the selection benchmark.

Runs a REBASE search with the default embedded model (SmolLM2-135M-Instruct) and the default
PRM on one GSM8K problem per width, cut at `--depth`, and saves the last depth's candidates
(parent structure, tokens per node, scores, step texts) with MiniLM cluster labels (cosine
0.05, as ETS uses) to benchmarks/data/frontier_w<W>.json. Slow on a CPU (minutes at W=256);
the outputs are committed so the benchmark itself needs no model.

    python benchmarks/make_frontiers.py [--widths 16,64,256] [--depth 5] [--problem 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from ets.cluster import MiniLMEmbedder, cluster_labels
from ets.config import SamplingConfig, SearchConfig
from ets.engines.hf import load_policy
from ets.prm.default import DefaultPRM
from ets.search import search
from ets.tasks import load_dataset


def frontier_record(result, depth: int, width: int, labels) -> dict:
    cands = [n for n in result.tree.at_depth(depth) if n.finish is None and n.score is not None]
    keep = {}
    for c in cands:
        for n in [c, *c.ancestors()]:
            keep[n.id] = n
    nodes = sorted(keep.values(), key=lambda n: n.id)
    finished = sum(1 for n in result.tree.nodes if n.finish in ("answer", "cap") and n.depth <= depth)
    return {
        "width": width, "depth": depth, "remaining": width - finished,
        "nodes": [{"id": n.id, "parent": None if n.parent is None else n.parent.id,
                   "tokens": len(n.token_ids)} for n in nodes],
        "candidates": [c.id for c in cands],
        "scores": [c.score for c in cands],
        "texts": [c.text for c in cands],
        "clusters": labels,
        "embedder": MiniLMEmbedder.name,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="16,64,256")
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--problem", type=int, default=0)
    ap.add_argument("--max-step-tokens", type=int, default=96)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data"))
    args = ap.parse_args(argv)
    task, problems = load_dataset("gsm8k", limit=1, offset=args.problem)
    policy = load_policy(None)
    embedder = MiniLMEmbedder()
    for width in [int(w) for w in args.widths.split(",")]:
        cfg = SearchConfig(strategy="rebase", width=width, max_depth=args.depth, seed=width,
                           sampling=SamplingConfig(max_step_tokens=args.max_step_tokens))
        t0 = time.time()
        result = asyncio.run(search(task.prompt(problems[0]), policy, DefaultPRM(), cfg))
        cands = [n for n in result.tree.at_depth(args.depth) if n.finish is None]
        labels = cluster_labels(embedder.embed([c.text for c in cands]), 0.05).tolist() if cands else []
        rec = frontier_record(result, args.depth, width, labels)
        path = os.path.join(args.out, f"frontier_w{width}.json")
        with open(path, "w") as f:
            json.dump(rec, f)
        print(f"W={width}: {len(rec['candidates'])} candidates, {len(set(labels))} clusters, "
              f"{len(rec['nodes'])} nodes, {time.time() - t0:.0f} s -> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
