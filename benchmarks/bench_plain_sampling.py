"""What the policy solves with no search at all: N plain samples per problem (`model.generate`,
no steps, no PRM), graded two ways.

    strict  the SPEC's extraction (section 4: last \\boxed{}, else "The answer is ..."), as the
            search grades its solutions
    last#   the last number in the text (lenient; how small-model figures are often quoted)

Prints pass@1 (mean over samples), any-of-N, the share of samples that state a final answer the
strict way, and the share that ended by EOS (the rest ran out of --max-tokens). This is the
scale against which the search's accuracy and the PRM's worth are read (bench_engine (iii)).

    python benchmarks/bench_plain_sampling.py --problems 10 --samples 16 --temperature 0.8 --max-tokens 512
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from ets.engines.hf import load_policy
from ets.extract import extract_answer
from ets.tasks import load_dataset

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--problems", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--policy", default=None, help="model folder or GGUF (default: the embedded default model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    policy = load_policy(args.policy)
    task, problems = load_dataset(args.dataset, limit=args.problems, offset=args.offset)
    print(f"# plain sampling: {policy.name}; {len(problems)} {args.dataset} problems from {args.offset}; "
          f"{args.samples} samples each, temperature {args.temperature}, top_p {args.top_p}, "
          f"max_tokens {args.max_tokens}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    eos = policy.tok.eos_token_id
    totals = {"strict": [0, 0], "last#": [0, 0]}  # [correct samples, problems with any correct]
    stated = ended = tokens = 0
    t0 = time.perf_counter()
    for p in problems:
        ids, _ = policy.format_prompt(task.prompt(p))
        inp = torch.tensor([ids], device=policy.device)
        with torch.no_grad():
            out = policy.model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=True,
                                        temperature=args.temperature, top_p=args.top_p,
                                        max_new_tokens=args.max_tokens, num_return_sequences=args.samples,
                                        pad_token_id=policy.tok.pad_token_id or eos)
        gen = out[:, inp.shape[1]:].tolist()
        hits = {"strict": 0, "last#": 0}
        for seq in gen:
            n = next((i + 1 for i, t in enumerate(seq) if t == eos), len(seq))
            tokens += n
            ended += eos in seq
            text = policy.tok.decode(seq[:n], skip_special_tokens=True)
            strict = extract_answer(text)
            stated += strict is not None
            hits["strict"] += task.grade(strict, p.gold)
            hits["last#"] += task.grade(last_number(text), p.gold)
        for k in totals:
            totals[k][0] += hits[k]
            totals[k][1] += hits[k] > 0
        print(f"  {p.id}: gold {p.gold}: strict {hits['strict']}/{len(gen)}, last# {hits['last#']}/{len(gen)}",
              flush=True)
    wall = time.perf_counter() - t0
    n_samples = len(problems) * args.samples
    print(f"\n{'grading':>8} {'pass@1':>8} {f'any-of-{args.samples}':>10}")
    for k, (right, anyc) in totals.items():
        print(f"{k:>8} {right / n_samples:8.3f} {anyc / len(problems):10.3f}")
    print(f"\nstated a final answer (strict): {stated / n_samples:.3f}; ended by EOS: {ended / n_samples:.3f}; "
          f"{tokens} tokens in {wall:.0f} s ({tokens / wall:.1f} tok/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
