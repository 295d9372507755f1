"""ETS's clustering embedder, as it was against as it is, on the step texts of saved decisions.

ETS embeds every candidate's last step at every decision (SPEC 2.5 step 3). On a machine shared
with a server that is CPU the server does not get. Two ways, timed side by side on the same
decisions (alternating which goes first), with the partitions they give compared:
    before   every candidate's text, sentence-transformers batches of 64
    now      each distinct text once (ets.cluster.embed_unique), batches of
             MiniLMEmbedder.batch_size (texts are sorted by length, so small batches pad little)

    python benchmarks/bench_embedder.py RUN_DIR [RUN_DIR ...] [--decisions 200] [--threads 1]

RUN_DIR: ETS run directories (their problems' trees and traces give each decision's candidates).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import time

import numpy as np
import torch

from ets.cluster import MiniLMEmbedder, cluster_labels, embed_unique


def decisions(run_dirs: list[str], limit: int) -> list[list[str]]:
    """Candidate step texts of each decision that clusters (more than one distinct text)."""
    out = []
    for run in run_dirs:
        for path in sorted(glob.glob(os.path.join(run, "problems", "*.json"))):
            record = json.load(open(path))
            text = {n["id"]: n["text"] for n in record["tree"]["nodes"]}
            for depth in record["trace"]:
                texts = [text[i] for i in depth.get("candidate_ids") or []]
                if len(set(texts)) > 1:
                    out.append(texts)
                    if len(out) == limit:
                        return out
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--decisions", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the client's default beside a server: 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    decs = decisions(args.run_dirs, args.decisions)
    if not decs:
        raise SystemExit("no ETS decisions with more than one distinct step text in those run directories")
    embedder, as_was = MiniLMEmbedder(), MiniLMEmbedder()
    as_was.batch_size = 64

    def before(texts):
        return as_was.embed(texts)

    def now(texts):
        return embed_unique(embedder, texts)

    embedder.embed(["warm up"])
    as_was.embed(["warm up"])
    seconds = {"before": 0.0, "now": 0.0}
    same = 0
    for k, texts in enumerate(decs):
        labels = {}
        for name in (("before", "now") if k % 2 == 0 else ("now", "before")):
            t = time.perf_counter()
            rows = (before if name == "before" else now)(texts)
            seconds[name] += time.perf_counter() - t
            labels[name] = cluster_labels(rows)
        same += int(np.array_equal(labels["before"], labels["now"]))
    n_texts = sum(len(t) for t in decs)
    n_distinct = sum(len(set(t)) for t in decs)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({args.threads} threads), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"decisions: {len(decs)} ({n_texts} candidate texts, {n_distinct} distinct) from {', '.join(args.run_dirs)}")
    print(f"before (every text, batch 64):           {seconds['before']:8.1f} s, {1e3 * seconds['before'] / len(decs):6.0f} ms a decision")
    print(f"now (distinct texts, batch {embedder.batch_size}):          {seconds['now']:8.1f} s, {1e3 * seconds['now'] / len(decs):6.0f} ms a decision")
    print(f"before / now: {seconds['before'] / seconds['now']:.2f}x; identical partitions {same}/{len(decs)}")


if __name__ == "__main__":
    main()
