"""ETS selection speed on realistic frontiers, beside REBASE allocation, in one run.

A frontier is the last depth of a mock REBASE search cut at `--depth` (every candidate at one
depth, exactly `width` candidates, clusters from near-duplicate steps anywhere in the tree), or a
frontier captured from the real model (`--captured`, benchmarks/data/frontier_w*.json). Timed
per call:
  - ets:     build the program + solve it exactly (cluster labels given)
  - cluster: average-linkage clustering of the candidates' embeddings (hash embedder)
  - rebase:  the REBASE allocation
Prints median and p99 in ms per width, and the ratio ets / rebase.

    python benchmarks/bench_selection.py [--widths 16,64,256] [--depth 6] [--frontiers 5] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from frontiers import grow_frontier, load_frontier  # noqa: E402

from ets.cluster import HashEmbedder, cluster_labels  # noqa: E402
from ets.strategies.ets import ETSConfig, ets_select  # noqa: E402
from ets.strategies.rebase import rebase_allocate  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="16,64,256")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--frontiers", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--solver", default="auto", choices=["auto", "milp"])
    ap.add_argument("--lambda-s", type=float, default=None, help="ETS coverage weight (default: paper value; 0 = DP only)")
    ap.add_argument("--captured", action="store_true", help="also time benchmarks/data/frontier_w*.json")
    args = ap.parse_args(argv)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print(f"{'width':>5} {'N':>5} {'K':>4} {'nodes':>5} | {'ets med':>8} {'ets p99':>8} | "
          f"{'clust med':>9} | {'rebase med':>10} {'rebase p99':>10} | {'ets/rebase':>10} | solver")
    suites = [("mock", w, [lambda w=w, s=s: grow_frontier(w, args.depth, s) for s in range(args.frontiers)])
              for w in [int(x) for x in args.widths.split(",")]]
    if args.captured:
        import glob
        for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "data", "frontier_w*.json"))):
            width = int(path.rsplit("_w", 1)[1].split(".")[0])
            suites.append(("smollm2", width, [lambda path=path: load_frontier(path)]))
    last = None
    for name, width, makers in suites:
        if name != last:
            print(f"-- {name}")
            last = name
        ets_t, cl_t, rb_t, sizes, solvers = [], [], [], [], {}
        for make in makers:
            frontier, labels = make()
            cands = frontier.candidates
            scores = [c.score for c in cands]
            extra = {} if args.lambda_s is None else {"lambda_s": args.lambda_s}
            config = ETSConfig.for_width(width, solver=args.solver, **extra)
            emb = HashEmbedder().embed([c.text for c in cands])  # clustering time only; labels as given
            _, info = ets_select(scores, cands, frontier.remaining, config, labels)
            solvers[info["solver"]] = solvers.get(info["solver"], 0) + 1
            sizes.append((len(cands), int(labels.max()) + 1, info["kept_nodes"]))
            ets_t += timed(lambda: ets_select(scores, cands, frontier.remaining, config, labels), args.repeats)
            cl_t += timed(lambda: cluster_labels(emb, config.cluster_threshold), args.repeats)
            rb_t += timed(lambda: rebase_allocate(scores, frontier.remaining, config.softmax_temperature), args.repeats)
        n, k, kept = np.mean(sizes, axis=0)
        med = lambda x: float(np.median(x))  # noqa: E731
        p99 = lambda x: float(np.percentile(x, 99))  # noqa: E731
        print(f"{width:>5} {n:>5.0f} {k:>4.0f} {kept:>5.0f} | {med(ets_t):>8.3f} {p99(ets_t):>8.3f} | "
              f"{med(cl_t):>9.3f} | {med(rb_t):>10.4f} {p99(rb_t):>10.4f} | {med(ets_t) / med(rb_t):>10.0f} | "
              + ",".join(f"{s}:{c}" for s, c in sorted(solvers.items())))
    print("times in ms per call; N candidates, K clusters, nodes kept (mean over frontiers)")


if __name__ == "__main__":
    main()
