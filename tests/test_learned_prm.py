"""The learned PRM (ets.prm.learned, ets.prm.train, `ets train-prm`, `--prm learned:PATH`), with
mock policies and the hashed bag-of-words embedder (no model is loaded)."""

import asyncio
import hashlib
import json
import random
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

import ets.cli as cli
import ets.factory
from ets.engines.base import DELIMITER, EOS, Step
from ets.engines.mock import MockPolicy, tokenize
from ets.prm import learned, train
from ets.prm.base import ScoreRequest
from ets.runs import RunDir
from ets.tasks import Task
from ets.tree import ANSWER, CAP, Tree
from ets.treeio import tree_to_dict
from conftest import toy_dataset

MOCK = ["--policy", "mock", "--embedder", "hash", "--no-progress"]
TASK = Task("toy", numeric=True)


class PlantedPolicy(MockPolicy):
    """Step 1 is "Plan: careful" or "Plan: quick" (half each); step 2 computes; step 3 boxes 42
    (the gold) with probability 0.9 after a careful plan, 0.1 after a quick one, else 7. So the
    outcome is readable from the first step on: the signal a value model should find."""

    name = "planted"

    def _draw(self, node, k):
        key = hashlib.blake2b(repr((self.seed, node.path_token_ids(), k)).encode(), digest_size=8).digest()
        return random.Random(key)

    async def expand(self, requests, sampling):
        self.calls += 1
        out = []
        for req in requests:
            steps, depth, path = [], req.node.depth + 1, "".join(req.node.step_texts())
            for k in range(req.n):
                rng = self._draw(req.node, k)
                if depth == 1:
                    text = f"Plan: {'careful' if rng.random() < 0.5 else 'quick'} work on it"
                elif depth == 2:
                    text = f"Compute {rng.randint(1, 9)} times {rng.randint(1, 9)}"
                else:
                    p = 0.9 if "careful" in path else 0.1
                    text = f"So the answer is \\boxed{{{42 if rng.random() < p else 7}}}"
                text += sampling.step_delimiter
                ids = tokenize(text)
                steps.append(Step(tuple(ids), text, EOS if depth >= 3 else DELIMITER,
                                  tuple(-rng.random() for _ in ids)))
            out.append(steps)
        return out


@pytest.fixture
def toy(tmp_path):
    return toy_dataset(tmp_path, 30, question=lambda i: f"problem {i}: {i} + {42 - i}?")


@pytest.fixture
def planted(monkeypatch):
    import ets.checks

    real, check = ets.factory.make_policy, ets.checks._check_policy
    monkeypatch.setattr(ets.checks, "_check_policy", lambda spec: None if spec == "planted" else check(spec))
    monkeypatch.setattr(ets.factory, "make_policy",
                        lambda spec, **kw: PlantedPolicy(seed=kw.get("seed", 0)) if spec == "planted" else real(spec, **kw))


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name, argv, monkeypatch):
    """Run benchmarks/<name> as __main__ with argv; its exit code."""
    monkeypatch.setattr(sys, "argv", [str(BENCH / name), *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH / name), run_name="__main__")
    return done.value.code


def _train(toy, tmp_path, *extra):
    out = tmp_path / "prm.npz"
    rc = cli.main(["train-prm", "--policy", "planted", "--embedder", "hash", "--no-progress", *toy,
                   "--samples", "8", "--l2", "0.01", "--holdout", "0.3", "--out", str(out), *extra])
    return rc, out


# -- labels --------------------------------------------------------------------------------------

def _record():
    """root -> a -> b (boxes 42: right), a -> c (boxes 7: wrong); root -> d (token cap)."""
    tree = Tree([1, 2], "prompt")
    a = tree.add_child(tree.root, [3], "Plan\n\n", DELIMITER, [-0.1])
    b = tree.add_child(a, [4], "so \\boxed{42}", EOS, [-0.2])
    c = tree.add_child(a, [5], "so \\boxed{7}", EOS, [-0.3])
    d = tree.add_child(tree.root, [6], "and on and on", "length", [-0.4])
    b.finish = c.finish = ANSWER
    d.finish = CAP
    for n, s in ((a, 0.5), (b, 0.9), (c, 0.2), (d, 0.1)):
        n.score = s
    return {"id": "p", "prompt": "Q?", "gold": "42", "tree": tree_to_dict(tree)}, (a, b, c, d)


def test_outcome_labels_spread_over_prefixes():
    rec, (a, b, c, d) = _record()
    ex = train.examples_from_records([rec], TASK)
    assert ex.label == [0.5, 1.0, 0.0, 0.0]  # a: one of its two rollouts right; the cap counts as wrong
    assert ex.final == [False, True, True, False]
    assert ex.answer == [None, "42", "7", None]
    assert ex.path == [[0], [0, 1], [0, 2], [3]]
    assert ex.prefix[1] == [("Plan\n\n", [-0.1]), ("so \\boxed{42}", [-0.2])]
    assert ex.question == ["Q?"] * 4 and ex.rollout_score == [0.5, 0.9, 0.2, 0.1]


def test_math_shepherd_labels_from_completions():
    rec, (a, *_) = _record()
    mc = {"p": {str(a.id): [1, 4]}}
    assert train.examples_from_records([rec], TASK, "mc-soft", mc).label == [0.25, 1.0, 0.0, 0.0]
    assert train.examples_from_records([rec], TASK, "mc-hard", mc).label == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="no saved completions"):
        train.examples_from_records([rec], TASK, "mc-soft", {"p": {}})
    with pytest.raises(ValueError, match="no saved completions"):
        train.examples_from_records([rec], TASK, "mc-soft", {})


def test_open_prefixes_are_judged_within_one_depth_of_one_problem():
    """auroc_open_within: open prefixes of one problem at one depth, ranked against their
    rollouts' outcomes; finished solutions and groups of one class are left out."""
    tree = Tree([1, 2], "prompt")
    steps = []
    for i, ok in enumerate((True, False, True)):  # three chains: plan, then an answer
        plan = tree.add_child(tree.root, [3 + i], f"Plan {i}\n\n", DELIMITER, [-0.1])
        end = tree.add_child(plan, [9], f"so \\boxed{{{42 if ok else 7}}}", EOS, [-0.2])
        end.finish = ANSWER
        steps += [plan, end]
    rec = {"id": "p", "prompt": "Q?", "gold": "42", "tree": tree_to_dict(tree)}
    ex = train.examples_from_records([rec], TASK)
    assert [ex.outcome[i] for i in range(6) if not ex.final[i]] == [1.0, 0.0, 1.0]
    # plans scored right-high: 1.0; one wrong plan above a right one: 0.5; the finals' scores do not count
    good = np.array([0.9, 0.1, 0.2, 0.9, 0.8, 0.1])
    w = train.heldout_figures(ex, good, np.ones(6, bool), TASK)
    assert w["auroc_open_within"] == pytest.approx(1.0) and w["open_groups_mixed"] == 1
    mixed = np.array([0.9, 0.9, 0.5, 0.1, 0.2, 0.9])
    assert train.heldout_figures(ex, mixed, np.ones(6, bool), TASK)["auroc_open_within"] == pytest.approx(0.5)


def test_completions_count_right_answers_and_skip_the_rollouts_own_step():
    from ets.config import SamplingConfig, SearchConfig

    policy = PlantedPolicy()
    tree = Tree(*policy.format_prompt("Q?"))
    careful = tree.add_child(tree.root, tokenize("Plan: careful\n\n"), "Plan: careful\n\n", DELIMITER)
    quick = tree.add_child(tree.root, tokenize("Plan: quick\n\n"), "Plan: quick\n\n", DELIMITER)
    cfg = SearchConfig(strategy="best_of_n", width=1, sampling=SamplingConfig(step_delimiter="\n\n"))
    asked, expand = [], policy.expand

    async def recording(requests, sampling):
        asked.append([(r.node.id, r.n) for r in requests])
        return await expand(requests, sampling)

    policy.expand = recording
    counts, tokens = asyncio.run(train.complete(policy, tree, [careful, quick], 40, cfg, TASK, "42"))
    assert counts[careful.id][1] == counts[quick.id][1] == 40 and tokens > 0
    assert counts[careful.id][0] >= 28 and counts[quick.id][0] <= 12  # 0.9 vs 0.1 of 40
    # k + 1 asked, the first (the rollout's own next step under seeded sampling) dropped
    assert asked[0] == [(careful.id, 41), (quick.id, 41)] and len(careful.children) == 40
    assert len(asked) == 2 and all(n == 1 for _, n in asked[1])  # then one step at a time (depth 2 -> 3)


def test_holdout_split_is_by_problem_and_stable():
    ids = [f"gsm8k-train-{i}" for i in range(2000)]
    held = [train.in_holdout(i, 0.2) for i in ids]
    assert held == [train.in_holdout(i, 0.2) for i in reversed(ids)][::-1]
    assert 0.17 < sum(held) / len(ids) < 0.23
    assert held != [train.in_holdout(i, 0.2, seed=1) for i in ids]


def test_fit_logistic_recovers_a_planted_direction_with_soft_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5)).astype(np.float32)
    p = 1 / (1 + np.exp(-2 * x[:, 0]))
    w, b, mean, scale, info = train.fit_logistic(x, p, 1e-3)  # soft labels
    assert info["converged"] and np.argmax(np.abs(w)) == 0 and w[0] > 0
    pred = train._predict(x, w, b, mean, scale)
    assert np.corrcoef(pred, p)[0, 1] > 0.95


# -- training end to end, save/load, refusal -----------------------------------------------------

def test_train_prm_learns_the_planted_signal_and_round_trips(toy, tmp_path, planted, capsys):
    rc, out = _train(toy, tmp_path, "--json")
    assert rc == 0, capsys.readouterr().err
    meta = json.loads(capsys.readouterr().out)
    arrays, saved = learned.load(out)
    assert saved == json.loads(json.dumps(meta))  # the file holds what was printed
    assert saved["policy"] == "planted" and saved["labels"]["scheme"] == "outcome"
    assert saved["features"]["embedder"] == "hash" and saved["features"]["dim"] == len(arrays["weight"])
    h, t = saved["heldout"], saved["train"]
    assert h["problems"] + t["problems"] == 30 and len(h["ids"]) == h["problems"] > 0
    assert h["auroc_final"] > 0.9 and h["auroc_prefix"] > 0.75  # outcome readable from step 1 on
    assert t["generated_tokens"] > 0 and t["prefixes"] > 0 and t["total_s"] >= t["fit_s"] > 0
    # loaded: the same scores; a careful plan is worth more than a quick one, on an unseen question
    prm = learned.LearnedPRM(out, policy=PlantedPolicy())
    tree = Tree([1], "unseen problem 99: 1 + 41?")
    good = tree.add_child(tree.root, [2], "Plan: careful work on it\n\n", DELIMITER, [-0.5] * 6)
    bad = tree.add_child(tree.root, [3], "Plan: quick work on it\n\n", DELIMITER, [-0.5] * 6)
    [[sg], [sb]] = asyncio.run(prm.score([ScoreRequest("unseen problem 99: 1 + 41?", n) for n in (good, bad)]))
    assert 0 < sb < sg < 1
    row = prm.features.rows(["unseen problem 99: 1 + 41?"], [[(good.text, good.logprobs)]])
    assert prm.predict(row)[0] == pytest.approx(sg)


def test_stats_feature_set_needs_no_embedder_and_round_trips(toy, tmp_path, planted, monkeypatch, capsys):
    import ets.cluster

    def no_embedder(*a, **kw):
        raise AssertionError("the stats feature set must not load an embedder")

    monkeypatch.setattr(ets.cluster, "make_embedder", no_embedder)
    rc, out = _train(toy, tmp_path, "--features", "stats", "--json")
    assert rc == 0, capsys.readouterr().err
    arrays, saved = learned.load(out)
    f = saved["features"]
    assert f["set"] == "stats" and f["dim"] == len(learned.STAT_NAMES) == len(arrays["weight"])
    assert "embedder" not in f and f["stats"] == list(learned.STAT_NAMES)
    prm = learned.LearnedPRM(out, policy=PlantedPolicy())
    assert prm.features.feature_set == "stats" and prm.features.embedder is None
    tree = Tree([1], "q")
    a = tree.add_child(tree.root, [2], "Plan: careful\n\n", DELIMITER, [-0.1, -0.3])
    b = tree.add_child(a, [3], "3 * 4 = 12 so \\boxed{12}", EOS, [-0.2])
    [sa, sb] = asyncio.run(prm.score([ScoreRequest("q", b)]))[0]
    rows = prm.features.rows(["q", "q"], [[(a.text, a.logprobs)], [(a.text, a.logprobs), (b.text, b.logprobs)]])
    assert rows.shape == (2, len(learned.STAT_NAMES))
    assert list(prm.predict(rows)) == pytest.approx([sa, sb])
    monkeypatch.undo()  # a file without "set" (made before feature sets) reads as the full set
    assert learned.Features.from_meta({"embedder": "hash", "tail_chars": 10}).feature_set == "full"
    with pytest.raises(ValueError, match="feature set"):
        learned.Features("hash", feature_set="nope")


def test_answer_statistics_read_the_question_and_the_answer():
    q = "Tom has 12 apples and buys 3 bags of 4. How many apples?"
    steps = [("He buys 3 * 4 = 12 apples.\n\n", [-0.1, -0.2]), ("12 + 12 = 24 so \\boxed{24}", [-0.3])]
    v = learned.stat_values(q, steps)
    assert set(v) == set(learned.STAT_NAMES)
    assert v["question_numbers_used"] == 1.0 and v["answer_integer"] == 1.0 and v["answer_not_integer"] == 0.0
    assert v["answer_computed"] == 1.0 and v["answer_in_question"] == 0.0 and v["answer_negative"] == 0.0
    assert v["answer_log_magnitude"] == pytest.approx(np.log10(25)) and v["repeated_lines"] == 0.0
    assert v["arith_right_log"] == pytest.approx(np.log1p(2)) and v["final_answer"] == 1.0
    copied = learned.stat_values(q, [("Same line\n", None), ("Same line\nso \\boxed{-2.5}", None)])
    assert copied["question_numbers_used"] == 0.0 and copied["answer_not_integer"] == 1.0
    assert copied["answer_negative"] == 1.0 and copied["answer_computed"] == 0.0 and copied["repeated_lines"] == pytest.approx(1 / 3)
    assert learned.stat_values(q, [("So \\boxed{12}", None)])["answer_in_question"] == 1.0
    none = learned.stat_values(q, [("Let us think.", [-1.0])])
    assert none["final_answer"] == none["answer_integer"] == none["answer_not_integer"] == 0.0


def test_version_2_reads_numbers_as_the_grader_does_and_version_1_files_keep_theirs():
    q = "A shirt costs $2.50 and a hat 1,200 cents. What is the total?"
    steps = [("2.50 + 12 = 14.50\n\n", None), ("The total is \\boxed{14.50 dollars}", None)]
    v2, v1 = learned.stat_values(q, steps), learned.stat_values(q, steps, version=1)
    assert v2["answer_integer"] == 0.0 and v2["answer_not_integer"] == 1.0  # 14.5, read through the units
    assert v2["answer_computed"] == 1.0 and v2["answer_log_magnitude"] == pytest.approx(np.log10(15.5))
    assert v1["answer_log_magnitude"] == 0.0 and v1["answer_computed"] == 0.0  # "14.50 dollars": no number by hand
    assert v2["question_numbers_used"] == 0.5 and v1["question_numbers_used"] == 0.5  # "2.50" used, "1,200" not
    assert learned.stat_values("Pay 1,200.", [("So \\boxed{1200.00}", None)])["answer_in_question"] == 1.0
    assert learned.stat_values("Pay 1,200.", [("So \\boxed{1200.00}", None)], version=1)["answer_in_question"] == 0.0
    frac = learned.stat_values(q, [("So \\boxed{\\frac{3}{4}}", None)])
    assert frac["answer_not_integer"] == 1.0 and frac["answer_log_magnitude"] == pytest.approx(np.log10(1.75))
    old = learned.Features.from_meta({"set": "stats", "stats": list(learned.STAT_NAMES)})  # no version: 1
    assert old.version == 1 and old.describe()["version"] == 1
    assert learned.Features("hash", feature_set="stats").describe()["version"] == learned.FEATURES_VERSION == 2
    with pytest.raises(ValueError, match="features version 3"):
        learned.Features("hash", feature_set="stats", version=3)


def test_stats_split_fits_two_heads_and_scores_each_row_by_its_own(toy, tmp_path, planted, capsys):
    """--features stats-split: one head for answered prefixes (final_answer set), one for open ones;
    a row is scored by its own head's weights, and the held-out figures are those of the file."""
    rc, out = _train(toy, tmp_path, "--features", "stats-split", "--json")
    assert rc == 0, capsys.readouterr().err
    meta = json.loads(capsys.readouterr().out)
    arrays, saved = learned.load(out)
    d = len(learned.STAT_NAMES)
    assert arrays["weight"].shape == arrays["mean"].shape == (2, d) and arrays["bias"].shape == (2,)
    assert [h["scores"] for h in saved["fit"]["heads"]] == ["open prefixes", "answered prefixes"]
    assert all(h["rows"] > 0 and h["converged"] for h in saved["fit"]["heads"])
    assert saved["heldout"]["auroc_final"] > 0.9  # the plan is in the answered prefix's path statistics too
    prm = learned.LearnedPRM(out, policy=PlantedPolicy())
    assert prm.features.heads == 2
    steps = [("Plan: careful work on it\n\n", [-0.2] * 6), ("Compute 6 times 7\n\n", [-0.1] * 5),
             ("So the answer is \\boxed{42}", [-0.3] * 7)]
    rows = prm.features.rows(["q 1"] * 3, [steps[:1], steps[:2], steps])
    assert prm.features.head_of(rows).tolist() == [0, 0, 1]

    def by_head(h, row):
        w, b, m, s = arrays["weight"][h], arrays["bias"][h], arrays["mean"][h], arrays["scale"][h]
        return float(learned.sigmoid(((row - m) / s) @ w + b))

    got = prm.predict(rows)
    assert list(got) == pytest.approx([by_head(0, rows[0]), by_head(0, rows[1]), by_head(1, rows[2])])
    assert got[2] != pytest.approx(by_head(0, rows[2]))  # the open head would score it otherwise
    [d_] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    w = train.evaluate_run(out, d_, ids=meta["heldout"]["ids"])
    assert w["auroc_final"] == pytest.approx(meta["heldout"]["auroc_final"])


@pytest.mark.slow  # several seconds: in the full run (-m "") and CI
def test_cross_validation_script_judges_every_feature_set_out_of_fold(toy, tmp_path, planted, capsys, monkeypatch):
    assert _train(toy, tmp_path, "--features", "stats")[0] == 0
    [d] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    capsys.readouterr()
    assert _script("learned_prm_cv.py", [str(d), "--sets", "stats,stats-split,stats-split-within,stats-split-gbt,stats-split-mlp",
                                         "--folds", "3", "--l2", "0.01", "--test", str(d)], monkeypatch) == 0
    out = capsys.readouterr().out
    rows = {line.split("(")[0].strip(): line for line in out.splitlines() if line.strip().startswith("learned,")}
    assert set(rows) == {"learned, stats", "learned, stats-split", "learned, stats-split-within", "learned, stats-split-gbt",
                         "learned, stats-split-mlp"}
    for line in rows.values():  # the planted plan is readable out of fold by one head, two, within problems, non-linear heads
        assert float(line.split("final-step AUROC ")[1].split()[0]) > 0.85
    assert out.count(f"on {d} (30 problems") == 5


@pytest.mark.slow  # several seconds: in the full run (-m "") and CI
def test_cross_validation_script_weighs_the_vote_by_a_power_of_the_score(toy, tmp_path, planted, capsys, monkeypatch):
    assert _train(toy, tmp_path, "--features", "stats")[0] == 0
    [d] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]

    def votes(power):
        capsys.readouterr()
        assert _script("learned_prm_cv.py", [str(d), "--sets", "stats", "--folds", "3", "--l2", "0.01",
                                             "--vote-power", power], monkeypatch) == 0
        [row] = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("learned,")]
        return {k: row.split(f" {k} ")[1].split(",")[0] for k in ("weighted", "majority", "AUROC")}

    flat, plain = votes("0"), votes("1")
    assert flat["weighted"] == flat["majority"]  # every score**0 is 1: the weighted vote counts heads
    assert plain["weighted"] != plain["majority"]  # the planted plan's scores outvote the majority
    assert flat["AUROC"] == plain["AUROC"]  # a power keeps the ranking


@pytest.mark.slow  # several seconds: in the full run (-m "") and CI
def test_cross_validation_script_compares_labellings_on_the_problems_with_completions(toy, tmp_path, planted, capsys,
                                                                                      monkeypatch):
    assert _train(toy, tmp_path, "--labels", "mc-soft", "--mc-k", "3")[0] == 0
    [d] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    for f in sorted((d / "mc-k3").glob("*.json"))[:10]:  # 20 of the 30 problems keep their completions
        f.unlink()
    capsys.readouterr()
    assert _script("learned_prm_cv.py", [str(d), "--sets", "full", "--embedder", "hash", "--folds", "3", "--l2", "0.01",
                                         "--labels", "outcome,mc-soft", "--mc-k", "3", "--test", str(d)], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "20 problems (those with mc-k3 completions)" in out
    rows = {re.sub(r" \(\d+\)", "", line.split(" final-step")[0].strip()): line for line in out.splitlines()
            if line.strip().startswith("learned,")}
    assert set(rows) == {"learned, full, outcome", "learned, full, mc-soft"}
    for line in rows.values():  # the plan (its words: the embedding) ranks the open prefixes under either labelling
        assert float(line.split("open prefixes ")[1].split()[0]) > 0.85
    assert out.count(f"on {d} (30 problems") == 2  # the test run is judged whole
    # the plan decides the value, so K=3 completions rank the open prefixes almost as the outcome does
    assert float(out.split("mc-soft labels themselves")[1].split("open prefixes ")[1].split()[0]) > 0.85


def test_a_file_whose_heads_do_not_match_its_feature_set_is_refused(tmp_path):
    d = len(learned.STAT_NAMES)
    meta = {"policy": "mock", "features": {"version": learned.FEATURES_VERSION, "set": "stats",
                                           "stats": list(learned.STAT_NAMES)}}
    learned.save(tmp_path / "two.npz", np.zeros((2, d)), [0.0, 0.0], np.zeros((2, d)), np.ones((2, d)), meta)
    learned.load(tmp_path / "two.npz")  # well-formed arrays...
    with pytest.raises(ValueError, match="2 head"):  # ...but a one-head feature set
        learned.LearnedPRM(tmp_path / "two.npz")
    learned.save(tmp_path / "bad.npz", np.zeros((2, d)), [0.0], np.zeros((2, d)), np.ones((2, d)), meta)
    with pytest.raises(ValueError, match="shapes do not match"):
        learned.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="final_answer"):
        learned.Features("hash", feature_set="stats-split", stats=["last_lp_mean"])


def test_a_file_keeps_the_statistics_it_was_fitted_on():
    """Files list their statistics by name: one made before STAT_NAMES_ANSWER existed (no "stats"
    key, or the 13 V1 names) gets its 13 columns back; a name this ets does not know is refused."""
    old = learned.Features.from_meta({"set": "stats"})
    row = old.rows(["q 1"], [[("1 + 1 = 2 so \\boxed{2}", [-0.5])]])
    assert old.stats == learned.STAT_NAMES_V1 and row.shape == (1, 13)
    full = learned.Features("hash", feature_set="stats")
    assert full.rows(["q 1"], [[("1 + 1 = 2 so \\boxed{2}", [-0.5])]])[0, :13].tolist() == row[0].tolist()
    with pytest.raises(ValueError, match="unknown statistics"):
        learned.Features.from_meta({"set": "stats", "stats": ["last_lp_mean", "from_the_future"]})


def test_learned_prm_scores_every_step_once_per_node(toy, tmp_path, planted):
    rc, out = _train(toy, tmp_path)
    assert rc == 0
    prm = learned.LearnedPRM(out, policy=PlantedPolicy())
    tree = Tree([1], "q")
    a = tree.add_child(tree.root, [2], "Plan: careful\n\n", DELIMITER, [-0.1])
    b = tree.add_child(a, [3], "Compute 2 times 3\n\n", DELIMITER, [-0.2])
    c = tree.add_child(a, [4], "Compute 4 times 5\n\n", DELIMITER, None)  # no log-probs: still scored
    [sb, sc] = asyncio.run(prm.score([ScoreRequest("q", b), ScoreRequest("q", c)]))
    assert len(sb) == len(sc) == 2 and sb[0] == sc[0] and all(0 < s < 1 for s in sb + sc)
    assert prm.stats()["prm_prefixes_computed"] == 3  # a, b, c: a once
    asyncio.run(prm.score([ScoreRequest("q", b)]))
    assert prm.stats()["prm_prefixes_computed"] == 3


def test_refuses_a_file_made_for_another_policy(toy, tmp_path, planted, capsys):
    _, out = _train(toy, tmp_path)
    with pytest.raises(learned.PolicyMismatch, match="trained for policy 'planted', not 'mock'"):
        ets.factory.make_prm(f"learned:{out}", MockPolicy())
    assert isinstance(ets.factory.make_prm(f"learned:{out}?any_policy=1", MockPolicy()), learned.LearnedPRM)
    with pytest.raises(ets.factory.SpecError, match="any_policy"):
        ets.factory.make_prm(f"learned:{out}?anypolicy=1", MockPolicy())
    capsys.readouterr()
    assert cli.main(["run", *MOCK, *toy, "--prm", f"learned:{out}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'planted'" in err and "'mock'" in err and "any_policy=1" in err
    assert cli.main(["run", *MOCK, *toy, "--prm", f"learned:{tmp_path / 'nope.npz'}"]) == 2
    assert "ets train-prm" in capsys.readouterr().err


def test_not_a_prm_file_is_refused(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, weight=np.zeros(3))
    with pytest.raises(ValueError, match="not a learned PRM file"):
        learned.load(bad)
    learned.save(tmp_path / "y.npz", np.zeros(3), 0.0, np.zeros(3), np.ones(3),
                 {"policy": "mock", "features": {"version": learned.FEATURES_VERSION + 1}})
    with pytest.raises(ValueError, match="retrain"):
        learned.load(tmp_path / "y.npz")


def test_ets_run_with_the_learned_prm_end_to_end(toy, tmp_path, capsys):
    """Mock policy: its right answers box 42, so the file learns that; then `ets run` uses it."""
    out = tmp_path / "mock.npz"
    assert cli.main(["train-prm", *MOCK, *toy, "--samples", "6", "--l2", "0.01", "--out", str(out)]) == 0
    assert learned.load(out)[1]["policy"] == "mock"
    capsys.readouterr()
    assert cli.main(["run", *MOCK, *toy, "--limit", "3", "--strategy", "rebase", "--width", "4",
                     "--prm", f"learned:{out}", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prm"] == f"learned:{out}" and summary["problems"] == 3
    d = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("rebase-w4"))
    rec = json.loads(next((d / "problems").glob("*.json")).read_text())
    assert rec["prm"].startswith("learned:mock.npz@")
    scored = [n for n in rec["tree"]["nodes"] if n["parent"] is not None]
    assert scored and all(0 < n["score"] < 1 for n in scored)
    # the run is named by the file's content: the same file elsewhere resumes it (nothing computed)
    moved = tmp_path / "elsewhere" / "copy.npz"
    moved.parent.mkdir()
    moved.write_bytes(out.read_bytes())
    assert cli.main(["run", *MOCK, *toy, "--limit", "3", "--strategy", "rebase", "--width", "4",
                     "--prm", f"learned:{moved}", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["name"] == summary["name"] and again["problems"] == 3
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("rebase-w4")] == [d.name]


def test_a_learned_prm_names_its_runs_by_the_file_content(tmp_path):
    from ets.factory import SpecError, prm_identity

    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    learned.save(a, np.zeros(3), 0.0, np.zeros(3), np.ones(3), {"policy": "mock"})
    b.write_bytes(a.read_bytes())
    assert prm_identity(f"learned:{a}") == prm_identity(f"learned:{b}") != f"learned:{a}"
    assert prm_identity(f"learned:{a}?any_policy=1").endswith("?any_policy=1")
    learned.save(b, np.ones(3), 0.0, np.zeros(3), np.ones(3), {"policy": "mock"})  # retrained in place
    assert prm_identity(f"learned:{b}") != prm_identity(f"learned:{a}")
    assert prm_identity("default") == "default" and prm_identity("math-shepherd:/m") == "math-shepherd:/m"
    with pytest.raises(SpecError, match="cannot read .*ets train-prm"):
        prm_identity(f"learned:{tmp_path / 'none.npz'}")


def test_rollouts_resume_and_nothing_is_fitted_until_all_are_in(toy, tmp_path, planted, monkeypatch, capsys):
    import ets.runner

    real = ets.runner.search

    async def failing(prompt, *args, **kw):
        if "problem 2:" in prompt:
            raise RuntimeError("server went away")
        return await real(prompt, *args, **kw)

    monkeypatch.setattr(ets.runner, "search", failing)
    rc, out = _train(toy, tmp_path)
    assert rc == 1 and not out.exists()
    assert "no PRM was fitted" in capsys.readouterr().err
    monkeypatch.setattr(ets.runner, "search", real)
    rc, out = _train(toy, tmp_path)
    assert rc == 0 and out.exists()
    assert "29 problems already done" in capsys.readouterr().err
    [d] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    sessions = RunDir(d).sessions()
    assert [s["computed"] for s in sessions] == [29, 1]
    rc, _ = _train(toy, tmp_path)  # all in: nothing sampled again, the same file
    assert rc == 0 and RunDir(d).sessions()[-1]["computed"] == 0


def test_fit_done_fits_on_the_finished_rollouts_only(toy, tmp_path, planted, monkeypatch, capsys):
    import numpy as np
    import ets.runner

    real = ets.runner.search

    async def failing(prompt, *args, **kw):  # a training cut short: problems 20-29 never finish
        if int(prompt.split("problem ")[1].split(":")[0]) >= 20:
            raise RuntimeError("server went away")
        return await real(prompt, *args, **kw)

    monkeypatch.setattr(ets.runner, "search", failing)
    assert _train(toy, tmp_path)[0] == 1
    monkeypatch.setattr(ets.runner, "search", lambda *a, **k: pytest.fail("--fit-done sampled"))
    # nor does it need the policy: its identity was kept beside the rollouts
    monkeypatch.setattr(ets.factory, "make_policy", lambda *a, **k: pytest.fail("--fit-done made a policy"))
    rc, out = _train(toy, tmp_path, "--fit-done")
    assert rc == 0 and out.exists()
    meta = json.loads(str(np.load(out)["meta"]))
    assert meta["data"]["problems"] == 20 and meta["policy"] == "planted"


def test_math_shepherd_training_saves_and_reuses_completions(toy, tmp_path, planted, capsys):
    rc, out = _train(toy, tmp_path, "--labels", "mc-soft", "--mc-k", "3", "--json")
    assert rc == 0, capsys.readouterr().err
    meta = json.loads(capsys.readouterr().out)
    assert meta["labels"] == {"scheme": "mc-soft", "mc_k": 3, "meaning": meta["labels"]["meaning"]}
    [d] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    saved = sorted((d / "mc-k3").glob("*.json"))
    assert len(saved) == 30
    before = [f.stat().st_mtime_ns for f in saved]
    assert meta["heldout"]["auroc_prefix"] > 0.75
    rc, _ = _train(toy, tmp_path, "--labels", "mc-soft", "--mc-k", "3")
    assert rc == 0 and [f.stat().st_mtime_ns for f in saved] == before  # resumed: none recomputed


def test_evaluate_run_rescoring_saved_trees_matches_the_heldout_figures(toy, tmp_path, planted, capsys):
    _, out = _train(toy, tmp_path, "--json")
    h = json.loads(capsys.readouterr().out)["heldout"]
    [d] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    w = train.evaluate_run(out, d, ids=h["ids"])
    for k in ("problems", "solutions", "auroc_final", "auroc_prefix", "acc_weighted", "acc_majority", "acc_oracle",
              "weighted_minus_majority"):
        assert w[k] == pytest.approx(h[k]), k
    diff, lo, hi = w["weighted_minus_majority"]
    assert diff == pytest.approx(w["acc_weighted"] - w["acc_majority"]) and lo <= diff <= hi


def test_eval_script_rows_pair_a_search_run_with_the_samples_majority(toy, tmp_path, planted, capsys, monkeypatch):
    import subprocess

    _, out = _train(toy, tmp_path, "--json")
    capsys.readouterr()
    [d] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    w = train.evaluate_run(out, d, per_problem=True)
    pp = w["per_problem"]
    assert len(pp["ids"]) == w["problems"] and pp["ids"] == sorted(pp["ids"])
    for rule in ("weighted", "best", "majority", "oracle"):
        assert sum(pp[rule]) / len(pp["ids"]) == pytest.approx(w[f"acc_{rule}"]), rule
    assert "per_problem" not in train.evaluate_run(out, d)
    kv = {r["id"]: r["kv"]["kv_mean"] for r in RunDir(d).iter_problems()}
    assert pp["kv_mean"] == [kv[i] for i in pp["ids"]]

    rows_file = tmp_path / "sel" / "results.json"
    rows_file.parent.mkdir()
    assert _script("learned_prm_eval.py", [str(out), str(d), "--rows", str(rows_file)], monkeypatch) == 0
    saved = {r["method"]: r for r in json.loads(rows_file.read_text())["rows"]}
    assert set(saved) == {"weighted", "best", "majority", "oracle"}
    assert [p["correct"] for p in saved["majority"]["per_problem"]] == pp["majority"]
    assert saved["weighted"]["prm"] == w["prm"] and saved["majority"]["prm"] is None
    assert [p["kv_mean"] for p in saved["oracle"]["per_problem"]] == pp["kv_mean"]
    # the oracle is never below the majority: paired with it as base, the difference is >= 0
    got = subprocess.run([sys.executable, str(BENCH / "pair_results.py"), "--base", f"{rows_file}:majority",
                          f"{rows_file}:oracle"], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    line = next(l for l in got.stdout.splitlines() if l.startswith("| sel:oracle"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    n = len(pp["ids"])
    assert cells[1] == str(n) and cells[3] == f"{sum(pp['majority'])}/{n}"
    assert cells[2].startswith(f"{sum(pp['oracle'])}/{n}")


def test_policy_identity_is_the_model_name_embedded_or_served():
    from types import SimpleNamespace

    served = SimpleNamespace(name="server:vllm", model="/models/Qwen2.5-Coder-0.5B-Instruct/")
    embedded = SimpleNamespace(name="hf:Qwen2.5-Coder-0.5B-Instruct")
    assert learned.policy_identity(served) == learned.policy_identity(embedded) == "Qwen2.5-Coder-0.5B-Instruct"
    assert learned.policy_identity(MockPolicy()) == "mock"


def test_train_prm_fits_nothing_while_rollouts_wait_for_admission(toy, tmp_path, planted, capsys):
    rc, out = _train(toy, tmp_path, "--admit-until", "2020-01-01T00:00")
    assert rc == 0 and not out.exists()
    assert "not started (--admit-until)" in capsys.readouterr().err


def test_a_packed_run_unpacks_into_the_same_run_and_resumes(toy, tmp_path, planted, capsys):
    """benchmarks/pack_run.py: the archive unpacked under the runs directory is the same run (same
    name, every problem), log-probs rounded, no claims; a rerun samples nothing and fits alike."""
    import importlib.util
    import shutil
    import tarfile

    spec = importlib.util.spec_from_file_location("pack_run", BENCH / "pack_run.py")
    pack_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack_run)
    rc, out = _train(toy, tmp_path, "--features", "stats", "--json")
    assert rc == 0
    before = json.loads(capsys.readouterr().out)["heldout"]
    [d] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    (d / "claims").mkdir(exist_ok=True)
    (d / "claims" / "x.json").write_text("{}")
    archive = tmp_path / "kept" / "rollouts.tar.xz"
    assert pack_run.pack(d, archive) == 30
    names = tarfile.open(archive).getnames()
    assert f"{d.name}/config.json" in names and not any("claims" in n for n in names)
    originals = {r["id"]: r for r in RunDir(d).iter_problems()}
    shutil.rmtree(tmp_path / "runs")
    tarfile.open(archive).extractall(tmp_path / "runs")
    back = {r["id"]: r for r in RunDir(d).iter_problems()}
    assert back.keys() == originals.keys()
    node = next(n for r in back.values() for n in r["tree"]["nodes"] if n.get("logprobs"))
    assert all(x == round(x, 4) for x in node["logprobs"])
    rc, out = _train(toy, tmp_path, "--features", "stats", "--json")
    assert rc == 0 and RunDir(d).sessions()[-1]["computed"] == 0  # nothing sampled again
    after = json.loads(capsys.readouterr().out)["heldout"]
    assert after["ids"] == before["ids"] and after["auroc_final"] == pytest.approx(before["auroc_final"], abs=0.02)
