"""What would ETS keep at other settings? Replays a saved run's decisions (no generation).

    python benchmarks/replay_selection.py runs/rebase-w16-XXXXXXXX [runs/ets-w16-YYYYYYYY ...] \
        [--lambda-c 0.5,1,2,4] [--lambda-s-scale 0,1,2] [--thresholds 0.05,0.15] [--out FILE.md] \
        [--rescore learned:FILE.npz]

For every depth each run traced, REBASE's allocation and ETS under each setting are recomputed on
the same candidates and scores (benchmarks/replay.py); the table gives what each keeps and the
reference's (REBASE's) KV over the setting's. A one-decision counterfactual: use it to choose
which settings deserve a real frontier run, not as an accuracy result. `--rescore learned:FILE`
first replaces every node's saved score by the learned PRM's (the file is used whatever policy
it was made for): the same candidates under another ranking.
"""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ets.cluster import make_embedder
from replay import grid, replay, replay_markdown, run_width, summarize
from ets.runs import RunDir
from ets.strategies.ets import ETSConfig


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def learned_rescorer(spec: str):
    """rescore(question, tree) setting every non-root node's score to the learned PRM's score of
    its path (what `--prm learned:FILE` would have given it during the search)."""
    import asyncio

    from ets.prm.base import ScoreRequest
    from ets.prm.learned import LearnedPRM

    if not spec.startswith("learned:"):
        raise SystemExit(f"--rescore takes learned:FILE, got {spec!r}")
    prm = LearnedPRM(spec.split(":", 1)[1], any_policy=True)

    def rescore(question, tree):
        nodes = [n for n in tree.nodes if n.parent is not None]
        paths = asyncio.run(prm.score([ScoreRequest(question, n) for n in nodes]))  # RewardModel contract
        for n, steps in zip(nodes, paths):
            n.score = steps[-1]  # the last step's score is the node's

    rescore.prm = prm
    return rescore


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--lambda-c", default="0.5,1,2,4", help="ETS node-cost weights (default 0.5,1,2,4)")
    ap.add_argument("--lambda-s-scale", default="0,1,2",
                    help="ETS coverage weights as multiples of the paper's value (default 0,1,2)")
    ap.add_argument("--thresholds", default="",
                    help="extra clustering cuts to try at the default lambdas (e.g. 0.15,0.3)")
    ap.add_argument("--tokens", action="store_true", help="also the token node cost at each lambda_c")
    ap.add_argument("--embedder", default="minilm", help="minilm (default) or hash")
    ap.add_argument("--rescore", default=None, metavar="learned:FILE",
                    help="replace the saved node scores by this learned PRM's before replaying")
    ap.add_argument("--out", default=None, help="markdown file to write (and FILE.json beside it)")
    args = ap.parse_args(argv)

    records = [r for d in args.run_dirs for r in RunDir(d).iter_problems()]
    if not records:
        raise SystemExit(f"no finished problems under {args.run_dirs}")
    width = run_width(records[0])
    settings = grid(width, floats(args.lambda_c), floats(args.lambda_s_scale), embedder=args.embedder)
    paper = ETSConfig.for_width(width, embedder=args.embedder)  # the defaults: lambda_c 1, paper lambda_s
    for t in floats(args.thresholds):
        settings[f"ets paper lambdas, cut {t:g}"] = replace(paper, cluster_threshold=t)
    if args.tokens:
        for lc in floats(args.lambda_c):
            settings[f"ets lambda_c={lc:g} tokens"] = replace(paper, lambda_c=lc, node_cost="tokens")
    rescore = learned_rescorer(args.rescore) if args.rescore else None
    out = replay(records, settings, make_embedder(args.embedder), rescore)
    rows = summarize(out, "rebase")
    runs = ", ".join(Path(d).name for d in args.run_dirs)
    command = "python benchmarks/replay_selection.py " + " ".join(argv if argv is not None else sys.argv[1:])
    scored = f"; node scores replaced by {rescore.prm.name}'s" if rescore else ""
    text = (f"Replay of {len(records)} problems' decisions from {runs} (W={width}{scored}); reference: REBASE "
            f"at the same decisions (a one-decision counterfactual: the same candidates and scores, "
            f"no generation; accuracy needs real runs).\n\n`{command}`\n\n{replay_markdown(rows, 'rebase')}\n")
    print(text)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.with_suffix(".json").write_text(json.dumps({"runs": runs, "width": width, "rows": rows,
                                                         "decisions": out}, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
