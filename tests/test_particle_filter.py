"""Particle filtering (its_hub's ParticleFiltering as an ets strategy): the resampling
distribution, determinism, the width contract, the options, and whole searches (mock, CLI)."""

import json

import numpy as np
import pytest

import ets.cli as cli
from ets.strategies import STRATEGIES, Frontier
from ets.strategies.particle_filter import (ParticleFilter, ParticleFilterConfig, annealed_temperature,
                                            log_weights, resample, softmax)

from helpers import run_mock, tree_from_parents
from conftest import toy_dataset

MOCK = ["--policy", "mock", "--prm", "mock", "--embedder", "hash", "--no-progress"]


def frontier(scores, depth=1, remaining=None, finished=()):
    """A frontier of len(scores) depth-1 candidates (node ids 1..n) with these PRM scores."""
    n = len(scores)
    _, nodes = tree_from_parents({0: None, **{i: 0 for i in range(1, n + 1 + len(finished))}})
    cands = [nodes[i] for i in range(1, n + 1)]
    for node, s in zip(cands, scores):
        node.score = s
    fin = [nodes[i] for i in range(n + 1, n + 1 + len(finished))]
    return Frontier(depth, cands, fin, n if remaining is None else remaining, n + len(finished))


def pf(seed=0, **params):
    return ParticleFilter(ParticleFilterConfig(**params), width=16, seed=seed)


def test_registered_with_its_hub_defaults():
    assert STRATEGIES["particle_filter"] is ParticleFilter
    c = ParticleFilterConfig()
    assert (c.resample_temperature, c.log_weight, c.resampling, c.annealing) == (1.0, "logit", "multinomial", "none")
    assert (c.ess_threshold, c.early_phase) == (0.5, 0.5)


def test_log_weights_are_its_hubs_inverse_sigmoid():
    s = [0.1, 0.5, 0.9, 0.0, 1.0]
    lw = log_weights(s)
    assert lw[:3] == pytest.approx([np.log(0.1 / 0.9), 0.0, np.log(9.0)])
    assert lw[3] == pytest.approx(np.log(1e-7 / (1 - 1e-7)))  # clipped, as its_hub does
    assert lw[4] == pytest.approx(-lw[3])
    # softmax(logit(s)) = odds / sum(odds): the weight of a particle is its PRM odds
    odds = np.array([0.2 / 0.8, 0.5 / 0.5, 0.8 / 0.2])
    assert softmax(log_weights([0.2, 0.5, 0.8])) == pytest.approx(odds / odds.sum())
    assert softmax(log_weights([0.2, 0.5, 0.8], "log")) == pytest.approx(np.array([0.2, 0.5, 0.8]) / 1.5)
    assert log_weights([3.0, -2.0], "score") == pytest.approx([3.0, -2.0])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        log_weights([1.5])


@pytest.mark.parametrize("resampling", ["multinomial", "systematic"])
def test_mean_allocation_is_proportional_to_the_weights(resampling):
    """Over many seeds, E[alloc_i] = remaining * p_i (both schemes are unbiased)."""
    scores = [0.9, 0.7, 0.5, 0.3, 0.1, 0.6]
    f = frontier(scores, remaining=6)
    probs, _ = pf(resampling=resampling).probabilities(f)
    seeds = 4000
    mean = np.mean([pf(seed=s, resampling=resampling).select(f)[0] for s in range(seeds)], axis=0)
    expected = 6 * probs
    # multinomial: sd of the mean = sqrt(R p (1 - p) / seeds) <= 0.02; 0.06 is about 3 sd
    assert mean == pytest.approx(expected, abs=0.06)


def test_systematic_gives_each_candidate_floor_or_ceil_of_its_share():
    """Systematic resampling: candidate i gets floor(R p_i) or ceil(R p_i) children (low variance)."""
    f = frontier([0.9, 0.7, 0.5, 0.3, 0.1, 0.6, 0.45, 0.8], remaining=8)
    probs, _ = pf().probabilities(f)
    for s in range(200):
        alloc, _ = pf(seed=s, resampling="systematic").select(f)
        for a, p in zip(alloc, probs):
            assert np.floor(8 * p) - 1e-9 <= a <= np.ceil(8 * p) + 1e-9


@pytest.mark.parametrize("resampling", ["multinomial", "systematic"])
def test_deterministic_for_a_seed_and_depth(resampling):
    f = frontier([0.9, 0.7, 0.5, 0.3, 0.1, 0.6, 0.2, 0.4])
    runs = {tuple(pf(seed=3, resampling=resampling).select(f)[0]) for _ in range(5)}
    assert len(runs) == 1
    # another seed or another depth draws anew: some of 20 differ from the first
    others = {tuple(pf(seed=s, resampling=resampling).select(f)[0]) for s in range(4, 24)}
    assert others - runs
    scores = [c.score for c in f.candidates]
    deeper = {tuple(pf(seed=3, resampling=resampling).select(frontier(scores, depth=d))[0]) for d in range(2, 22)}
    assert deeper - runs


@pytest.mark.parametrize("resampling", ["multinomial", "systematic"])
@pytest.mark.parametrize("annealing", ["none", "ess"])
def test_allocation_sums_to_remaining_and_is_non_negative(resampling, annealing):
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 12))
        remaining = int(rng.integers(1, 20))
        scores = rng.uniform(0, 1, n).round(int(rng.integers(1, 4)))  # ties included
        t = float(rng.choice([1e-6, 0.1, 1.0, 10.0]))
        strat = pf(seed=trial, resampling=resampling, annealing=annealing, resample_temperature=t)
        alloc, info = strat.select(frontier(list(scores), remaining=remaining, finished=[None] * (trial % 3)))
        assert len(alloc) == n and min(alloc) >= 0 and sum(alloc) == remaining
        assert sum(info["probs"]) == pytest.approx(1.0, abs=1e-5)
        json.dumps(info)  # the trace stores it


def test_low_temperature_concentrates_on_the_best():
    f = frontier([0.6, 0.95, 0.3, 0.9, 0.1], remaining=5)
    for s in range(50):
        assert pf(seed=s, resample_temperature=1e-4).select(f)[0] == [0, 5, 0, 0, 0]
    # and the best's expected share grows monotonically as T falls
    shares = [pf(resample_temperature=t).probabilities(f)[0][1] for t in (10.0, 1.0, 0.3, 0.1, 0.01)]
    assert shares == sorted(shares) and shares[0] < 0.3 and shares[-1] > 0.99
    # high temperature flattens towards uniform
    assert pf(resample_temperature=1e6).probabilities(f)[0] == pytest.approx([0.2] * 5, abs=1e-4)


def test_annealing_raises_the_temperature_only_early_and_when_collapsed():
    collapsed = softmax(np.array([10.0, 0.0, 0.0, 0.0]))  # ESS ~ 1 of 4
    flat = np.full(4, 0.25)
    assert annealed_temperature(flat, 1, 4, "ess") == 1.0  # ESS/N = 1 >= 0.5
    t = annealed_temperature(collapsed, 1, 4, "ess", max_steps=25)
    assert t == pytest.approx((4 / (1 / np.sum(np.clip(collapsed, 1e-7, 1) ** 2))) * (1 - 1 / 25))
    assert t > 1
    assert annealed_temperature(collapsed, 13, 4, "ess", max_steps=25) == 1.0  # past the early phase
    assert annealed_temperature(collapsed, 1, 4, "base", max_steps=25) == pytest.approx(2.0 - 1 / 25)
    assert annealed_temperature(collapsed, 1, 4, "entropy") > 1
    assert annealed_temperature(collapsed, 1, 4, "none") == 1.0
    # in the strategy: annealing flattens a collapsed distribution at an early depth
    f = frontier([0.999, 0.2, 0.2, 0.2])
    plain, t_plain = pf().probabilities(f)
    annealed, t_ann = pf(annealing="ess").probabilities(f)
    assert t_plain == 1.0 and t_ann > 1.0 and annealed[0] < plain[0]


@pytest.mark.parametrize("bad", [{"resample_temperature": 0}, {"log_weight": "odds"}, {"resampling": "residual"},
                                 {"annealing": "yes"}, {"ess_threshold": 2}, {"anneal_steps": 0}])
def test_config_validates(bad):
    with pytest.raises(ValueError):
        ParticleFilterConfig(**bad)


@pytest.mark.parametrize("width", [1, 4, 9, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_mock_search(width, seed):
    """Every depth uses the whole remaining width; finished trajectories count against W; the
    tree is the same on a rerun (resume repeats the draws)."""
    result, _ = run_mock("particle_filter", width, seed)
    later = [t for t in result.trace if t.depth >= 1]
    assert later, "the search went past the root"
    for t in later:
        assert sum(t.alloc) == t.remaining and t.candidates == t.remaining
    finished = [n for n in result.tree.nodes if n.finish in ("answer", "cap")]
    assert len(finished) <= width
    assert len(result.tree.at_depth(1)) == width
    again, _ = run_mock("particle_filter", width, seed)
    sig = lambda r: [(n.id, n.parent.id if n.parent else None, tuple(n.token_ids), n.alloc) for n in r.tree.nodes]
    assert sig(again) == sig(result)


def test_mock_search_with_every_option():
    result, _ = run_mock("particle_filter", 8, 0, resampling="systematic", annealing="entropy",
                         resample_temperature=0.5, log_weight="log")
    assert all(sum(t.alloc) == t.remaining for t in result.trace)


@pytest.fixture
def toy(tmp_path):
    return toy_dataset(tmp_path, 4, all_problems=False)


def test_cli_run(tmp_path, toy, capsys):
    assert cli.main(["run", *MOCK, *toy, "--strategy", "particle_filter", "--limit", "2",
                     "--resampling", "systematic", "--resample-temperature", "0.5", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    dirs = [p for p in (tmp_path / "runs").iterdir() if (p / "config.json").is_file()]
    assert len(dirs) == 1
    config = json.loads((dirs[0] / "config.json").read_text())
    assert "particle_filter" in json.dumps(config) and "systematic" in json.dumps(config)
    assert len(list((dirs[0] / "problems").glob("*.json"))) == 2
    assert summary


def test_cli_flag_of_another_strategy_is_refused(toy):
    assert cli.main(["run", *MOCK, *toy, "--strategy", "rebase", "--limit", "1", "--resampling", "systematic"]) == 2


def test_cli_compare_with_rebase(tmp_path, toy, capsys):
    assert cli.main(["compare", *MOCK, *toy, "--methods", "particle_filter,rebase", "--limit", "2",
                     "--widths", "4"]) == 0
    out = capsys.readouterr().out
    assert "particle_filter" in out and "rebase" in out
    dirs = [p for p in (tmp_path / "runs").iterdir() if (p / "config.json").is_file()]
    assert len(dirs) == 2


def test_the_runs_seed_reaches_the_strategy():
    from ets.config import SearchConfig
    from ets.strategies import build_strategy

    assert build_strategy(SearchConfig(strategy="particle_filter", width=4, seed=3)).seed == 3
