"""The experiment runner behind `ets compare`: configs = datasets x PRMs x methods x widths, run
on the same problems in one process, interleaved in chunks.

Methods are specs `strategy[:key=value/key=value]`, e.g. `ets:lambda_c=2/node_cost=tokens`
(`parse_method`). Each config (an `Arm`) has its own run directory, named by
`RunConfig.identity` exactly as `ets run` names it, so a run made by either front end is found
and extended by the other; a problem already saved there is skipped, never recomputed.

Schedule (`schedule`): each dataset's problems are cut into chunks of C (= concurrency); for
each chunk, every config of that dataset runs the chunk with its C problems in flight, one
config after another, the config order rotating by one from chunk to chunk. So a slow patch of
a shared, noisy machine hits every method alike. Each (chunk, config) is one `run_jobs` call
with one run directory, so its sessions.jsonl line is that chunk's exact record: ids, wall
time, generated tokens, problems in flight, policy/PRM stats deltas (see ets.runner.run_jobs).
That file is the chunk log the report reads (ets.report.record.timed_chunks).

Pooled schedule (`schedule="pooled"`, for collecting accuracy and KV fast): one `run_jobs` call
per dataset with every arm's unsaved problems, one group per problem (its arms in order), C
groups in flight, a finished group replaced at once. No chunk barrier, so the server never idles
on one chunk's slowest problem (with W=16 on a 2-core vLLM, a third of the chunked run's time was
spent with fewer than C requests running). Its sessions lines hold several runs
(`interleaved_runs` > 1), so they time no single method: the report leaves them out of
throughput, which then comes from the chunked problems only.
"""

from __future__ import annotations

import time
import typing
from dataclasses import dataclass, fields
from typing import Callable

from ets.config import SearchConfig
from ets.runner import RunConfig
from ets.runs import RunDir
from ets.tasks import Problem, Task


@dataclass(frozen=True)
class Method:
    label: str  # the spec as given, e.g. "ets:node_cost=tokens"
    strategy: str
    params: dict


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def _coerce(strategy: str, params: dict) -> dict:
    """Spec values typed as the strategy's Config fields (`lambda_c=2` -> 2.0, as the CLI flag
    --lambda-c 2 gives), so that a spec and the equivalent flags name the same run directory."""
    from ets.strategies import STRATEGIES

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[strategy].Config
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    out = {}
    for k, v in params.items():
        if k not in known:
            raise ValueError(f"method {strategy!r}: unknown parameter {k!r} (its parameters: {sorted(known)})")
        t = hints.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and (t is float or t == float | None):
            v = float(v)
        elif t is str and not isinstance(v, str):
            v = str(v)
        out[k] = v
    return out


def parse_method(spec: str) -> Method:
    """'ets:node_cost=tokens/kv_budget=800' -> Method(label=spec, strategy='ets', params={...})."""
    name, _, rest = spec.strip().partition(":")
    params = {}
    for kv in filter(None, rest.split("/")):
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"method {spec!r}: parameter {kv!r} is not key=value")
        params[k.strip()] = _value(v.strip())
    return Method(spec.strip(), name.strip(), _coerce(name.strip(), params))


@dataclass
class Arm:
    """One config of the experiment and where its problems are saved."""

    method: Method
    width: int
    dataset: str
    cfg: SearchConfig
    run: RunDir
    task: Task
    problems: list[Problem]
    prm: str = ""  # the PRM spec when the experiment compares several (ets compare --prm A,B), else ""

    @property
    def key(self) -> str:
        return (f"{self.method.label} W={self.width}" + (f" {self.dataset}" if self.dataset else "")
                + (f" prm={self.prm}" if self.prm else ""))


def plan(rcs: list[RunConfig], loaded: list[tuple[Task, list[Problem]]], methods: list[Method],
         widths: list[int], make_cfg: Callable[[Method, int], SearchConfig]) -> list[Arm]:
    """The arms: for each (RunConfig, loaded dataset) pair, every method x width, with its run
    directory prepared as `ets run` prepares it (RunDir.prepare(rc.identity(cfg, task))).
    `make_cfg(method, width)` builds the SearchConfig (the CLI's flags plus the spec's params).
    RunConfigs that differ only in their PRM share one loaded problem list (the same object), so
    their arms run and are reported on the same problems; an arm names its dataset and its PRM
    only where the experiment has several."""
    several_data = len({rc.dataset for rc in rcs}) > 1
    several_prms = len({rc.prm for rc in rcs}) > 1
    arms = []
    for rc, (task, problems) in zip(rcs, loaded):
        for m in methods:
            for w in widths:
                cfg = make_cfg(m, w)
                run = rc.run_dir(cfg, task.to_dict())
                arms.append(Arm(m, w, rc.dataset if several_data else "", cfg, run, task, problems,
                                rc.prm if several_prms else ""))
    return arms


def by_dataset(arms: list[Arm]) -> list[list[Arm]]:
    """The arms grouped by dataset (arms sharing a problem list), in first-seen order."""
    groups: dict[int, list[Arm]] = {}
    for a in arms:
        groups.setdefault(id(a.problems), []).append(a)
    return list(groups.values())


def schedule(arms: list[Arm], concurrency: int) -> list[tuple[int, Arm, list[Problem]]]:
    """(chunk index, arm, that chunk's problems) in run order: per dataset, chunks of
    `concurrency` problems; per chunk, that dataset's arms rotated left by the chunk index."""
    out, ci = [], 0
    for group in by_dataset(arms):
        problems = group[0].problems
        for i in range(0, len(problems), concurrency):
            k = ci % len(group)
            out += [(ci, a, problems[i:i + concurrency]) for a in group[k:] + group[:k]]
            ci += 1
    return out


SCHEDULES = ("chunked", "pooled")


async def run_experiment(arms: list[Arm], policy, prm, concurrency: int = 1, vote: str = "weighted",
                         agg: str = "last", log: Callable[[str], None] = print,
                         schedule_: str = "chunked", admit_until: float | None = None,
                         prms: dict | None = None) -> list:
    """Run every arm's unsaved problems in the chunked (interleaved) or pooled schedule (see the
    module docstring); returns the failures (ets.runner.Failure; each is also in its run's
    errors/, and the other problems go on). admit_until: see ets.runner.run_jobs. `prms`: spec ->
    reward model for arms that name their PRM (`Arm.prm`); the others use `prm`."""
    from ets.runner import Job, run_jobs

    missing = sorted({a.prm for a in arms if a.prm and a.prm not in (prms or {})})
    if missing:
        raise ValueError(f"no reward model given for PRM spec(s) {missing}")

    def job(p: Problem, a: Arm) -> Job:
        return Job(p, a.cfg, a.run, prms[a.prm] if a.prm else None)

    if schedule_ not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule_!r}")
    embedders: dict = {}
    failures = []
    t0 = time.perf_counter()
    if schedule_ == "pooled":
        for group in by_dataset(arms):
            jobs = [[job(p, a) for a in group] for p in group[0].problems]
            outcomes = await run_jobs(jobs, group[0].task, policy, prm, embedders=embedders,
                                      concurrency=concurrency, vote=vote, agg=agg, progress=False,
                                      admit_until=admit_until)
            for o in outcomes.values():
                failures += o.failures
                for f in o.failures:
                    log(f"  FAILED {f.message}")
            log(f"[{time.perf_counter() - t0:7.0f} s] pooled: {len(group)} configs x {len(jobs)} problems done")
        return failures
    plan_ = schedule(arms, concurrency)
    for n, (ci, arm, chunk) in enumerate(plan_):
        todo = [p for p in chunk if not arm.run.is_done(p.id)]
        if todo:
            outcomes = await run_jobs([[job(p, arm)] for p in todo], arm.task, policy, prm,
                                      embedders=embedders, concurrency=concurrency, vote=vote, agg=agg,
                                      progress=False, admit_until=admit_until)
            for o in outcomes.values():
                failures += o.failures
                for f in o.failures:
                    log(f"  FAILED {f.message}")
        if n + 1 == len(plan_) or plan_[n + 1][0] != ci:
            log(f"[{time.perf_counter() - t0:7.0f} s] chunk {ci + 1}/{plan_[-1][0] + 1} done")
    return failures
