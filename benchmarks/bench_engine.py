"""Engine benchmark, all figures side by side in one run, with the machine they came from.

(i)   tree engine vs plain transformers sampling (`model.generate`, num_return_sequences, no
      prefix sharing) on the same number of sequences and tokens: tokens computed, wall, tok/s.
(ii)  ETS vs REBASE at --width on the first --problems GSM8K problems with the default model +
      DefaultPRM: accuracy (weighted vote), mean/peak KV tokens (SPEC 3 and engine-held),
      generated tokens/s, problems/s.
(iii) the default PRM's worth: weighted-vote accuracy on the (ii) trees with the PRM's scores vs
      random scores (same trees, same width), and with --random-search a REBASE search driven by
      random scores.

    python benchmarks/bench_engine.py --problems 20 --width 16 [--concurrency 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import time

import torch

from ets.answer import Solution, select_answer, select_from_tree, solutions_of
from ets.cli import parse_delimiter
from ets.config import SamplingConfig, SearchConfig
from ets.engines.base import Expansion
from ets.engines.hf import load_policy
from ets.prm.base import RewardModel
from ets.prm.default import DefaultPRM
from ets.search import search
from ets.tasks import load_dataset
from ets.tree import Tree


class RandomPRM(RewardModel):
    """Uniform random step scores (seeded): the no-signal baseline."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    async def score(self, requests):
        return [[self.rng.random() for _ in r.node.path()] for r in requests]


def machine(policy) -> str:
    dev = policy.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {dev} ({gpu}), {platform.python_version()}")


def bench_plain(policy, question: str, width: int, step_tokens: int) -> list[tuple[str, dict]]:
    """(i): a two-level tree (root -> W children, W/4 of them -> 4 children each: W leaves of
    2 steps) vs W plain samples of 2 x step_tokens tokens from the prompt."""
    sampling = SamplingConfig(max_step_tokens=step_tokens, step_delimiter="\x00never\x00")
    before = policy.stats()
    ids, text = policy.format_prompt(question)
    tree = Tree(ids, text)
    t0 = time.perf_counter()
    first = asyncio.run(policy.expand([Expansion(tree.root, width)], sampling))[0]
    kids = [tree.add_child(tree.root, s.token_ids, s.text, s.stop_reason, s.logprobs) for s in first]
    parents = kids[: max(1, width // 4)]
    policy.release(kids[len(parents):])
    second = asyncio.run(policy.expand([Expansion(p, 4) for p in parents], sampling))
    tree_s = time.perf_counter() - t0
    leaves = [tree.add_child(p, s.token_ids, s.text, s.stop_reason) for p, ss in zip(parents, second) for s in ss]
    policy.release(leaves)
    after = policy.stats()
    gen_tree = sum(len(n.token_ids) for n in tree.nodes[1:])
    computed_tree = after["computed_tokens"] - before["computed_tokens"]

    model, dev = policy.model, policy.device
    prompt = torch.tensor([ids], device=dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, max_new_tokens=2 * step_tokens,
                             num_return_sequences=len(leaves), pad_token_id=policy.tok.pad_token_id)
    plain_s = time.perf_counter() - t0
    new = out[:, len(ids):]
    lengths = [(row != policy.tok.pad_token_id).sum().item() if policy.tok.pad_token_id is not None
               else row.numel() for row in new]
    gen_plain = sum(lengths)
    computed_plain = len(leaves) * len(ids) + sum(max(n - 1, 0) for n in lengths)  # prompt fed per sequence
    return [
        ("tree engine", {"sequences": len(leaves), "generated": gen_tree, "computed": computed_tree,
                         "prefill": after["prefill_tokens"] - before["prefill_tokens"], "wall_s": tree_s,
                         "tok_s": gen_tree / tree_s}),
        ("plain generate", {"sequences": len(leaves), "generated": gen_plain, "computed": computed_plain,
                            "prefill": len(leaves) * len(ids), "wall_s": plain_s, "tok_s": gen_plain / plain_s}),
    ]


def bench_search(policy, prm, task, problems, cfg: SearchConfig, concurrency: int = 1) -> dict:
    """Search every problem, `concurrency` in flight at once (their steps share decode batches)."""
    embedder = None
    if cfg.strategy == "ets":  # one embedder for the whole run, loaded before the clock starts
        from ets.cluster import make_embedder

        embedder = make_embedder(cfg.strategy_config().embedder)
        embedder.embed(["warm up"])
    before = policy.stats()
    t0 = time.perf_counter()
    results, correct, gen = [], 0, 0
    kv_mean, kv_peak, held_peak = [], [], []

    async def all_problems():
        sem = asyncio.Semaphore(concurrency)

        async def one(p):
            async with sem:
                return await search(task.prompt(p), policy, prm, cfg, embedder=embedder)

        return await asyncio.gather(*(one(p) for p in problems))

    for p, res in zip(problems, asyncio.run(all_problems())):
        sel = select_from_tree(res.tree, task)
        ok = task.grade(sel.answer, p.gold)
        correct += ok
        gen += res.counters["generated_tokens"]
        kv = res.kv_summary()
        kv_mean.append(kv["kv_mean"])
        kv_peak.append(kv["kv_peak"])
        held_peak.append(max((t.engine.get("kv_tokens", 0) for t in res.trace), default=0))
        results.append((p, res))
        print(f"  {cfg.strategy} {p.id}: answer={sel.answer!r} gold={p.gold!r} ok={ok} "
              f"nodes={len(res.tree.nodes)} {res.counters['wall_s']:.1f}s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    after = policy.stats()
    n = len(problems)
    return {"accuracy": correct / n, "kv_mean": sum(kv_mean) / n, "kv_peak": max(kv_peak),
            "held_peak": max(held_peak), "generated": gen, "computed": after["computed_tokens"] - before["computed_tokens"],
            "tok_s": gen / wall, "problems_s": n / wall, "wall_s": wall, "results": results}


def revote_random(task, results, seed: int) -> float:
    """Weighted-vote accuracy on the same trees with each solution's score drawn at random."""
    rng, correct = random.Random(seed), 0
    for p, res in results:
        sols = [Solution(s.node_id, s.answer, tuple(rng.random() for _ in s.step_scores))
                for s in solutions_of(res.tree, task.extract)]
        correct += task.grade(select_answer(sols, "weighted", "last", task.same).answer, p.gold)
    return correct / len(results)


def any_correct(task, results) -> float:
    """Oracle: fraction of problems where some finished solution is right (the vote's ceiling)."""
    return sum(any(task.grade(s.answer, p.gold) for s in solutions_of(r.tree, task.extract))
               for p, r in results) / len(results)


def revote(task, results, vote: str) -> float:
    return sum(task.grade(select_from_tree(r.tree, task, vote=vote).answer, p.gold) for p, r in results) / len(results)


def table(title: str, rows: list[tuple[str, dict]], cols: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'':>16} " + " ".join(f"{c:>12}" for c in cols))
    for name, d in rows:
        print(f"{name:>16} " + " ".join(f"{d[c]:>12.3f}" if isinstance(d[c], float) else f"{d[c]:>12}"
                                        for c in cols))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--methods", default="ets,rebase")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--max-step-tokens", type=int, default=256)
    ap.add_argument("--step-delimiter", type=parse_delimiter, default="\n",
                    help="step delimiter (default: a newline, as `ets run` uses for the default model)")
    ap.add_argument("--plain-step-tokens", type=int, default=64, help="(i): tokens per step of the tree")
    ap.add_argument("--policy", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--random-search", action="store_true", help="(iii): also search with random scores")
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=1,
                    help="problems in flight at once in (ii); their steps are decoded in shared batches")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of (ii)/(iii) (default 1.0)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    policy = load_policy(args.policy, seed=args.seed)
    task, problems = load_dataset("gsm8k", limit=args.problems)
    print(f"machine: {machine(policy)}")
    print(f"policy: {policy.name}; PRM: default; width {args.width}; {len(problems)} GSM8K problems "
          f"(first {args.problems}), {args.concurrency} problem(s) in flight; max_tokens {args.max_tokens}, "
          f"max_step_tokens {args.max_step_tokens}, temperature {args.temperature}, top_p {args.top_p}")

    if not args.skip_plain:
        rows = bench_plain(policy, task.prompt(problems[0]), args.width, args.plain_step_tokens)
        table(f"(i) tree engine vs plain sampling ({rows[0][1]['sequences']} sequences, "
              f"2 steps x {args.plain_step_tokens} tokens)", rows,
              ["sequences", "generated", "prefill", "computed", "wall_s", "tok_s"])
        saved = rows[1][1]["computed"] - rows[0][1]["computed"]
        print(f"tokens computed saved by prefix sharing: {saved} "
              f"({saved / rows[1][1]['computed']:.0%} of plain)")

    prm = DefaultPRM()
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p,
                              max_step_tokens=args.max_step_tokens, step_delimiter=args.step_delimiter)
    runs = {}
    for method in args.methods.split(","):
        cfg = SearchConfig(strategy=method, width=args.width, max_tokens=args.max_tokens, seed=args.seed,
                           sampling=sampling)
        runs[method] = bench_search(policy, prm, task, problems, cfg, args.concurrency)
    table(f"(ii) search at width {args.width} on {len(problems)} GSM8K problems (weighted vote, DefaultPRM)",
          list(runs.items()), ["accuracy", "kv_mean", "kv_peak", "held_peak", "generated", "tok_s",
                               "problems_s", "wall_s"])

    rows = []
    for method, r in runs.items():
        rows.append((method, {"prm_weighted": r["accuracy"], "random_weighted": revote_random(task, r["results"], args.seed),
                              "majority": revote(task, r["results"], "majority"),
                              "any_correct": any_correct(task, r["results"])}))
    if args.random_search:
        cfg = SearchConfig(strategy="rebase", width=args.width, max_tokens=args.max_tokens, seed=args.seed,
                           sampling=sampling)
        rs = bench_search(policy, RandomPRM(args.seed), task, problems, cfg, args.concurrency)
        rows.append(("rebase,rand-PRM", {"prm_weighted": float("nan"), "random_weighted": rs["accuracy"],
                                         "majority": revote(task, rs["results"], "majority"),
                                         "any_correct": any_correct(task, rs["results"])}))
    table("(iii) PRM worth: accuracy of the vote on the same trees (random = solution scores drawn at random)",
          rows, ["prm_weighted", "random_weighted", "majority", "any_correct"])
    print(f"\nengine counters: {({k: v for k, v in policy.stats().items() if k != 'expand_s'})}")


if __name__ == "__main__":
    main()
