"""Particle filtering (Puri et al. 2025, "A Probabilistic Inference Approach to Inference-Time
Scaling of LLMs using Particle-Based Monte Carlo Methods"), as its_hub implements it.

Source: its_hub, its_hub/algorithms/particle_gibbs.py (Red-Hat-AI-Innovation-Team/its_hub;
`ParticleFiltering` = `ParticleGibbs` with num_iterations=1, no reference particles; the
annealing options are its `EntropicParticleFiltering`). What is taken from there:

- log-weight of a particle = inv_sigmoid(PRM score) = log(s / (1 - s)), s clipped to
  [1e-7, 1 - 1e-7] (its_hub asserts 0 <= s <= 1) -- `log_weight="logit"`, the default;
- resampling probabilities = softmax(log_weights / T). its_hub's ParticleFiltering uses T = 1
  (`resample_temperature`, default 1.0); EntropicParticleFiltering raises T >= 1 early in the
  search when the weights collapse (`annealing`, default "none" as in ParticleFiltering;
  "ess" | "entropy" | "base" with `ess_threshold` 0.5 and `early_phase` 0.5, its defaults);
- W draws with replacement: multinomial (`random.choices`; ParticleFiltering's default, and
  ParticleFiltering does not even forward its resampling argument) or systematic (one uniform
  offset, positions (k + u) / N; EntropicParticleFiltering's default) -- `resampling`;
- a particle drawn k times continues as k copies: here, k children of that candidate.

ets terms. The particles are the W trajectories; at depth d the particles alive are the
candidates (each child generated at depth d-1 is one particle). The strategy draws `remaining`
particles from the candidates and returns the counts: alloc[i] = times candidate i was drawn.

Where ets differs from its_hub (on purpose, SPEC 1): a finished particle leaves the population
and keeps one of the W trajectories (Frontier.remaining already excludes it), exactly as for the
other strategies. In its_hub a stopped particle stays in the population with its final weight
and is resampled with the rest (a draw on it duplicates the finished answer, a stopped particle
not drawn is dropped); ets counts width in trajectories, so that is not reproduced. The PRM
score used is the node's score, i.e. the last step's (its_hub scores the whole path with the
PRM's aggregation, e.g. "model"/"prod"; set that on the PRM side if wanted).

Determinism: the draw uses numpy's Generator seeded from (seed, depth, the candidates' node
ids), so the same tree at the same depth resamples the same way (a resumed run repeats it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ets.strategies.base import Frontier, Strategy, StrategyConfig, option, register

LOG_WEIGHTS = ("logit", "log", "score")
RESAMPLINGS = ("multinomial", "systematic")
ANNEALINGS = ("none", "ess", "entropy", "base")
_EPS = 1e-7  # its_hub's clip, for the logit and for the ESS / entropy of the probabilities


def log_weights(scores: Sequence[float], kind: str = "logit") -> np.ndarray:
    """Log-weights of particles from PRM scores. logit: its_hub's inv_sigmoid (scores must lie
    in [0, 1]); log: the score itself as the likelihood (w proportional to s); score: the raw
    score as the log-weight (softmax over scores, as REBASE does)."""
    s = np.asarray(scores, dtype=float)
    if kind == "score":
        return s
    if np.any((s < 0) | (s > 1)):
        raise ValueError(f"log_weight={kind!r} needs PRM scores in [0, 1], got {s.min():.4g}..{s.max():.4g}; "
                         "use log_weight='score' for a PRM with unbounded scores")
    s = np.clip(s, _EPS, 1 - _EPS)
    return np.log(s / (1 - s)) if kind == "logit" else np.log(s)


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(x, dtype=float) / temperature
    z = np.exp(z - z.max())  # shifted by the max: no overflow, the max gets exp(0) = 1
    return z / z.sum()


def annealed_temperature(probs: np.ndarray, step: int, num_particles: int, method: str,
                         ess_threshold: float = 0.5, early_phase: float = 0.5, max_steps: int = 25,
                         value_max: float = 2.0) -> float:
    """its_hub's entropic annealing temperature (>= 1; 1 = no change). Only while the weights
    have collapsed (ESS / N < ess_threshold) and early in the search (step / max_steps <
    early_phase); ess: (N / ESS) * (1 - progress); entropy: 1 / (H_n + (1 - H_n) * progress)
    with H_n the entropy normalised by log(len); base: value_max - progress."""
    if method == "none" or num_particles <= 1:
        return 1.0
    progress = step / max_steps
    p = np.clip(probs, _EPS, 1 - _EPS)
    ess_ratio = (1.0 / np.sum(p ** 2)) / num_particles
    if not (ess_ratio < ess_threshold and progress < early_phase):
        return 1.0
    if method == "ess":
        value = (1.0 / ess_ratio) * (1 - progress) if ess_ratio > 0 else 1.0
    elif method == "entropy":
        h = float(-np.sum(p * np.log(p)))
        h_n = h / math.log(len(p)) if len(p) > 2 else h
        beta = h_n + (1 - h_n) * progress
        value = 1.0 / beta if beta > 0 else 1.0
    else:  # base
        value = value_max - progress
    return max(1.0, float(value))


def resample(probs: np.ndarray, n: int, rng: np.random.Generator, method: str = "multinomial") -> list[int]:
    """Counts of n draws with replacement from `probs` (sum 1): counts[i] >= 0, sum == n.
    systematic: positions (k + u) / n, k = 0..n-1, one u ~ U[0, 1); index = the first i with
    cumsum(probs)[i] > position (its_hub's loop, written with searchsorted)."""
    if method == "multinomial":
        return [int(c) for c in rng.multinomial(n, probs)]
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0  # rounding must not leave a position past the end
    positions = (np.arange(n) + rng.uniform(0.0, 1.0)) / n
    idx = np.searchsorted(cdf, positions, side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(probs))]


@dataclass(frozen=True)
class ParticleFilterConfig(StrategyConfig):
    resample_temperature: float = option(
        1.0, "particle filter: softmax temperature on the log-weights (its_hub: 1.0; -> 0 keeps the best)")
    log_weight: str = option(
        "logit", "particle filter: log-weight from the PRM score: logit = its_hub's inv_sigmoid, "
        "log = the score as likelihood, score = the raw score (default logit)", choices=LOG_WEIGHTS)
    resampling: str = option(
        "multinomial", "particle filter: resampling scheme (its_hub default multinomial)", choices=RESAMPLINGS)
    annealing: str = option(
        "none", "particle filter: its_hub's entropic annealing of the temperature (none = plain PF; "
        "its EntropicParticleFiltering: ess, with --resampling systematic)", choices=ANNEALINGS)
    ess_threshold: float = option(0.5, "particle filter annealing: anneal while ESS/N is below this (0.5)")
    early_phase: float = option(0.5, "particle filter annealing: anneal while depth/anneal_steps is below this (0.5)")
    anneal_steps: int = option(25, "particle filter annealing: the step horizon of its progress "
                                   "(its_hub: max_steps; match --max-depth, default 25)")

    def __post_init__(self):
        super().__post_init__()
        if not self.resample_temperature > 0:
            raise ValueError(f"resample_temperature must be > 0, got {self.resample_temperature}")
        if not 0 <= self.ess_threshold <= 1:
            raise ValueError(f"ess_threshold must be in [0, 1], got {self.ess_threshold}")
        if not 0 <= self.early_phase <= 1:
            raise ValueError(f"early_phase must be in [0, 1], got {self.early_phase}")
        if not self.anneal_steps >= 1:
            raise ValueError(f"anneal_steps must be >= 1, got {self.anneal_steps}")


@register
class ParticleFilter(Strategy):
    """Contract: select(frontier) -> (alloc, info) with alloc[i] >= 0 and sum(alloc) ==
    frontier.remaining (every unused trajectory continues as a particle), drawn with the
    probabilities info["probs"]; the same (seed, depth, candidate ids, scores) give the same
    alloc. `seed`: the search's seed (SearchConfig.seed), when build_strategy passes it."""

    name = "particle_filter"
    Config = ParticleFilterConfig
    needs_seed = True  # build_strategy passes SearchConfig.seed

    def __init__(self, config: ParticleFilterConfig, width: int, seed: int = 0):
        super().__init__(config, width)
        self.seed = int(seed)

    def rng(self, frontier: Frontier) -> np.random.Generator:
        # non-negative entropy words: the seed (any int), the depth, every candidate's node id
        words = [self.seed % 2 ** 64, frontier.depth] + [c.id for c in frontier.candidates]
        return np.random.default_rng(words)

    def probabilities(self, frontier: Frontier) -> tuple[np.ndarray, float]:
        """The resampling distribution over the candidates and the temperature that made it."""
        c = self.config
        lw = log_weights([n.score for n in frontier.candidates], c.log_weight)
        probs = softmax(lw, c.resample_temperature)
        t = annealed_temperature(probs, frontier.depth, frontier.remaining, c.annealing,
                                 c.ess_threshold, c.early_phase, c.anneal_steps)
        if t != 1.0:  # its_hub: softmax(log_w / T_anneal) after the T = 1 softmax
            probs = softmax(lw, c.resample_temperature * t)
        return probs, c.resample_temperature * t

    def select(self, frontier: Frontier):
        # Every unused trajectory is one particle: after depth 1, len(candidates) == remaining
        # (each of the `remaining` children drawn last depth either finished or is a candidate).
        probs, temperature = self.probabilities(frontier)
        alloc = resample(probs, frontier.remaining, self.rng(frontier), self.config.resampling)
        assert sum(alloc) == frontier.remaining and min(alloc) >= 0  # the invariant of the contract
        return alloc, {"probs": [round(float(p), 6) for p in probs], "temperature": temperature}
