"""Judge a learned PRM (`ets train-prm`) on the saved trees of a run, without generating:

    python benchmarks/learned_prm_eval.py FILE.npz runs/best_of_n-w16-XXXXXXXX [--json]

For a best-of-N run of test problems: AUROC of the final-step score against correctness (pooled,
and within problems), and the accuracy of the PRM-weighted vote, the PRM's single best, the plain
majority and any-correct (oracle), plus the AUROC of the PRM the run was made with. See
ets.prm.train.evaluate_run."""

import argparse
import json
import sys

from ets.prm.train import evaluate_run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prm_file")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    w = evaluate_run(a.prm_file, a.run_dir)
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
