"""What the step-level search asks of a server beyond plain sampling, one feature at a time, at the
same number of sequences in flight (issue 13, item 4: where the search-vs-plain-sampling gap goes).

Variants, each over the same prompts (GSM8K test questions in the model's chat template), every
sequence sampling exactly --max-tokens tokens (no stop), all requests in flight at once:
    plain          one request per prompt asking n = --samples sequences (plain sampling)
    logprobs       the same with "logprobs": 0 (the sampled token's log-prob, as the search asks)
    per-sequence   --samples requests of n = 1 per prompt (one request per tree node, the search's
                   shape when every node has one child)
Printed: generated tok/s of each variant and its ratio to plain. The variants run in turn, plain
first and last (its two figures show the drift of the machine over the run).

The search's own prefill (a node's request re-sends its whole path; the prefix cache serves only
whole blocks) shows in a run's record as `prefill tok` / `prefix hit`, not here.

    python benchmarks/bench_server_overheads.py --policy http://127.0.0.1:8000 --prompts 4 --samples 16 \\
        --max-tokens 96
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx

from ets.tasks import load_dataset


async def variant(url: str, model: str, prompts: list[str], samples: int, max_tokens: int, *,
                  logprobs: bool = False, per_sequence: bool = False, seed: int = 0) -> dict:
    base = {"model": model, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0.8,
            "ignore_eos": True}
    if logprobs:
        base["logprobs"] = 0
    bodies = []
    for i, p in enumerate(prompts):
        if per_sequence:
            bodies += [{**base, "prompt": p, "n": 1, "seed": seed + 1000 * i + k} for k in range(samples)]
        else:
            bodies.append({**base, "prompt": p, "n": samples, "seed": seed + 1000 * i})
    async with httpx.AsyncClient(timeout=3600) as c:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(c.post(f"{url}/v1/completions", json=b) for b in bodies))
        wall = time.perf_counter() - t0
    for r in rs:
        r.raise_for_status()
    gen = sum(r.json()["usage"]["completion_tokens"] for r in rs)
    return {"requests": len(bodies), "sequences": len(prompts) * samples, "generated": gen, "wall_s": wall,
            "tok_s": gen / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", required=True, help="the server's URL (vLLM, OpenAI completions API)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    url = a.policy.rstrip("/")
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    _, problems = load_dataset("gsm8k", a.prompts, 0, None)
    # the chat template the search uses for Qwen-style models; the prompt text itself does not
    # matter here (every sequence samples exactly max_tokens tokens)
    prompts = [f"<|im_start|>user\n{q.question}<|im_end|>\n<|im_start|>assistant\n" for q in problems]
    out = {}
    for name, kw in (("plain", {}), ("logprobs", {"logprobs": True}), ("per-sequence", {"per_sequence": True}),
                     ("plain again", {})):
        out[name] = asyncio.run(variant(url, model, prompts, a.samples, a.max_tokens, **kw))
        r = out[name]
        print(f"{name:13s} {r['requests']:4d} requests, {r['sequences']} sequences, {r['generated']} tokens in "
              f"{r['wall_s']:.1f} s: {r['tok_s']:.1f} tok/s", flush=True)
    ref = (out["plain"]["tok_s"] + out["plain again"]["tok_s"]) / 2
    for name in ("logprobs", "per-sequence"):
        print(f"{name} / plain (mean of both plain runs): {out[name]['tok_s'] / ref:.2f}x")
    if a.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
