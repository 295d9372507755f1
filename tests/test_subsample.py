"""Best-of-n curves from one best-of-W run, by subsampling its saved trees."""

from ets.report.prm_worth import run_worth
from ets.report.subsample import powers_of_two, problem_samples, subsampled_accuracy, vote
from ets.runs import RunDir


def test_powers_of_two():
    assert powers_of_two(16) == [1, 2, 4, 8, 16] and powers_of_two(6) == [1, 2, 4, 6] and powers_of_two(1) == [1]


def test_vote_breaks_ties_by_the_earliest_member():
    assert vote([(1, 0.2), (0, 0.2)], weighted=True) == 1
    assert vote([(None, 0.9), (0, 0.1), (1, 0.05), (1, 0.06)], weighted=True) == 1
    assert vote([(None, 0.9), (0, 0.1), (1, 0.05), (1, 0.06)], weighted=False) == 1
    assert vote([(None, 0.9)], weighted=True) is None


def test_the_curve_ends_at_the_runs_vote_and_starts_at_one_samples_accuracy(tmp_path):
    from ets.cli import main

    assert main(["run", "--policy", "mock", "--prm", "mock", "--strategy", "best_of_n", "--width", "8",
                 "--limit", "6", "--runs-dir", str(tmp_path), "--no-progress"]) == 0
    (run,) = list(tmp_path.iterdir())
    recs = list(RunDir(run).iter_problems())
    curve = subsampled_accuracy(recs, draws=400)
    assert curve["n"] == [1, 2, 4, 8] and curve["width"] == 8
    full = run_worth(run)["rules"]
    assert abs(curve["weighted"][-1] - full["weighted"]["accuracy"]) < 1e-9
    assert abs(curve["majority"][-1] - full["majority"]["accuracy"]) < 1e-9
    # one sample: the expected share of samples whose own answer is right
    one = []
    for r in recs:
        samples, right = problem_samples(r)
        one.append(sum(g is not None and right[g] for g, _ in samples) / len(samples))
    assert abs(curve["majority"][0] - sum(one) / len(one)) < 0.05
