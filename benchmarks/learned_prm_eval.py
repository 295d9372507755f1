"""Judge a learned PRM (`ets train-prm`) on the saved trees of a run, without generating:

    python benchmarks/learned_prm_eval.py FILE.npz runs/best_of_n-w16-XXXXXXXX [--json] [--rows OUT.json]

For a best-of-N run of test problems: AUROC of the final-step score against correctness (pooled,
and within problems), and the accuracy of the PRM-weighted vote, the PRM's single best, the plain
majority and any-correct (oracle), plus the AUROC of the PRM the run was made with. See
ets.prm.train.evaluate_run. `--rows OUT.json` also writes each rule's per-problem outcomes as rows
of a results.json (methods `weighted`, `best`, `majority`, `oracle`; KV = the run's tree KV), so
benchmarks/pair_results.py can pair a search run with, say, the majority of these N samples:
`pair_results.py --base OUT.json:majority results.json:rebase`."""

import argparse
import json
import sys
from pathlib import Path

from ets.prm.train import evaluate_run


def selection_rows(w: dict) -> dict:
    """A results.json-shaped {"meta", "rows"}: one row per selection rule of w["per_problem"]
    (evaluate_run(..., per_problem=True)), its per-problem outcomes with each problem's tree KV."""
    pp = w["per_problem"]
    rules = [k for k in pp if k not in ("ids", "kv_mean")]
    rows = [{"method": rule, "prm": w["prm"] if rule in ("weighted", "best") else None,
             "per_problem": [{"id": i, "correct": bool(c), "kv_mean": kv}
                             for i, c, kv in zip(pp["ids"], pp[rule], pp["kv_mean"])]}
            for rule in rules]
    return {"meta": {"made_by": "benchmarks/learned_prm_eval.py", "prm": w["prm"], "run": w["run"]}, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prm_file")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rows", metavar="OUT.json", help="also write each selection rule's per-problem "
                   "outcomes as results.json rows (for benchmarks/pair_results.py)")
    a = p.parse_args()
    w = evaluate_run(a.prm_file, a.run_dir, per_problem=bool(a.rows))
    if a.rows:
        Path(a.rows).write_text(json.dumps(selection_rows(w), indent=1) + "\n", encoding="utf-8")
        del w["per_problem"]
    if a.json:
        print(json.dumps(w, indent=1))
    else:
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"{w['prm']} on {w['run']}: {w['problems']} problems, {w['solutions']} solutions\n"
              f"  AUROC final step {f(w['auroc_final'])} (within problems {f(w['auroc_final_within'])} over "
              f"{w['problems_mixed']}; the run's own PRM {f(w['auroc_final_rollout_prm'])}), all prefixes "
              f"{f(w['auroc_prefix'])}\n  accuracy: weighted {f(w['acc_weighted'])}, best {f(w['acc_best'])}, "
              f"majority {f(w['acc_majority'])}, any {f(w['acc_oracle'])}\n  weighted - majority, paired: "
              "{:+.1f} points [{:+.1f}, {:+.1f}] (95%)".format(*(100 * v for v in w["weighted_minus_majority"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
