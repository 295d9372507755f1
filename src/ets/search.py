"""The search loop of SPEC section 1, generic over Policy, RewardModel and Strategy.

problem -> Tree(root = prompt) -> [strategy picks (node, n) -> policy samples n steps ->
PRM scores them -> tree grows] until the width is used up -> the tree, its trace, counters.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ets.config import SearchConfig
from ets.engines.base import EOS, LENGTH, Expansion, Policy
from ets.extract import has_final_answer
from ets.prm.base import PRMError, Reference, RewardModel, ScoreRequest
from ets.strategies import Frontier, Strategy, build_strategy
from ets.tree import ANSWER, CAP, DEPTH, Node, Tree, kv_footprint


# Strategy decisions (for ETS: embedding the candidates' steps, clustering, the program) run in
# ONE worker thread shared by every problem in flight, not on the event loop: while one problem
# clusters, the others keep sending requests. One thread (not a pool) keeps the client's CPU use
# bounded beside a server on the same machine and serialises use of the shared embedder.
_SELECT_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ets-select")


def _timed_select(strategy: Strategy, frontier: Frontier):
    t0 = time.perf_counter()
    alloc, info = strategy.select(frontier)
    return alloc, info, time.perf_counter() - t0


class StepDelimiterError(RuntimeError):
    """The policy never ended a step with the step delimiter: almost surely the wrong delimiter."""


@dataclass
class StepTrace:
    """One depth of the search, recorded after its children were generated and scored."""

    depth: int  # depth of the candidates the strategy chose among
    candidates: int
    finished: int  # nodes of this depth that finished (each used one of the W trajectories)
    kept: int  # candidates given >= 1 child
    alloc: list[int]  # children per candidate, aligned with the candidates' order
    candidate_ids: list[int]
    remaining: int  # width left when the strategy chose
    kv_tokens: int  # KV after the children were generated (SPEC 3), prompt included
    kv_gen_tokens: int
    kv_blocks: int
    kv_nodes: int
    select_s: float  # wall time of the strategy's decision
    info: dict = field(default_factory=dict)  # strategy extras (e.g. ETS clusters, objective)
    engine: dict = field(default_factory=dict)  # policy.observe(root) after this depth's expand


@dataclass
class SearchResult:
    tree: Tree
    trace: list[StepTrace]
    question: str
    counters: dict  # generated_tokens, policy_calls, prm_calls, select_s, wall_s

    @property
    def solutions(self) -> list[Node]:
        return self.tree.solutions()

    def kv_summary(self) -> dict:
        """Per-problem KV: mean over steps and peak, tokens and blocks (SPEC 3)."""
        steps = [t for t in self.trace if t.kv_tokens > 0]
        if not steps:
            return {"kv_mean": 0.0, "kv_peak": 0, "kv_gen_mean": 0.0, "kv_blocks_mean": 0.0, "kv_blocks_peak": 0}
        n = len(steps)
        return {
            "kv_mean": sum(t.kv_tokens for t in steps) / n,
            "kv_peak": max(t.kv_tokens for t in steps),
            "kv_gen_mean": sum(t.kv_gen_tokens for t in steps) / n,
            "kv_blocks_mean": sum(t.kv_blocks for t in steps) / n,
            "kv_blocks_peak": max(t.kv_blocks for t in steps),
        }


def classify(node: Node, cfg: SearchConfig) -> str | None:
    """Finished state of a freshly generated node (SPEC 1), or None if it stays a candidate."""
    if node.stop_reason == EOS or has_final_answer(node.text):
        return ANSWER
    if node.cum_tokens >= cfg.max_tokens:
        return CAP
    return None


async def search(question: str, policy: Policy, prm: RewardModel, cfg: SearchConfig,
                 strategy: Strategy | None = None, embedder=None,
                 on_depth: Callable[[int, int, dict], None] | None = None,
                 reference: Reference | None = None) -> SearchResult:
    """Run one problem's tree search to the end and return the whole tree.
    reference: the problem's answer key, passed to the PRM with every path (only the reference
    PRM, a benchmarking instrument, reads it).
    on_depth(depth, generated tokens, engine) is called after every depth is generated and
    scored: the depth reached (1 = the root's children), the tokens that depth generated, and
    policy.observe(root) (for a live progress line; it must not raise)."""
    t_start = time.perf_counter()
    strategy = strategy or build_strategy(cfg, embedder=embedder)
    prompt_ids, prompt_text = policy.format_prompt(question)
    tree = Tree(prompt_ids, prompt_text)
    trace: list[StepTrace] = []
    counters = {"generated_tokens": 0, "policy_calls": 0, "prm_calls": 0, "select_s": 0.0, "select_wait_s": 0.0}
    remaining = cfg.width
    frontier: list[Node] = [tree.root]  # nodes created at the current depth
    depth = 0
    while True:
        # a suspension point per depth: engines that compute inside the loop never yield, and a
        # cancellation (Ctrl-C, SIGTERM) can only land on a real suspension
        await asyncio.sleep(0)
        if depth == 0:
            candidates, finished = [tree.root], []
        else:
            for node in frontier:
                node.finish = classify(node, cfg)
            finished = [n for n in frontier if n.finish is not None]
            candidates = [n for n in frontier if n.finish is None]
            remaining -= len(finished)
        if remaining <= 0 or not candidates or depth >= cfg.max_depth:
            for node in candidates:
                node.finish = DEPTH if depth >= cfg.max_depth else node.finish
            policy.release(frontier)
            break

        t0 = time.perf_counter()
        if depth == 0:  # every strategy starts by sampling the whole width from the root
            alloc, info, select_s = [remaining], {}, 0.0
        else:
            alloc, info, select_s = await asyncio.get_running_loop().run_in_executor(
                _SELECT_POOL, _timed_select, strategy, Frontier(depth, candidates, finished, remaining, cfg.width))
        counters["select_s"] += select_s  # the decision's own compute time
        counters["select_wait_s"] += time.perf_counter() - t0 - select_s  # queued behind other problems
        _check_alloc(strategy, alloc, candidates, remaining)
        if sum(alloc) == 0:  # the strategy has nothing left to grow (e.g. DVTS budgets spent)
            policy.release(frontier)
            break
        for node, n in zip(candidates, alloc):
            node.alloc = n
        for node, label in zip(candidates, info.pop("clusters", []) or []):
            node.cluster = label
        policy.release([n for n, a in zip(candidates, alloc) if a == 0] + finished)

        requests = [Expansion(node, n) for node, n in zip(candidates, alloc) if n > 0]
        steps = await policy.expand(requests, cfg.sampling)
        counters["policy_calls"] += 1
        engine = policy.observe(tree.root)
        children: list[Node] = []
        for req, req_steps in zip(requests, steps):
            if len(req_steps) != req.n:
                raise RuntimeError(f"policy {policy.name} returned {len(req_steps)} steps for node "
                                   f"{req.node.id}, asked for {req.n}")
            for step in req_steps:
                child = tree.add_child(req.node, step.token_ids, step.text, step.stop_reason, step.logprobs)
                counters["generated_tokens"] += len(step.token_ids)
                children.append(child)
        if depth == 0 and all(c.stop_reason == LENGTH for c in children):
            policy.release(children)
            raise StepDelimiterError(
                f"policy {policy.name} produced {len(children)} first steps and none ended with the step "
                f"delimiter {cfg.sampling.step_delimiter!r} (or EOS) within max_step_tokens="
                f"{cfg.sampling.max_step_tokens}: this model does not use that delimiter. Set "
                "--step-delimiter to what it emits between steps, or raise --max-step-tokens.")
        await _score(question, prm, children, reference)
        counters["prm_calls"] += 1

        kv = kv_footprint(children, cfg.kv_block_size)
        trace.append(StepTrace(depth, len(candidates), len(finished), sum(1 for a in alloc if a > 0),
                               list(alloc), [n.id for n in candidates], remaining, kv.tokens,
                               kv.gen_tokens, kv.blocks, kv.nodes, select_s, info, engine))
        frontier = children
        depth += 1
        if on_depth is not None:
            on_depth(depth, sum(len(c.token_ids) for c in children), engine)
    counters["wall_s"] = time.perf_counter() - t_start
    return SearchResult(tree, trace, question, counters)


def _check_alloc(strategy: Strategy, alloc: list[int], candidates: list[Node], remaining: int) -> None:
    if len(alloc) != len(candidates) or any(a < 0 for a in alloc):
        raise RuntimeError(f"strategy {strategy.name} returned a malformed allocation {alloc}")
    if sum(alloc) > remaining and not strategy.may_overshoot:
        raise RuntimeError(f"strategy {strategy.name} allocated {sum(alloc)} > remaining width {remaining}")


async def _score(question: str, prm: RewardModel, children: list[Node], reference: Reference | None = None) -> None:
    scores = await prm.score([ScoreRequest(question, c, reference) for c in children])
    if len(scores) != len(children):
        raise PRMError(f"PRM {prm.name} returned {len(scores)} results for {len(children)} paths")
    for child, path_scores in zip(children, scores):
        if len(path_scores) != child.depth:
            raise PRMError(
                f"PRM {prm.name} returned {len(path_scores)} scores for a path of {child.depth} steps "
                f"(node {child.id}, step text {child.text[-80:]!r}): the step separator/tag did not reach "
                "the PRM for every step. Check the step delimiter matches the PRM's step tag.")
        last = path_scores[-1]
        if last is None or not math.isfinite(last):
            raise PRMError(f"PRM {prm.name} gave no finite score for node {child.id}'s step: {last!r}")
        child.score = float(last)
