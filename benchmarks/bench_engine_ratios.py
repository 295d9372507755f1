"""The embedded engine against vLLM and against plain sampling: three ratios from one run on one
machine (issue 13's targets), and two more that split the second and the third.

    embedded / vLLM         generated tok/s of the same search (--method at --width on the first
                            --problems GSM8K problems, all in flight at once) on the embedded
                            tree-KV engine and on a vLLM server serving the same model (--policy URL)
    tree / plain generate   the embedded search's tok/s against `model.generate` sampling of
                            problems x width sequences at once, --max-tokens each, same model
    search / plain on vLLM  the vLLM search's tok/s against plain sampling of problems x width
                            sequences on the same server (one request of `width` samples per
                            problem, all in flight, --max-tokens each)
and two that say where the second's and the third's gaps go:
    tree / plain generate at the search's load   `model.generate` of as many sequences as the
                            embedded search kept in a decode on average (its rows per decode,
                            rounded to whole problems of `width`)
    search / plain at the search's load   plain sampling of as many sequences as the search kept
                            running on the server on average (read from /metrics while it ran,
                            rounded to whole problems of `width`): what is left below 1.0x is
                            per-token cost (prefill of each node's path, requests, client); the
                            rest of the third ratio's gap is the search keeping fewer sequences
                            running (a problem's next depth waits for its slowest child)

The `running` column: rows per decode on average (embedded search), the batch (plain generate),
sequences running on the server on average while the arm's requests were out (vLLM arms).

Without --policy the two vLLM arms are skipped (it says so). Start the server with `ets serve`
on the same model (`--model`: a folder or GGUF, default the embedded default model).

    python benchmarks/bench_engine_ratios.py --problems 16 --width 8 --max-tokens 256 \\
        [--policy http://127.0.0.1:8000] [--model PATH] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import torch

from bench_engine import machine
from ets.cli import parse_delimiter
from ets.config import SamplingConfig, SearchConfig
from ets.engines.base import Expansion
from ets.engines.hf import load_policy
from ets.factory import make_policy
from ets.prm.default import DefaultPRM
from ets.search import search
from ets.tasks import load_dataset
from ets.tree import Tree

NEVER = "\x00never\x00"  # a step delimiter no model emits: a step is then a whole sample


def mean_running(before: dict, after: dict) -> float | None:
    """Sequences running on the server on average between two `policy.stats()` (the client
    samples /metrics while it has requests out); for the embedded engine its rows per decode since
    it was loaded, which is this arm's figure because the embedded search is its first arm."""
    if "server_load_samples" in after:
        n = after["server_load_samples"] - before.get("server_load_samples", 0)
        return (after["server_running_sum"] - before.get("server_running_sum", 0.0)) / n if n else None
    return after.get("mean_batch_rows")


async def search_arm(policy, prompts: list[str], cfg: SearchConfig, embedder) -> dict:
    """Every problem's search at once on `policy`; generated tokens over wall time."""
    before = policy.stats()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(search(p, policy, DefaultPRM(), cfg, embedder=embedder) for p in prompts))
    wall = time.perf_counter() - t0
    gen = sum(r.counters["generated_tokens"] for r in results)
    return {"sequences": len(prompts) * cfg.width, "generated": gen, "wall_s": wall, "tok_s": gen / wall,
            "problems_s": len(prompts) / wall, "running": mean_running(before, policy.stats())}


def plain_generate_arm(policy, prompts: list[str], width: int, sampling: SamplingConfig, max_tokens: int) -> dict:
    """`model.generate`: every prompt `width` times in one left-padded batch, `max_tokens` each
    (a sequence's tokens counted up to its EOS)."""
    tok, eos = policy.tok, policy.tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    ids = [policy.format_prompt(p)[0] for p in prompts]
    L = max(map(len, ids))
    inp = torch.tensor([[pad] * (L - len(x)) + x for x in ids], device=policy.device)
    mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids], device=policy.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = policy.model.generate(inp, attention_mask=mask, do_sample=True, temperature=sampling.temperature,
                                    top_p=sampling.top_p, top_k=0, max_new_tokens=max_tokens,
                                    num_return_sequences=width, pad_token_id=pad)
    wall = time.perf_counter() - t0
    gen = sum(next((i + 1 for i, t in enumerate(row) if t in policy.eos_ids), len(row))
              for row in out[:, L:].tolist())
    return {"sequences": len(prompts) * width, "generated": gen, "wall_s": wall, "tok_s": gen / wall,
            "problems_s": len(prompts) / wall, "running": float(len(prompts) * width)}


async def plain_server_arm(policy, prompts: list[str], width: int, sampling: SamplingConfig, max_tokens: int) -> dict:
    """Plain sampling through the server: per problem one request for `width` samples of
    `max_tokens` tokens (no step delimiter), every problem at once."""
    plain = SamplingConfig(temperature=sampling.temperature, top_p=sampling.top_p, max_step_tokens=max_tokens,
                           step_delimiter=NEVER)
    roots = [Tree(*policy.format_prompt(p)).root for p in prompts]
    before = policy.stats()
    t0 = time.perf_counter()
    steps = await asyncio.gather(*(policy.expand([Expansion(r, width)], plain) for r in roots))
    wall = time.perf_counter() - t0
    gen = sum(len(s.token_ids) for per_problem in steps for s in per_problem[0])
    return {"sequences": len(prompts) * width, "generated": gen, "wall_s": wall, "tok_s": gen / wall,
            "problems_s": len(prompts) / wall, "running": mean_running(before, policy.stats())}


def cpu_model() -> str:
    """The CPU's model name and the load average when the run started (a shared machine says so)."""
    try:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    "unknown CPU")
    except OSError:
        name = "unknown CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{name}, load average {load:.1f} at start"


def at_load(running: float, width: int, problems: int) -> int:
    """Whole problems of `width` sequences nearest to `running` sequences (1 to `problems`)."""
    return min(problems, max(1, round(running / width)))


COLS = ["sequences", "generated", "wall_s", "tok_s", "problems_s", "running"]


def row(name: str, r: dict | None) -> str:
    cells = ["-"] * len(COLS) if r is None else [
        "-" if r.get(c) is None else f"{r[c]:.1f}" if c == "running" else f"{r[c]:.3f}" if isinstance(r[c], float)
        else str(r[c]) for c in COLS]
    return f"{name:>30} " + " ".join(f"{c:>10}" for c in cells)


def ratio(a: dict | None, b: dict | None, why: str = "skipped (no --policy URL)") -> str:
    return f"{a['tok_s'] / b['tok_s']:.2f}x" if a and b else why


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--method", default="ets", help="search strategy (default ets)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per trajectory, and per plain sample")
    ap.add_argument("--max-step-tokens", type=int, default=256)
    ap.add_argument("--step-delimiter", type=parse_delimiter, default=None,
                    help="default: a newline for the default model, a blank line for any other (as `ets run`)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--embedder", default="minilm", help="ETS clustering embedder (default minilm)")
    ap.add_argument("--model", default=None, help="model folder or .gguf of the embedded arms (default: SmolLM2-135M)")
    ap.add_argument("--policy", default=None, help="vLLM server URL serving the same model (else those arms are skipped)")
    ap.add_argument("--dtype", default=None, help="embedded engine dtype (default: by device and CPU features)")
    ap.add_argument("--max-batch", type=int, default=None, help="embedded engine rows per decode (default problems x width)")
    ap.add_argument("--kv-capacity", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    max_batch = args.max_batch or args.problems * args.width
    policy = load_policy(args.model, seed=args.seed, dtype=args.dtype, kv_capacity=args.kv_capacity,
                         max_batch=max_batch)
    task, problems = load_dataset("gsm8k", limit=args.problems)
    prompts = [task.prompt(p) for p in problems]
    delim = args.step_delimiter if args.step_delimiter is not None else ("\n" if args.model is None else "\n\n")
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_step_tokens=args.max_step_tokens,
                              step_delimiter=delim)
    cfg = SearchConfig(strategy=args.method, width=args.width, max_tokens=args.max_tokens, seed=args.seed,
                       sampling=sampling, strategy_params={"embedder": args.embedder} if args.method == "ets" else {})
    embedder = None
    if args.method == "ets":  # loaded and warmed before any clock starts
        from ets.cluster import make_embedder

        embedder = make_embedder(args.embedder)
        embedder.embed(["warm up"])
    print(f"machine: {cpu_model()}; {machine(policy)}, dtype {policy.dtype}")
    print(f"model: {policy.name}; {args.method} W={args.width} on the first {len(problems)} GSM8K problems, all in "
          f"flight ({len(problems) * args.width} sequences); max_tokens {args.max_tokens}, max_step_tokens "
          f"{args.max_step_tokens}, step delimiter {delim!r}, T={args.temperature}, top_p {args.top_p}; "
          f"embedded max_batch {max_batch}, kv_capacity {args.kv_capacity}", flush=True)

    # Each arm's row is printed as it finishes (a later arm that fails loses none of them); each
    # engine's arms run in one event loop (a server client is bound to the loop it was opened in).
    arms: dict[str, dict | None] = {}
    print(f"\n{'arm':>30} " + " ".join(f"{c:>10}" for c in COLS), flush=True)
    before = policy.stats()
    arms["embedded search"] = asyncio.run(search_arm(policy, prompts, cfg, embedder))
    st = policy.stats()
    print(row("embedded search", arms["embedded search"]), flush=True)
    print(f"  (embedded engine: computed {st['computed_tokens'] - before['computed_tokens']} tokens, "
          f"mean {st['mean_batch_rows']:.1f} rows per decode (max {st['max_batch_rows']}), "
          f"{st['preempted_rows']} preempted, peak KV {st['peak_kv_tokens']})", flush=True)
    arms["plain generate"] = plain_generate_arm(policy, prompts, args.width, sampling, args.max_tokens)
    print(row("plain generate", arms["plain generate"]), flush=True)
    k = at_load(arms["embedded search"]["running"] or args.width, args.width, len(prompts))
    arms["plain generate, search's load"] = plain_generate_arm(policy, prompts[:k], args.width, sampling,
                                                               args.max_tokens)
    print(row("plain generate, search's load", arms["plain generate, search's load"]), flush=True)
    arms["vLLM search"] = arms["vLLM plain sampling"] = arms["vLLM plain, search's load"] = None
    if args.policy:
        async def server_arms():
            server = make_policy(args.policy, seed=args.seed)
            try:
                arms["vLLM search"] = await search_arm(server, prompts, cfg, embedder)
                print(row("vLLM search", arms["vLLM search"]), flush=True)
                arms["vLLM plain sampling"] = await plain_server_arm(server, prompts, args.width, sampling,
                                                                     args.max_tokens)
                print(row("vLLM plain sampling", arms["vLLM plain sampling"]), flush=True)
                running = arms["vLLM search"]["running"]
                if running:
                    k = at_load(running, args.width, len(prompts))
                    arms["vLLM plain, search's load"] = await plain_server_arm(server, prompts[:k], args.width, sampling,
                                                                             args.max_tokens)
                    print(row("vLLM plain, search's load", arms["vLLM plain, search's load"]), flush=True)
            finally:
                await server.aclose()
            print(f"  (vLLM: {server.name} at {args.policy})")

        asyncio.run(server_arms())
    else:
        print("  vLLM arms skipped: no --policy URL given (start one with `ets serve` on the same model)")
    print(f"\nembedded / vLLM, same search (tok/s):       {ratio(arms['embedded search'], arms['vLLM search'])}")
    print(f"tree engine / plain generate (tok/s):       {ratio(arms['embedded search'], arms['plain generate'])}")
    print(f"search / plain sampling, on vLLM (tok/s):   {ratio(arms['vLLM search'], arms['vLLM plain sampling'])}")
    gen_load, server_load = arms["plain generate, search's load"], arms["vLLM plain, search's load"]
    print(f"tree engine / plain generate at the search's load (tok/s): {ratio(arms['embedded search'], gen_load)}")
    why = "skipped (the server's /metrics gave no running count)" if args.policy else "skipped (no --policy URL)"
    print(f"search / plain at the search's load, on vLLM (tok/s): {ratio(arms['vLLM search'], server_load, why)}")


if __name__ == "__main__":
    main()
