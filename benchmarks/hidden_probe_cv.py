"""Experiment: a value head on the policy's own hidden state (benchmarks/policy_hidden.py) beside
the statistics head of `ets train-prm --features stats-split`, judged as benchmarks/learned_prm_cv.py
judges feature sets: 5-fold cross-validation by problem on the rollouts, and fitted on every
rollout, judged on another run's best-of-N trees.

    python benchmarks/hidden_probe_cv.py TRAIN_RUN TRAIN_HIDDEN [--test RUN --test-hidden DIR] \
        [--sets stats,L16,L16+stats,pca16:12+stats,L12-within] [--l2 1e-2,1e-1] [--no-cv]

A set joins parts with "+": `stats` (the 21 statistics of `--features stats`), `L<i>` (layer i's
state at the prefix's last token, 896 columns for the benchmark model), `pca<K>:<i>` (its first K
principal components, fitted on the training rows). Every set has two heads, as `--features
stats-split` (open prefixes, whole solutions); a `-within` suffix fits the solutions' head on
contrasts within a problem (learned_prm_cv.within_head). Outcome labels; L2 weight per --l2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ets.prm import learned, train
from ets.runs import RunDir
from ets.tasks import Task
from ets.treeio import tree_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from learned_prm_cv import fit_heads_predict, fold_of  # noqa: E402

DEFAULT_LAYERS = (8, 12, 16, 20, 24)  # policy_hidden.py's default (files without `layers`)


def load(run_dir, hidden_dir, task=None, limit=None):
    """(Examples, hidden [N, L, D] float32, the L layers' indices, task) of the run's problems that
    have a hidden-state file (the first `limit` of them, in file-name order)."""
    hidden_dir = Path(hidden_dir)
    recs = [r for r in RunDir(run_dir).iter_problems() if (hidden_dir / f"{r['id']}.npz").exists()][:limit]
    if not recs:
        raise SystemExit(f"{run_dir}: no finished problem has a hidden-state file in {hidden_dir} "
                         "(make them with benchmarks/policy_hidden.py)")
    task = task or Task.from_dict(recs[0]["task"])
    ex = train.examples_from_records(recs, task)
    hs, layers_of_all = [], None
    for r in recs:
        z = np.load(hidden_dir / f"{r['id']}.npz")
        layers = [int(i) for i in z["layers"]] if "layers" in z else list(DEFAULT_LAYERS)
        if layers_of_all is not None and layers != layers_of_all:
            raise ValueError(f"{hidden_dir}/{r['id']}.npz holds layers {layers}, the others {layers_of_all}")
        layers_of_all = layers
        by = {int(n): h for n, h in zip(z["node"], z["h"])}
        for node in tree_from_dict(r["tree"]).nodes[1:]:  # examples_from_records' order
            hs.append(by[node.id] if node.id in by else np.zeros_like(z["h"][0]))
    return ex, np.stack(hs).astype(np.float32), layers_of_all, task


def columns(name, h, layers, stats, pca):
    """The feature columns of set `name` (see the module docstring) of hidden states h [N, L, D]
    (layers: their indices) and statistics [N, 21]; pca: part -> (mean, components), filled by the
    first call that meets a pca part (so call it on the training rows first)."""
    parts = []
    for part in name.split("+"):
        if part == "stats":
            parts.append(stats)
        elif part.startswith("L"):
            parts.append(h[:, layers.index(int(part[1:]))])
        elif part.startswith("pca"):  # pcaK:L -> layer L's first K principal components (fitted on the training rows)
            k, layer = part[3:].split(":")
            x = h[:, layers.index(int(layer))]
            if part not in pca:
                c = x - x.mean(0)
                _, _, vt = np.linalg.svd(c[:: max(1, len(c) // 20000)], full_matrices=False)
                pca[part] = (x.mean(0), vt[: int(k)].T)
            mu, v = pca[part]
            parts.append((x - mu) @ v)
        else:
            raise ValueError(part)
    return np.concatenate(parts, 1)


def fit_predict(x, y, final, problems, x_new, final_new, l2, within=False):
    """Two heads (open prefixes, answered ones) as `ets train-prm --features stats-split` fits
    them, the head chosen by `final` (an L<i>-only set has no statistics to read it from)."""
    return fit_heads_predict(x, y, final.astype(np.int64), problems, x_new, final_new.astype(np.int64), 2, l2, within)


def line(name, w):
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"  {name:20s} final AUROC {f(w['auroc_final'])} pooled, {f(w['auroc_final_within'])} within "
            f"({w['problems_mixed']} mixed); weighted {f(w['acc_weighted'])}, best {f(w['acc_best'])}, "
            f"majority {f(w['acc_majority'])}, any {f(w['acc_oracle'])}; weighted - majority "
            "{:+.1f} [{:+.1f}, {:+.1f}]".format(*(100 * v for v in w["weighted_minus_majority"]))
            + f"; open prefixes {f(w['auroc_open_within'])} within ({w['open_groups_mixed']} problem-depths)")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("train_run")
    p.add_argument("train_hidden")
    p.add_argument("--test")
    p.add_argument("--test-hidden")
    p.add_argument("--sets", default="stats,L24,L16,L12,L16+stats")
    p.add_argument("--l2", default="1e-3,1e-2,1e-1")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--no-cv", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="the first N training problems with a file")
    a = p.parse_args()
    ex, h, layers, task = load(a.train_run, a.train_hidden, limit=a.limit)
    feats = learned.Features("hash", feature_set="stats")
    stats = feats.rows(ex.question, ex.prefix)
    y, final = np.array(ex.label), np.array(ex.final)
    problem = np.array(ex.problem)
    fold = np.array([fold_of(i, a.folds) for i in ex.problem])  # learned_prm_cv.py's folds
    print(f"{a.train_run}: {len(set(ex.problem))} problems, {len(y)} prefixes, {final.sum()} solutions; hidden {h.shape}")
    test = None
    if a.test:
        tex, th, test_layers, _ = load(a.test, a.test_hidden, task)
        if test_layers != layers:
            raise SystemExit(f"{a.test_hidden} holds layers {test_layers}, {a.train_hidden} {layers}")
        tstats = feats.rows(tex.question, tex.prefix)
        test = (tex, th, tstats, np.array(tex.final))
        print(f"{a.test}: {len(set(tex.problem))} problems, {np.array(tex.final).sum()} solutions")
    pca: dict = {}
    for name in a.sets.split(","):
        within = name.endswith("-within")
        x = columns(name.removesuffix("-within"), h, layers, stats, pca)
        for l2 in [float(v) for v in a.l2.split(",")]:
            if not a.no_cv:
                pred = np.zeros(len(y))
                for k in range(a.folds):
                    tr = fold != k
                    pred[~tr] = fit_predict(x[tr], y[tr], final[tr], problem[tr], x[~tr], final[~tr], l2, within)
                print(line(f"cv {name} l2={l2:g}", train.heldout_figures(ex, pred, np.ones(len(y), bool), task)), flush=True)
            if test is not None:
                tex, th, tstats, tfinal = test
                s = fit_predict(x, y, final, problem, columns(name.removesuffix("-within"), th, layers, tstats, pca), tfinal, l2, within)
                print(line(f"test {name} l2={l2:g}", train.heldout_figures(tex, s, np.ones(len(s), bool), task)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
