"""ETS through a vLLM server: per step, the tree's exact KV count beside what the server measured.

    python benchmarks/bench_vllm_ets.py --url http://127.0.0.1:8000 --problems 3 --width 4
    python benchmarks/bench_vllm_ets.py --start          # starts (and stops) a server itself

Problems run one after another (one in flight), so each step's server figures are that
problem's alone. PRM: the offline default PRM (this script measures the engine, not accuracy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time


async def run(args) -> dict:
    from ets.config import SamplingConfig, SearchConfig
    from ets.engines.server import ServerPolicy
    from ets.prm.default import DefaultPRM
    from ets.search import search
    from ets.tasks import gsm8k

    policy = ServerPolicy(args.url, tokenizer_path=args.tokenizer)
    prm = DefaultPRM()
    cfg = SearchConfig(strategy="ets", width=args.width, max_tokens=args.max_tokens,
                       seed=args.seed, kv_block_size=args.block_size,
                       sampling=SamplingConfig(max_step_tokens=args.max_step_tokens),
                       strategy_params={"embedder": "hash"})
    problems = gsm8k.load()[: args.problems]
    t0 = time.perf_counter()
    results = []
    for p in problems:
        res = await search(gsm8k.TASK.prompt(p), policy, prm, cfg)
        results.append(res)
        print(f"\n{p.id}: {len(res.trace)} steps, {len(res.solutions)} solutions, "
              f"{res.counters['generated_tokens']} generated tokens, {res.counters['wall_s']:.1f} s")
        print(f"{'depth':>5} {'cands':>5} {'tree KV':>8} {'tree blk':>8} {'server KV peak':>14} "
              f"{'hits/queries':>14} {'hit rate':>8}")
        for t in res.trace:
            e = t.engine
            rate = e.get("prefix_hit_rate")
            print(f"{t.depth:>5} {t.candidates:>5} {t.kv_tokens:>8} {t.kv_blocks:>8} "
                  f"{str(e.get('kv_tokens_peak')):>14} "
                  f"{str(e.get('prefix_hits')) + '/' + str(e.get('prefix_queries')):>14} "
                  f"{'-' if rate is None else f'{rate:.2f}':>8}")
    wall = time.perf_counter() - t0
    stats = policy.stats()
    await policy.aclose()
    summary = {"problems": len(problems), "wall_s": round(wall, 1),
               "generated_tokens": sum(r.counters["generated_tokens"] for r in results),
               "server_prefix_hits": stats["server_prefix_hits"],
               "server_prefix_queries": stats["server_prefix_queries"],
               "server_prefix_hit_rate": stats["server_prefix_hit_rate"],
               "server_kv_tokens_peak": stats["server_kv_tokens_peak"],
               "tree_kv_peak": max(r.kv_summary()["kv_peak"] for r in results),
               "retries": stats["retries"]}
    print("\n" + json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="server base URL (default: start one)")
    ap.add_argument("--start", action="store_true", help="start a vLLM server for the run")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--kv-cache-gb", type=int, default=1)
    ap.add_argument("--tokenizer", default=None, help="local tokenizer folder (default: the served folder)")
    ap.add_argument("--problems", type=int, default=3)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-step-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32,
                    help="KV block size: the started server's and the tree count's (CPU: multiple of 32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.url is None or args.start:
            from ets.models import default_model_dir
            from ets.serve import default_venv_python, start_vllm_server

            server = stack.enter_context(start_vllm_server(
                default_model_dir(), args.port, default_venv_python(), args.kv_cache_gb,
                block_size=args.block_size))
            args.url = server.url
            print(f"vLLM at {server.url} (log: {server.log_path})")
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
