"""K-fold cross-validation (by problem) of learned-PRM feature sets on a rollout run directory, no
generation: each fold's heads are fitted on the other folds' prefixes (outcome labels), and the
final-step score is judged against correctness beside the PRM the rollouts were made with: pooled
over solutions, per fold, and within problems (the mean over problems with both right and wrong
solutions: what a vote or a search sees), with the weighted / best / majority / any-correct votes
of the out-of-fold scores.

    python benchmarks/learned_prm_cv.py runs/prm/best_of_n-w4-XXXXXXXX [--folds 5] [--l2 1e-3] \\
        [--sets stats-v1,stats,stats-split,full] [--test runs/best_of_n-w16-XXXXXXXX]

Sets: stats-v1 (the 13 statistics of the first files), stats-read1 (all statistics, numbers read
as features version 1 did, by hand), stats (all statistics, the current version), full (the
embedding as well; loads --embedder, slow on CPU); stats-split: the statistics, with one head
for prefixes that state a final answer and one for the rest (`ets train-prm --features stats-split`);
stats-split-within: stats-split with the answered head fitted on contrasts within a problem (an
experiment, see within_head; train-prm does not make it). stats-split-gbt, stats-split-mlp: the
two heads non-linear (gradient-boosted trees, a small MLP; see nonlinear_model; experiments too).
A held-out split of one fifth of 128 problems is noisy (33 problems); the folds use every problem
once as held out.

--test RUN_DIR: each set's heads fitted on every rollout, then judged on the saved trees of
another run (best-of-N on test problems) as benchmarks/learned_prm_eval.py judges a file: final-step
AUROC pooled and within problems, and the weighted / best / majority / any-correct accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import numpy as np

from ets.prm import learned, train
from ets.report.prm_worth import auroc
from ets.runs import RunDir
from ets.tasks import Task

V = learned.FEATURES_VERSION
SETS = {"stats-v1": ("stats", learned.STAT_NAMES_V1, V), "stats-read1": ("stats", learned.STAT_NAMES, 1),
        "stats": ("stats", learned.STAT_NAMES, V), "stats-split": ("stats-split", learned.STAT_NAMES, V),
        "full": ("full", learned.STAT_NAMES, V), "stats-split-within": ("stats-split", learned.STAT_NAMES, V),
        "stats-split-gbt": ("stats-split", learned.STAT_NAMES, V), "stats-split-mlp": ("stats-split", learned.STAT_NAMES, V)}
WITHIN = {"stats-split-within"}  # the answered head fitted on contrasts within a problem (within_head)
NONLINEAR = {"stats-split-gbt", "stats-split-mlp"}  # non-linear heads (nonlinear_model); train-prm does not make them


def fit_heads_predict(x_fit, y_fit, head_fit, problems_fit, x_new, head_new, heads, l2, within=False):
    """Scores of x_new by one logistic head per head index (row n by head head_new[n]), fitted on
    (x_fit, y_fit) as `ets train-prm` fits them (ets.prm.train.fit_heads) with L2 weight l2;
    within: head 1 (answered prefixes) by within_head instead."""
    w, b, mean, scale, _ = train.fit_heads(x_fit, y_fit, y_fit, [""] * len(y_fit), head_fit, heads, [l2])
    out = learned.score_rows(x_new, head_new, w, b, mean, scale)
    fit_rows, new_rows = head_fit == 1, head_new == 1
    if within and new_rows.any():
        out[new_rows] = within_head(x_fit[fit_rows], y_fit[fit_rows], np.asarray(problems_fit)[fit_rows], l2)(x_new[new_rows])
    return out


def within_head(x, y, problems, l2):
    """An answered-prefix head fitted on what tells one problem's solutions apart: the weights by
    logistic regression on the rows less their problem's mean row (so a column that only says how
    hard the problem is gets no weight), then a slope and bias on the uncentred scores (Platt
    scaling), so that the score needs no other solution at scoring time. Returns score(x_new)."""
    problems = np.asarray(problems)
    centred = x.astype(np.float64).copy()
    for pid in np.unique(problems):
        rows = problems == pid
        centred[rows] -= centred[rows].mean(0)
    w, _, _, scale, _ = train.fit_logistic(centred, y, l2)
    raw = lambda v: (((v - x.mean(0)) / scale) @ w)[:, None]  # noqa: E731
    a, b, m, sc, _ = train.fit_logistic(raw(x), y, 1e-6)
    return lambda v: learned.sigmoid(((raw(v) - m) / sc) @ a + b)


def nonlinear_model(name, l2):
    """An sklearn classifier for a set in NONLINEAR (an experiment: is the linear head what limits
    the statistics?). Settings fixed before any test tree was scored: gradient-boosted trees, 200
    rounds of 15 leaves at rate 0.05 with L2 `l2`; or one hidden layer of 32 on standardised
    columns, weight decay `l2`."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "stats-split-gbt":
        return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                              l2_regularization=l2, random_state=0)
    return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,), alpha=l2, max_iter=500,
                                                         random_state=0))


def fit_predict_set(name, features, x_fit, y_fit, problems_fit, x_new, l2):
    """Scores of x_new by set `name`: fit_heads_predict by the set's heads, the answered head by
    within_head for the sets in WITHIN, every head by nonlinear_model for the sets in NONLINEAR."""
    if name in NONLINEAR:
        out = np.zeros(len(x_new))
        head_fit, head_new = features.head_of(x_fit), features.head_of(x_new)
        for h in range(features.heads):
            if (head_new == h).any():
                model = nonlinear_model(name, l2).fit(x_fit[head_fit == h], y_fit[head_fit == h] >= 0.5)
                out[head_new == h] = model.predict_proba(x_new[head_new == h])[:, 1]
        return out
    return fit_heads_predict(x_fit, y_fit, features.head_of(x_fit), problems_fit, x_new, features.head_of(x_new),
                             features.heads, l2, within=name in WITHIN)


def fold_of(problem_id: str, folds: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"cv/{problem_id}".encode(), digest_size=8).digest(), "little") % folds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--sets", default="stats-v1,stats-read1,stats")
    p.add_argument("--embedder", default="minilm")
    p.add_argument("--test", default=None, metavar="RUN_DIR", help="also fit on every rollout and judge on this run's trees")
    p.add_argument("--labels", default="outcome",
                   help="comma list of training labels (ets.prm.train.LABELS); with an mc-* one, only the problems "
                        "whose completions `ets train-prm --labels mc-* --mc-k K` saved are used, for every labelling")
    p.add_argument("--mc-k", type=int, default=4)
    p.add_argument("--vote-power", type=float, default=1.0,
                   help="weigh the vote by score**P (1: the spec's weighted vote; AUROCs do not change)")
    a = p.parse_args()
    run = RunDir(a.run_dir)
    records = list(run.iter_problems())
    if not records:
        print(f"{a.run_dir} has no finished problems", file=sys.stderr)
        return 2
    task = Task.from_dict(records[0]["task"])
    labellings = a.labels.split(",")
    mc = train.load_mc(run, a.mc_k) if any(lab != "outcome" for lab in labellings) else None
    if mc is not None:
        records = [r for r in records if r["id"] in mc]
    ex = train.examples_from_records(records, task)
    ys = {lab: np.array(train.examples_from_records(records, task, lab, mc).label) for lab in labellings}
    fold = np.array([fold_of(i, a.folds) for i in ex.problem])
    final, right = np.array(ex.final), np.array(ex.outcome) >= 0.5
    print(f"{a.run_dir}: {len(records)} problems{' (those with mc-k%d completions)' % a.mc_k if mc else ''}, "
          f"{len(ex.problem)} prefixes, {final.sum()} solutions ({(final & right).sum()} right); "
          f"{a.folds} folds by problem, L2 {a.l2:g}; labels {', '.join(labellings)}"
          + (f"; votes weighed by score**{a.vote_power:g}" if a.vote_power != 1 else ""))

    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731 (an AUROC is None with one class)

    def report(name, scores):
        per = [auroc(list(scores[final & (fold == k)]), list(right[final & (fold == k)])) for k in range(a.folds)]
        # every score is out of fold, so the votes and the within-problem AUROC are held-out figures too
        w = train.heldout_figures(ex, scores ** a.vote_power, np.ones(len(scores), bool), task)
        print(f"  {name:24s} final-step AUROC {auroc(list(scores[final]), list(right[final])):.3f} pooled, "
              f"{f(w['auroc_final_within'])} within ({w['problems_mixed']} mixed problems); "
              f"per fold {' '.join(f(v) for v in per)}; weighted {f(w['acc_weighted'])}, best {f(w['acc_best'])}, "
              f"majority {f(w['acc_majority'])}, any {f(w['acc_oracle'])}; weighted - majority "
              "{:+.1f} [{:+.1f}, {:+.1f}]".format(*(100 * v for v in w["weighted_minus_majority"]))
              + f"; open prefixes {f(w['auroc_open_within'])} within ({w['open_groups_mixed']} problem-depths)")

    if None not in ex.rollout_score:
        report(f"rollouts' PRM ({records[0].get('prm', '?')})", np.array(ex.rollout_score, float))
    for lab in labellings:
        if lab != "outcome":  # a reference: each open prefix's value estimated from K other completions
            w = train.heldout_figures(ex, ys[lab], np.ones(len(ys[lab]), bool), task)
            print(f"  the {lab} labels themselves (K={a.mc_k} completions per open prefix, no fit; a whole solution's "
                  f"label is its outcome): open prefixes {f(w['auroc_open_within'])} within "
                  f"({w['open_groups_mixed']} problem-depths)")
    tests = list(RunDir(a.test).iter_problems()) if a.test else []
    test_ex = train.examples_from_records(tests, task) if tests else None
    if test_ex is not None and None not in test_ex.rollout_score:
        w = train.heldout_figures(test_ex, np.array(test_ex.rollout_score, float), np.ones(len(test_ex.problem), bool), task)
        print(f"  on {a.test}, its rollouts' PRM: final-step AUROC {f(w['auroc_final'])} pooled, "
              f"{f(w['auroc_final_within'])} within; open prefixes {f(w['auroc_open_within'])} within "
              f"({w['open_groups_mixed']} problem-depths)")
    for name, lab in ((n, lab) for n in a.sets.split(",") for lab in labellings):
        feature_set, stats, version = SETS[name]
        features = learned.Features(a.embedder, feature_set=feature_set, stats=stats, version=version)
        x, y = features.rows(ex.question, ex.prefix), ys[lab]
        pred = np.zeros(len(y))
        problem = np.array(ex.problem)
        for k in range(a.folds):
            pred[fold == k] = fit_predict_set(name, features, x[fold != k], y[fold != k], problem[fold != k],
                                              x[fold == k], a.l2)
        report(f"learned, {name} ({x.shape[1]})" + (f", {lab}" if len(labellings) > 1 else ""), pred)
        if test_ex is not None:
            x_test = features.rows(test_ex.question, test_ex.prefix)
            scores = fit_predict_set(name, features, x, y, problem, x_test, a.l2)
            w = train.heldout_figures(test_ex, scores ** a.vote_power, np.ones(len(scores), bool), task)
            print(f"    on {a.test} ({w['problems']} problems, {w['solutions']} solutions): final-step AUROC "
                  f"{f(w['auroc_final'])} pooled, {f(w['auroc_final_within'])} within; weighted "
                  f"{f(w['acc_weighted'])}, best {f(w['acc_best'])}, majority {f(w['acc_majority'])}, "
                  f"any {f(w['acc_oracle'])}; weighted - majority "
                  "{:+.1f} [{:+.1f}, {:+.1f}]".format(*(100 * v for v in w["weighted_minus_majority"]))
                  + f"; open prefixes {f(w['auroc_open_within'])} within ({w['open_groups_mixed']} problem-depths)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
