"""Benchmark of record = `ets compare` (ets.experiment + ets.report.record), plus two conveniences:
starting a vLLM server for the run (through ets.serve) and setting torch's thread count.

Every other argument goes to `ets compare` as it is (see `ets compare --help` and
docs/harness.md); `--problems N` is kept as an alias of `--limit N`. The same command run again
resumes: run directories are named as `ets run` names them, finished problems are skipped and
still reported.

    # quick pipeline check (mock policy and PRM, seconds)
    python benchmarks/bench_record.py --policy mock --prm mock --embedder hash --problems 20 --widths 8 \
        --out benchmarks/results/mock-check

    # the default model, embedded engine, memory-bound (a fixed KV capacity in tokens)
    python benchmarks/bench_record.py --problems 12 --widths 8 --kv-capacity 3072 \
        --methods rebase,ets,ets:node_cost=tokens,beam,dvts,best_of_n --max-tokens 384 \
        --out benchmarks/results/record-embedded

    # vLLM (CPU build): start a server with a small KV cache, C problems in flight
    python benchmarks/bench_record.py --start-vllm --vllm-blocks 128 --concurrency 4 \
        --problems 8 --widths 8 --out benchmarks/results/record-vllm

Without --start-vllm this is exactly `ets compare ARGS` (with `--threads N`: after
torch.set_num_threads(N)).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

DEFAULT_METHODS = "rebase,ets,beam,dvts,best_of_n"


@contextlib.contextmanager
def vllm_server(args):
    """A vLLM server for the default model, killed on exit (ets.serve.start_vllm_server)."""
    from ets.models import default_model_dir
    from ets.serve import default_venv_python, start_vllm_server

    extra = ["--max-model-len", str(args.vllm_max_model_len)]
    if args.vllm_blocks:
        extra += ["--num-gpu-blocks-override", str(args.vllm_blocks)]
    if args.vllm_max_seqs:
        extra += ["--max-num-seqs", str(args.vllm_max_seqs)]
    server = start_vllm_server(default_model_dir(), args.port, args.vllm_python or str(default_venv_python()),
                               args.kv_cache_gb, block_size=args.vllm_block_size, extra_args=extra,
                               log_path=Path(args.runs_dir) / f"vllm-{args.port}.log")
    try:
        yield server.url
    finally:
        server.terminate()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, add_help=True)
    ap.add_argument("--problems", type=int, default=None, help="alias of `ets compare --limit`")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"method specs (default {DEFAULT_METHODS})")
    ap.add_argument("--title", default="Benchmark of record")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 can be faster on a shared CPU)")
    ap.add_argument("--runs-dir", default="runs", help="run directories (default ./runs)")
    g = ap.add_argument_group("vLLM (--start-vllm)")
    g.add_argument("--start-vllm", action="store_true", help="start a vLLM server and use it as --policy")
    g.add_argument("--port", type=int, default=8031)
    g.add_argument("--kv-cache-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB, integer)")
    g.add_argument("--vllm-blocks", type=int, default=None, help="--num-gpu-blocks-override (makes memory bind)")
    g.add_argument("--vllm-block-size", type=int, default=32, help="server block size (CPU: multiple of 32)")
    g.add_argument("--vllm-max-model-len", type=int, default=2048)
    g.add_argument("--vllm-max-seqs", type=int, default=None)
    g.add_argument("--vllm-python", default=None, help="python of the vLLM venv")
    args, rest = ap.parse_known_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    compare = ["compare", "--methods", args.methods, "--title", args.title, "--runs-dir", args.runs_dir, *rest]
    if args.problems is not None:
        compare += ["--limit", str(args.problems)]
    from ets.cli import main as ets_main

    if not args.start_vllm:
        return ets_main(compare)
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    with vllm_server(args) as url:
        block = [] if "--kv-block-size" in rest else ["--kv-block-size", str(args.vllm_block_size)]
        return ets_main([*compare, "--policy", url, *block])


if __name__ == "__main__":
    sys.exit(main())
