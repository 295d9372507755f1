"""Does the PRM carry signal? Every answer-selection rule on saved trees (no generation).

    python benchmarks/prm_worth.py runs/best_of_n-w16-XXXXXXXX [--agg last,min] [--out FILE.md] [--ids-from RESULTS.json]

Prints (and writes) the table of ets.report.prm_worth: PRM-weighted vote, majority, PRM-best,
random-score vote, the any-correct oracle, each with its 95% interval, and the AUROC of the
solution score against correctness.
"""

import argparse
import json
import sys
from pathlib import Path

from ets.report.prm_worth import run_worth, worth_markdown


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--agg", default="last", help="comma list of step-score aggregations (default last)")
    ap.add_argument("--draws", type=int, default=32, help="random-score draws per problem (default 32)")
    ap.add_argument("--out", default=None, help="markdown file to write (and FILE.json beside it)")
    args = ap.parse_args(argv)
    parts, dumps = [], []
    for d in args.run_dirs:
        for agg in args.agg.split(","):
            w = run_worth(d, agg=agg.strip(), draws=args.draws)
            parts.append(f"### {w['run']} (agg {w['agg']})\n\n{worth_markdown(w)}\n")
            dumps.append(w)
    text = "\n".join(parts)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(dumps, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
