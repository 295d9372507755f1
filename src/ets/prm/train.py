"""`ets train-prm`: learn a PRM (ets.prm.learned) from the policy's own rollouts.

1. Rollouts: best-of-N (`--samples` N) on a training set (default `gsm8k-train`, never the test
   split) through the ordinary harness: a run directory like any `ets run`, so an interrupted
   training resumes where it stopped and finished problems are never sampled again.
2. Labels, per solution prefix (every non-root node of a rollout tree):
   - `outcome` (default): the share of the rollouts through that node that end with the right
     answer; in a best-of-N tree every prefix lies on one rollout, so it is that rollout's 0/1
     outcome (an outcome-supervised value model). A rollout that stops without an answer (token
     or depth cap) counts as wrong.
   - `mc-soft` / `mc-hard` (Math-Shepherd): `--mc-k` K fresh completions from every prefix that
     is not a whole solution; label = the share of them that reach the gold answer (soft) or
     whether any does (hard). Completions are saved per problem under
     RUN_DIR/mc-k<K>-<hash>/, so they resume too. Costly: about K x (steps per rollout) more
     generation than the rollouts themselves.
3. Features per prefix: ets.prm.learned.Features, `--features full` (embedding of the prompt and
   of the prefix, the policy's log-prob statistics, arithmetic checks) or `stats` (the last two).
4. Fit: L2 logistic regression on standardised features (scipy L-BFGS), the L2 weight chosen
   among `--l2` by prefix AUROC on a validation split of the training problems, then refit on
   all of them. A held-out split BY PROBLEM (`--holdout`, by a hash of the problem id) is never
   fitted on: its figures go into the file.
5. One file (.npz, see ets.prm.learned) with the policy identity, the data, features, labels,
   fit, held-out figures and the training size and time.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LABELS = ("outcome", "mc-soft", "mc-hard")
FEATURE_SETS = ("full", "stats", "stats-split")  # ets.prm.learned.Features; here so that the CLI need not import numpy
DEFAULT_L2 = (1e-4, 1e-3, 1e-2, 1e-1)
POLICY_IDENTITY_FILE = "policy_identity.txt"  # in the rollout run directory


# -- command line --------------------------------------------------------------------------------

def add_arguments(p) -> None:
    """train-prm's own flags (the common ones come from ets.cli._add_common)."""
    g = p.add_argument_group("training a PRM (ets.prm.train)")
    g.add_argument("--samples", type=int, default=8, help="rollouts per training problem (best-of-N width; default 8)")
    g.add_argument("--labels", choices=LABELS, default="outcome",
                   help="outcome: each prefix gets its rollout's outcome (default); mc-soft/mc-hard: Math-Shepherd, "
                        "--mc-k completions from every prefix")
    g.add_argument("--mc-k", type=int, default=4, help="completions per prefix for mc-* labels (default 4)")
    g.add_argument("--features", choices=FEATURE_SETS, default="full",
                   help="full: embeddings (--embedder) of the question and prefix plus log-prob and arithmetic "
                        "statistics (default); stats: the statistics only (21 columns, no embedder); stats-split: "
                        "the statistics, one head for prefixes that state a final answer and one for the rest")
    g.add_argument("--holdout", type=float, default=0.2, help="share of problems held out, by problem (default 0.2)")
    g.add_argument("--l2", default=",".join(map(str, DEFAULT_L2)),
                   help="L2 weights tried (comma list; the best on a validation split of the training problems wins)")
    g.add_argument("--out", default=None, help="the PRM file (default RUNS_DIR/learned-prm-<rollout run>.npz)")
    g.add_argument("--resume", default=None, metavar="DIR", help="the rollout run directory to resume")
    g.add_argument("--fit-done", action="store_true",
                   help="sample nothing: fit on the rollouts already finished among the selected problems "
                        "(for a training cut short; a later run without it samples the rest)")
    p.set_defaults(dataset="gsm8k-train", limit=1000, max_tokens=1024)


def command(a) -> int:
    """Run `ets train-prm` (parsed arguments `a`); returns the exit status (as ets.cli's verbs).
    Rollouts that fail are reported (exit 1) and nothing is fitted: rerun to finish them."""
    from ets import cli
    from ets.checks import BadInput, validate_run_args
    from ets.prm.learned import policy_identity
    from ets.runner import Job, run_jobs, write_summary
    from ets.runs import RunDir
    from ets.tasks import load_dataset

    if a.samples < 1 or a.mc_k < 1 or not 0 < a.holdout < 1:
        raise BadInput("--samples and --mc-k must be >= 1 and --holdout in (0, 1)")
    l2 = [float(x) for x in a.l2.split(",") if x.strip()]
    if not l2 or any(x <= 0 for x in l2):
        raise BadInput(f"--l2 {a.l2}: give positive numbers")
    t0 = time.perf_counter()
    rc = cli.run_config(a)
    cfg = cli.search_config(a, "best_of_n", a.samples)
    validate_run_args(a)
    task, problems = load_dataset(rc.dataset, rc.limit, rc.offset, rc.ids or None, rc.question_field,
                                  rc.answer_field, rc.id_field)
    if not problems:
        raise BadInput(f"--offset {rc.offset}: no problems left in {rc.dataset}; lower --offset")
    run = rc.run_dir(cfg, task.to_dict(), resume=a.resume)
    # the policy's identity is kept beside the rollouts, so --fit-done needs no server
    known = run.path / POLICY_IDENTITY_FILE
    if a.fit_done and known.exists():
        models, identity = None, known.read_text().strip()
    else:
        models = cli._models(a, rc)
        identity = policy_identity(models[0])
        known.write_text(identity + "\n")
    print(f"rollouts: {run.path}  ({len(problems)} problems x {a.samples} samples, "
          f"{sum(run.is_done(p.id) for p in problems)} problems already done); policy {identity}", file=sys.stderr)
    if a.fit_done:
        problems = [p for p in problems if run.is_done(p.id)]
        if len(problems) < 2:
            raise BadInput(f"--fit-done: {len(problems)} finished rollout problems in {run.path}; "
                           "run without --fit-done to sample some first")
        if a.labels != "outcome":
            raise BadInput("--fit-done fits outcome labels only (mc-* labels need every completion sampled)")
    groups = [] if a.fit_done else [[Job(p, cfg, run)] for p in problems]

    async def work(policy, prm):
        outcomes = await run_jobs(groups, task, policy, prm, concurrency=rc.concurrency, vote=rc.vote,
                                  agg=rc.agg, progress=not a.no_progress, admit_until=rc.admit_until)
        failures = [f for o in outcomes.values() for f in o.failures]
        deferred.extend(o.deferred for o in outcomes.values())
        if not failures and a.labels != "outcome":
            await mc_completions(run, problems, task, policy, cfg, a.mc_k, rc.concurrency, not a.no_progress)
        return failures

    deferred: list[int] = []
    if a.fit_done:
        failures = []
    else:
        try:
            failures = cli._execute(work, a, rc, models=models)
        finally:
            write_summary(run, [p.id for p in problems])
    if failures:
        cli._report_failures(failures)
        print("no PRM was fitted: every rollout must be in first.", file=sys.stderr)
        return 1
    if sum(deferred):
        print(f"no PRM was fitted: {sum(deferred)} rollout problem(s) not started (--admit-until); run the same "
              "command again to sample them, or add --fit-done to fit on the finished ones", file=sys.stderr)
        return 0
    out = Path(a.out or Path(rc.runs_dir) / f"learned-prm-{run.name}.npz")
    setup = {"policy_spec": run.config()["identity"]["policy"], "dataset": rc.dataset, "limit": rc.limit,
             "offset": rc.offset, "samples": a.samples, "sampling": asdict(cfg.sampling) | {
                 "max_tokens": cfg.max_tokens, "max_depth": cfg.max_depth, "seed": cfg.seed},
             "rollout_prm": run.config()["identity"]["prm"], "command": "ets " + " ".join(getattr(a, "argv", []))}
    meta = train_from_run(run, [p.id for p in problems], out, identity, embedder=rc.embedder, labels=a.labels,
                          feature_set=a.features, mc_k=a.mc_k, holdout=a.holdout, l2=l2, seed=a.seed, setup=setup, started=t0)
    print(json.dumps(meta, indent=1) if a.json else summary_line(meta, out))
    return 0


def summary_line(meta: dict, out: Path) -> str:
    h, t = meta["heldout"], meta["train"]

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    return (f"learned PRM: {out} ({out.stat().st_size / 1e6:.2f} MB) for policy {meta['policy']}\n"
            f"  trained on {t['problems']} problems, {t['prefixes']} prefixes ({t['positive_share']:.2f} positive), "
            f"{t['generated_tokens']} rollout tokens; rollouts {t['rollout_s']:.0f} s, features {t['features_s']:.0f} s, "
            f"fit {t['fit_s']:.1f} s, total {t['total_s']:.0f} s\n"
            f"  held out ({h['problems']} problems, {h['solutions']} solutions): AUROC final step {f(h['auroc_final'])} "
            f"(rollout PRM {f(h['auroc_final_rollout_prm'])}), all prefixes {f(h['auroc_prefix'])}; "
            f"accuracy weighted {f(h['acc_weighted'])}, best {f(h['acc_best'])}, majority {f(h['acc_majority'])}, "
            f"any {f(h['acc_oracle'])}")


# -- examples and labels -------------------------------------------------------------------------

@dataclass
class Examples:
    """One entry per solution prefix (a non-root node of a rollout tree), in problem order."""

    problem: list[str] = field(default_factory=list)
    question: list[str] = field(default_factory=list)  # the prompt the search gives the PRM
    prefix: list[list[tuple]] = field(default_factory=list)  # [(step text, token log-probs)]
    label: list[float] = field(default_factory=list)  # the training label (scheme-dependent)
    outcome: list[float] = field(default_factory=list)  # share of rollouts through it that are right
    final: list[bool] = field(default_factory=list)  # a whole solution (finished with an answer)
    answer: list[str | None] = field(default_factory=list)  # its answer (finals)
    rollout_score: list[float | None] = field(default_factory=list)  # the rollouts' PRM score
    path: list[list[int]] = field(default_factory=list)  # example indices of its steps 1..i
    gold: dict[str, str] = field(default_factory=dict)  # problem id -> gold


def node_outcomes(tree, task, gold: str) -> dict[int, float]:
    """node id -> share of the leaves below it (itself, for a leaf) that are right: a leaf is
    right when it finished with an answer the task grades equal to `gold`."""
    from ets.tree import ANSWER

    right: dict[int, list[int]] = {}
    for node in tree.nodes:
        if node.children or node.is_root:
            continue
        ok = 0
        if node.finish == ANSWER:
            ans = task.extract(node.text) or task.extract("".join(node.step_texts()))
            ok = int(ans is not None and task.grade(ans, gold))
        for n in [node, *node.ancestors()]:
            r = right.setdefault(n.id, [0, 0])
            r[0], r[1] = r[0] + ok, r[1] + 1
    return {i: r / n for i, (r, n) in right.items()}


def examples_from_records(records, task, labels: str = "outcome", mc: dict | None = None) -> Examples:
    """Examples of the saved problem records (ets.runner.problem_record), labelled by `labels`.
    mc: problem id -> {node id (str): [right, total]} completions (mc-* labels), needed for every
    inner node (ValueError otherwise); leaves (whole solutions, dead ends) keep their outcome."""
    from ets.tree import ANSWER
    from ets.treeio import tree_from_dict

    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    ex = Examples()
    for rec in records:
        tree = tree_from_dict(rec["tree"])
        outcome = node_outcomes(tree, task, rec["gold"])
        ex.gold[rec["id"]] = rec["gold"]
        counts = (mc or {}).get(rec["id"])
        if labels != "outcome" and counts is None:
            raise ValueError(f"problem {rec['id']} has no saved completions: run `ets train-prm --labels {labels}` "
                             "again to make them")
        index: dict[int, int] = {}
        for node in tree.nodes[1:]:  # parents before children
            if labels == "outcome" or not node.children:
                label = outcome[node.id]
            else:
                if str(node.id) not in counts:
                    raise ValueError(f"problem {rec['id']}: node {node.id} has no saved completions")
                r, n = counts[str(node.id)]
                label = r / n if labels == "mc-soft" else float(r > 0)
            index[node.id] = len(ex.problem)
            ex.problem.append(rec["id"])
            ex.question.append(rec["prompt"])
            ex.prefix.append([(n.text, n.logprobs) for n in node.path()])
            ex.label.append(float(label))
            ex.outcome.append(outcome[node.id])
            fin = node.finish == ANSWER
            ex.final.append(fin)
            ex.answer.append((task.extract(node.text) or task.extract("".join(node.step_texts()))) if fin else None)
            ex.rollout_score.append(node.score)
            ex.path.append([index[n.id] for n in node.path()])
    return ex


def in_holdout(problem_id: str, share: float, seed: int = 0, salt: str = "heldout") -> bool:
    """Whether a problem is held out: a hash of (salt, seed, id) below `share` (stable across runs
    and machines, independent of the problem order)."""
    h = hashlib.blake2b(f"{salt}/{seed}/{problem_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < share


# -- fitting -------------------------------------------------------------------------------------

def fit_logistic(x, y, alpha: float, max_iter: int = 300):
    """L2 logistic regression on standardised features: minimises mean cross-entropy(y, p) +
    alpha/2 |w|^2 with p = sigmoid(((x - mean) / scale) w + b); y may be soft (in [0, 1]).
    Returns (w, b, mean, scale, info)."""
    import numpy as np
    from scipy.optimize import minimize

    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float64)
    mean = x.mean(0, dtype=np.float64)
    scale = x.std(0, dtype=np.float64)
    scale[scale < 1e-8] = 1.0
    z = ((x - mean) / scale).astype(np.float32)
    n, d = z.shape

    def loss(theta):
        w, b = theta[:d], theta[d]
        s = z @ w.astype(np.float32) + b
        s = s.astype(np.float64)
        ce = np.logaddexp(0.0, s) - y * s
        p = 0.5 * (1.0 + np.tanh(0.5 * s))
        r = (p - y) / n
        g = np.empty(d + 1)
        g[:d] = (z.T @ r.astype(np.float32)).astype(np.float64) + alpha * w
        g[d] = r.sum()
        return ce.mean() + 0.5 * alpha * w @ w, g

    res = minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    return res.x[:d], float(res.x[d]), mean, scale, {"iterations": int(res.nit), "converged": bool(res.success),
                                                      "loss": float(res.fun)}


def _predict(x, w, b, mean, scale):
    """One head's scores of x [N, D] (ets.prm.learned.score_rows, every row by head 0)."""
    import numpy as np

    from ets.prm.learned import score_rows

    return score_rows(x, np.zeros(len(x), np.int64), w, b, mean, scale)


def fit_heads(x, y, outcome, problems, head, heads: int, grid, seed: int = 0):
    """One L2 logistic head per head index: head h is fitted (its L2 weight chosen by choose_l2) on
    the rows with head[n] == h. Returns (weight, bias, mean, scale, infos) in the file's layout
    (ets.prm.learned.save: [D] and [1] for one head, [H, D] and [H] for more) and one info dict per
    head; ValueError naming the head when its rows are absent or of one label."""
    import numpy as np

    problems = np.asarray(problems)
    params, infos = [], []
    for h in range(heads):
        rows = head == h
        if len(set(y[rows] >= 0.5)) < 2:
            raise ValueError(f"head {h} of {heads} has {int(rows.sum())} training prefixes, not both right and wrong "
                             "ones: use more problems (--limit) or a one-head feature set")
        alpha, tried = choose_l2(x[rows], y[rows], outcome[rows], list(problems[rows]), grid, seed)
        w, b, mean, scale, info = fit_logistic(x[rows], y[rows], alpha)
        params.append((w, b, mean, scale))
        infos.append({"rows": int(rows.sum()), "l2": alpha, "l2_tried": tried, **info})
    if heads == 1:
        w, b, mean, scale = params[0]
        return w, np.array([b]), mean, scale, infos
    return (np.stack([p[0] for p in params]), np.array([p[1] for p in params]), np.stack([p[2] for p in params]),
            np.stack([p[3] for p in params]), infos)


def choose_l2(x, y, outcome, problems, grid, seed: int = 0):
    """The L2 weight of `grid` with the best prefix AUROC (against `outcome` >= 0.5) on a
    validation split (a fifth of the problems, by hash); the middle of the grid when that split
    has one class only; a grid of one without fitting. Returns (alpha, [{alpha, val_auroc}])."""
    import numpy as np

    from ets.report.prm_worth import auroc

    if len(grid) == 1:
        return grid[0], []
    val = np.array([in_holdout(p, 0.2, seed, salt="validation") for p in problems])
    tried = []
    if val.any() and (~val).any():
        for alpha in grid:
            w, b, m, s, _ = fit_logistic(x[~val], y[~val], alpha)
            tried.append({"alpha": alpha, "val_auroc": auroc(list(_predict(x[val], w, b, m, s)),
                                                              list(outcome[val] >= 0.5))})
    scored = [t for t in tried if t["val_auroc"] is not None]
    if not scored:
        return sorted(grid)[len(grid) // 2], tried
    best = max(scored, key=lambda t: (t["val_auroc"], t["alpha"]))  # ties: the stronger penalty
    return best["alpha"], tried


# -- held-out figures ----------------------------------------------------------------------------

def heldout_figures(ex: Examples, scores, mask, task, per_problem: bool = False) -> dict:
    """Figures of `scores` (one per example) on the examples where `mask` is set: AUROC of the
    final-step score against correctness (also for the rollouts' own PRM), pooled over solutions
    and the mean within problems; AUROC over every prefix against its outcome, and over the open
    prefixes of one depth of one problem (auroc_open_within, the mean over such groups); and best-of-N
    accuracy of the weighted vote, the single best, the plain majority and any-correct.
    `per_problem` adds {"ids": [...], "weighted"|"best"|"majority"|"oracle": [bool, ...]} (each
    rule's outcome per problem, in `ids` order) for pairing with other runs."""
    import numpy as np

    from ets.answer import Solution, select_answer
    from ets.report.prm_worth import auroc
    from ets.report.record import paired_interval

    idx = [i for i in range(len(ex.problem)) if mask[i]]
    fin = [i for i in idx if ex.final[i]]
    right = [ex.outcome[i] >= 0.5 for i in fin]
    out = {"prefixes": len(idx), "solutions": len(fin), "problems": len({ex.problem[i] for i in idx}),
           "auroc_prefix": auroc([float(scores[i]) for i in idx], [ex.outcome[i] >= 0.5 for i in idx]),
           "auroc_final": auroc([float(scores[i]) for i in fin], right)}
    rs = [ex.rollout_score[i] for i in fin]
    out["auroc_final_rollout_prm"] = auroc(rs, right) if None not in rs else None
    by_problem: dict[str, list[int]] = {}
    for i in fin:
        by_problem.setdefault(ex.problem[i], [])
        by_problem[ex.problem[i]].append(i)
    within = [auroc([float(scores[i]) for i in v], [ex.outcome[i] >= 0.5 for i in v]) for v in by_problem.values()]
    within = [w for w in within if w is not None]
    out["auroc_final_within"] = float(np.mean(within)) if within else None
    out["problems_mixed"] = len(within)
    # What a search sees: at one depth of one problem, the open prefixes (no final answer yet)
    # ranked against their rollouts' outcomes; the mean over (problem, depth) groups with both.
    groups: dict[tuple, list[int]] = {}
    for i in idx:
        if not ex.final[i]:
            groups.setdefault((ex.problem[i], len(ex.path[i])), []).append(i)
    open_within = [auroc([float(scores[i]) for i in v], [ex.outcome[i] >= 0.5 for i in v]) for v in groups.values()]
    open_within = [w for w in open_within if w is not None]
    out["auroc_open_within"] = float(np.mean(open_within)) if open_within else None
    out["open_groups_mixed"] = len(open_within)
    problems = sorted({ex.problem[i] for i in idx})
    right_by = {"weighted": [], "best": [], "majority": [], "oracle": []}  # per problem, in `problems` order
    for p in problems:
        sols = [Solution(i, ex.answer[i], tuple(float(scores[j]) for j in ex.path[i])) for i in by_problem.get(p, [])]
        for vote in ("weighted", "best", "majority"):
            sel = select_answer(sols, vote, "last", task.same)
            right_by[vote].append(bool(sel.answer is not None and task.grade(sel.answer, ex.gold[p])))
        right_by["oracle"].append(any(ex.outcome[i] >= 0.5 for i in by_problem.get(p, [])))
    for k, v in right_by.items():
        out[f"acc_{k}"] = sum(v) / len(problems) if problems else None
    # the vote's gain over the majority on the same problems: (difference, 95% low, high)
    out["weighted_minus_majority"] = list(paired_interval(right_by["weighted"], right_by["majority"]))
    if per_problem:
        out["per_problem"] = {"ids": problems, **right_by}
    return out


# -- the whole training --------------------------------------------------------------------------

def train_from_run(run, problem_ids, out, policy: str, embedder: str = "minilm", labels: str = "outcome",
                   feature_set: str = "full", mc_k: int = 4, holdout: float = 0.2, l2=DEFAULT_L2, seed: int = 0, setup: dict | None = None,
                   started: float | None = None, features=None) -> dict:
    """Fit a learned PRM on the finished rollouts of `run` (a RunDir) for `problem_ids` and save it
    to `out`; returns its metadata. `policy`: the policy identity recorded in the file. mc-*
    labels read the completions mc_completions saved in the run directory. `features`: a
    ets.prm.learned.Features (default: `feature_set` over `embedder`)."""
    import numpy as np

    from ets.prm import learned
    from ets.tasks import Task

    t0 = time.perf_counter()
    wanted = set(problem_ids)
    records = [r for r in run.iter_problems() if r["id"] in wanted]
    if not records:
        raise ValueError(f"{run.path} has no finished rollouts for these problems")
    task = Task.from_dict(records[0]["task"])
    mc = load_mc(run, mc_k) if labels != "outcome" else None
    ex = examples_from_records(records, task, labels, mc)
    held = np.array([in_holdout(p, holdout, seed) for p in ex.problem])
    if held.all() or not held.any():
        raise ValueError(f"the held-out split ({holdout:.0%} of {len(records)} problems, by problem) leaves "
                         "one side empty: use more problems (--limit) or another --holdout")
    y, outcome = np.array(ex.label), np.array(ex.outcome)
    if len(set(y[~held] >= 0.5)) < 2:
        raise ValueError(f"every training prefix has the same label ({y[~held][0]}): the policy got every training "
                         "problem right or every one wrong; use more or other problems (or more --samples)")
    features = features or learned.Features(embedder, feature_set=feature_set)
    t_feat = time.perf_counter()
    x = features.rows(ex.question, ex.prefix)
    features_s = time.perf_counter() - t_feat
    t_fit = time.perf_counter()
    train_problems = [p for p, h in zip(ex.problem, held) if not h]
    head = features.head_of(x)
    w, b, mean, scale, heads = fit_heads(x[~held], y[~held], outcome[~held], train_problems, head[~held],
                                         features.heads, list(l2), seed)
    fit_s = time.perf_counter() - t_fit
    scores = learned.score_rows(x, head, w, b, mean, scale)
    sessions = run.sessions()
    meta = {
        "format": learned.FORMAT, "kind": learned.KIND, "policy": policy,
        "data": {**(setup or {}), "rollout_run": run.name, "problems": len(records),
                 "task": task.to_dict()},
        "labels": {"scheme": labels, **({"mc_k": mc_k} if labels != "outcome" else {}),
                   "meaning": "P(a solution through this prefix ends right)" if labels == "outcome" else
                   "share of mc_k completions from this prefix that reach the gold answer" if labels == "mc-soft"
                   else "whether any of mc_k completions from this prefix reaches the gold answer"},
        "features": {**features.describe(), "dim": int(x.shape[1])},
        "fit": {"model": "logistic regression, L2, standardised features (scipy L-BFGS)",
                **({k: v for k, v in heads[0].items() if k != "rows"} if len(heads) == 1 else
                   {"heads": [{"scores": s, **h} for s, h in zip(("open prefixes", "answered prefixes"), heads)]})},
        "heldout": {"share": holdout, "split": f"blake2b('heldout/{seed}/<problem id>') < share",
                    **heldout_figures(ex, scores, held, task),
                    "ids": sorted({p for p, h in zip(ex.problem, held) if h})},
        "train": {"problems": len(set(train_problems)), "prefixes": int((~held).sum()),
                  "positive_share": float((y[~held] >= 0.5).mean()),
                  "train_auroc_prefix": _auroc(scores[~held], outcome[~held] >= 0.5),
                  "generated_tokens": int(sum(r["counters"].get("generated_tokens", 0) for r in records)),
                  "rollout_s": float(sum(s.get("wall_s", 0.0) for s in sessions)),
                  "mc_s": float(sum(m.get("wall_s", 0.0) for m in (mc or {}).get("__sessions__", []))),
                  "features_s": features_s, "fit_s": fit_s,
                  "total_s": time.perf_counter() - (started if started is not None else t0),
                  "made_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
    }
    learned.save(out, w, b, mean, scale, meta)
    return meta


def _auroc(scores, labels):
    from ets.report.prm_worth import auroc

    return auroc([float(s) for s in scores], [bool(v) for v in labels])


# -- Math-Shepherd completions -------------------------------------------------------------------

def mc_dir(run, k: int) -> Path:
    return Path(run.path) / f"mc-k{k}"


def load_mc(run, k: int) -> dict:
    """problem id -> {node id (str): [right, total]} of the saved completions, plus
    "__sessions__": [{"wall_s", "generated_tokens"}] (one per saved problem)."""
    from ets.runs import read_json

    out: dict = {"__sessions__": []}
    d = mc_dir(run, k)
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        rec = read_json(f)
        out[rec["id"]] = rec["counts"]
        out["__sessions__"].append({"wall_s": rec["wall_s"], "generated_tokens": rec["generated_tokens"]})
    return out


async def complete(policy, tree, nodes, k: int, cfg, task, gold: str) -> tuple[dict[int, list[int]], int]:
    """k completions of each node of `nodes` (of `tree`, which grows), each continued one step at a
    time until it finishes (ets.search.classify) or reaches cfg.max_depth. Returns ({node id:
    [right, k]}, generated tokens). Each node is asked for k + 1 children and the first is dropped:
    under a seeded engine it is the rollout's own next step (ets.engines.base.node_seed)."""
    from ets.engines.base import Expansion
    from ets.search import classify
    from ets.tree import ANSWER

    if not nodes:
        return {}, 0
    steps = await policy.expand([Expansion(n, k + 1) for n in nodes], cfg.sampling)
    live, origin, tokens = [], {}, 0
    counts = {n.id: [0, k] for n in nodes}
    for node, got in zip(nodes, steps):
        for s in got[1:]:
            child = tree.add_child(node, s.token_ids, s.text, s.stop_reason, s.logprobs)
            origin[child.id], tokens = node.id, tokens + len(s.token_ids)
            live.append(child)
    while live:
        nxt = []
        for c in live:
            c.finish = classify(c, cfg)
            if c.finish == ANSWER:
                ans = task.extract(c.text) or task.extract("".join(c.step_texts()))
                counts[origin[c.id]][0] += int(ans is not None and task.grade(ans, gold))
            elif c.finish is None and c.depth < cfg.max_depth:
                nxt.append(c)
        policy.release([c for c in live if c not in nxt])
        if not nxt:
            break
        steps = await policy.expand([Expansion(c, 1) for c in nxt], cfg.sampling)
        live = []
        for c, got in zip(nxt, steps):
            child = tree.add_child(c, got[0].token_ids, got[0].text, got[0].stop_reason, got[0].logprobs)
            origin[child.id], tokens = origin[c.id], tokens + len(got[0].token_ids)
            live.append(child)
    return counts, tokens


async def mc_completions(run, problems, task, policy, cfg, k: int, concurrency: int = 1,
                         progress: bool = True) -> None:
    """Math-Shepherd completions for every finished rollout problem of `problems` that has none
    saved yet: k from each inner node (a prefix that is not a whole solution), saved atomically
    as mc_dir(run, k)/<problem>.json = {"id", "counts": {node id: [right, k]}, "wall_s",
    "generated_tokens"}; a problem whose file exists is skipped (that is how it resumes)."""
    import asyncio

    from tqdm import tqdm

    from ets.runs import atomic_write_json, safe_name
    from ets.treeio import tree_from_dict

    d = mc_dir(run, k)
    todo = [p for p in problems if run.is_done(p.id) and not (d / f"{safe_name(p.id)}.json").exists()]
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(todo), desc=f"completions (k={k})", unit="problem", file=sys.stderr,
               disable=not progress or not todo)

    async def one(p):
        async with sem:
            rec = run.load_problem(p.id)
            tree = tree_from_dict(rec["tree"])
            inner = [n for n in tree.nodes[1:] if n.children]
            t = time.perf_counter()
            counts, tokens = await complete(policy, tree, inner, k, cfg, task, rec["gold"])
            atomic_write_json(d / f"{safe_name(p.id)}.json", {"id": p.id, "counts": {str(i): c for i, c in counts.items()},
                                                              "wall_s": time.perf_counter() - t,
                                                              "generated_tokens": tokens})
            bar.update(1)

    try:
        await asyncio.gather(*(one(p) for p in todo))
    finally:
        bar.close()


# -- judging a learned PRM on saved trees of other problems (no generation) ----------------------

def evaluate_run(prm_path, run_dir, ids=None, per_problem: bool = False) -> dict:
    """heldout_figures of the learned PRM in `prm_path` on every saved problem of `run_dir` (or
    those in `ids`), rescoring the saved trees: for a best-of-N run of test problems (its samples
    do not depend on the PRM) this is the PRM's final-step AUROC and its weighted / best /
    majority / any-correct accuracy, without generating anything (`per_problem`: each rule's
    outcome per problem too, see heldout_figures, with "kv_mean": each problem's tree KV mean from
    its record). The policy check is the caller's: the run's records name the policy by engine,
    not by model."""
    import numpy as np

    from ets.prm.learned import LearnedPRM
    from ets.runs import RunDir
    from ets.tasks import Task

    prm = LearnedPRM(prm_path)
    wanted = None if ids is None else set(ids)
    records = [r for r in RunDir(run_dir).iter_problems() if wanted is None or r["id"] in wanted]
    if not records:
        raise ValueError(f"{run_dir} has no saved problems to judge the PRM on")
    task = Task.from_dict(records[0]["task"])
    ex = examples_from_records(records, task)
    scores = prm.predict(prm.features.rows(ex.question, ex.prefix))
    out = {"prm": prm.name, "run": str(run_dir),
           **heldout_figures(ex, scores, np.ones(len(scores), bool), task, per_problem)}
    if per_problem:
        kv = {r["id"]: r["kv"]["kv_mean"] for r in records}
        out["per_problem"]["kv_mean"] = [kv[i] for i in out["per_problem"]["ids"]]
    return out
