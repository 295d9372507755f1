"""PRM-signal report: AUROC, and every selection rule recomputed from saved best-of-N trees."""

import json

import pytest

import ets.cli as cli
from ets.report.prm_worth import RULES, auroc, problem_worth, run_worth, worth_markdown
from ets.runs import RunDir


def test_auroc_known_values():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5  # ties count half
    # one right at 0.6 beats the wrong 0.4 but loses to the wrong 0.7: 1/2
    assert auroc([0.6, 0.4, 0.7], [True, False, False]) == 0.5
    assert auroc([0.3, 0.4], [True, True]) is None


@pytest.fixture
def bon_run(tmp_path):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "question": f"problem {i}: 6*7?", "answer": "42"}) + "\n"
                            for i in range(5)))
    argv = ["run", "--policy", "mock", "--prm", "mock", "--no-progress", "--strategy", "best_of_n", "--width", "6",
            "--dataset", str(data), "--id-field", "id", "--runs-dir", str(tmp_path / "runs"), "--limit", "0"]
    assert cli.main(argv) == 0
    [d] = [p for p in (tmp_path / "runs").iterdir() if (p / "config.json").is_file()]
    return d


def test_rules_are_consistent_with_the_saved_answers(bon_run):
    w = run_worth(bon_run, draws=8)
    assert w["problems"] == 5 and set(w["rules"]) == set(RULES)
    acc = {r: w["rules"][r]["accuracy"] for r in RULES}
    # the oracle bounds every rule; the run's own saved verdict is the weighted vote's
    assert all(acc[r] <= acc["oracle"] + 1e-12 for r in RULES)
    saved = sum(r["correct"] for r in RunDir(bon_run).iter_problems())
    assert w["rules"]["weighted"]["correct"] == saved
    for r in RULES:
        assert 0 <= w["rules"][r]["lo"] <= acc[r] <= w["rules"][r]["hi"] <= 1
    assert w["solutions"] >= w["solutions_right"] >= 0
    md = worth_markdown(w)
    assert "PRM-weighted vote" in md and "AUROC" in md


def test_random_vote_is_reproducible_and_a_mean_of_draws(bon_run):
    rec = next(iter(RunDir(bon_run).iter_problems()))
    a, b = problem_worth(rec, draws=16), problem_worth(rec, draws=16)
    assert a["random"] == b["random"] and 0 <= a["random"] <= 1
    assert (a["random"] * 16) == int(a["random"] * 16)
