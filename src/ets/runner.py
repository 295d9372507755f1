"""Run problems through the search with bounded concurrency, saving each as soon as it finishes.

RunConfig (the run-level options, and the identity that names a run directory) is defined here,
beside the runner that reads it.

One *job* = one problem under one search config, saved in that config's run directory. Jobs are
grouped by problem: a problem's jobs run one after another (so `ets compare` interleaves methods
problem by problem and machine drift hits all alike), while up to `concurrency` problems are in
flight at once (an asyncio semaphore). A job whose problem file already exists is skipped: that
is how a run resumes. A failing job is recorded in its run's errors/ and the others go on; the
caller gets the failures and exits non-zero.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import asdict, dataclass, field

from ets import admission
from ets.answer import AGGREGATIONS, VOTES, select_from_tree
from ets.config import SearchConfig, _check
from ets.factory import prm_identity
from ets.measures import counter_delta, model_params, problem_compute, run_measures, snapshot, trace_measures
from ets.prm.base import PROBLEM_COUNTERS
from ets.runs import RunDir, summarize, versions
from ets.search import search
from ets.tasks import Problem, Task
from ets.treeio import trace_to_list, tree_to_dict


@dataclass(frozen=True)
class RunConfig:
    """Run-level options of the harness (ets.runner, ets.cli): which problems, which models,
    where results go. What changes a problem's result is in `identity` (it names the run
    directory); problem selection and concurrency are not, so a run can be extended or resumed."""

    dataset: str = "gsm8k"  # "gsm8k" | "math500" | a local JSONL path
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None
    limit: int | None = None
    offset: int = 0
    ids: tuple[str, ...] = ()
    policy: str = "default"  # ets.factory.make_policy spec
    # What names the policy in `identity`: set once the policy is built, from its
    # model_identity() (a served policy: the model's id, root and tokenizer hash, so the same model
    # on another port resumes and another model on the same URL does not); None: the spec.
    policy_identity: dict | None = None
    tokenizer: str | None = None  # a served policy's tokenizer folder (None: the served model's folder)
    system_prompt: str | None = None  # a system turn before every question (None: none / the template's)
    prm: str = "default"  # ets.factory.make_prm spec
    embedder: str = "minilm"  # ETS clustering embedder (ets.cluster.EMBEDDERS)
    concurrency: int = 1  # problems in flight at once
    # KV tokens the embedded engine may hold at once, as a serving engine's cache size: beyond it
    # rows wait, are preempted or tree KV is evicted and recomputed (None: unbounded). An error
    # with server/mock policies.
    kv_capacity: int | None = None
    runs_dir: str = "runs"
    vote: str = "weighted"  # answer selection recorded in results (ets.answer)
    agg: str = "last"
    # Unix time after which no problem starts (those started finish): a session's share of a long
    # run ends with no half-done problem to throw away. None: no limit.
    admit_until: float | None = None

    def __post_init__(self):
        from ets.cluster import EMBEDDERS
        from ets.factory import is_embedded

        if isinstance(self.ids, (list, str)):
            object.__setattr__(self, "ids", tuple([self.ids] if isinstance(self.ids, str) else self.ids))
        _check(self.limit is None or self.limit >= 0, f"limit must be >= 0, got {self.limit}")
        _check(self.offset >= 0, f"offset must be >= 0, got {self.offset}")
        _check(self.concurrency >= 1, f"concurrency must be >= 1, got {self.concurrency}")
        _check(self.kv_capacity is None or self.kv_capacity >= 1,
               f"kv_capacity must be a positive number of tokens, got {self.kv_capacity}")
        _check(self.kv_capacity is None or is_embedded(self.policy),
               f"kv_capacity applies to the embedded engine only, not to policy {self.policy!r}; a server's "
               "cache size is set where the server starts (vLLM: --gpu-memory-utilization or "
               "--num-gpu-blocks-override)")
        _check(self.tokenizer is None or self.policy.startswith(("http://", "https://")),
               f"--tokenizer applies to a served policy (http://...), not to {self.policy!r}: an embedded model "
               "uses its own folder's tokenizer")
        _check(self.embedder in EMBEDDERS, f"unknown embedder {self.embedder!r}; choose one of {sorted(EMBEDDERS)}")
        _check(self.vote in VOTES, f"vote must be one of {VOTES}, got {self.vote!r}")
        _check(self.agg in AGGREGATIONS, f"agg must be one of {AGGREGATIONS}, got {self.agg!r}")
        _check(bool(self.dataset), "dataset must not be empty")
        _check(self.admit_until is None or self.admit_until > 0, f"admit_until must be a Unix time, got {self.admit_until}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ids"] = list(self.ids)
        return d

    def identity(self, search: SearchConfig, task: dict, legacy: bool = False) -> dict:
        """Everything that changes a problem's result under `search`: hashed into the run name.
        legacy: the name runs had before served policies were named by model (the URL), which
        RunDir.prepare adopts when only that one exists (see ets.runs.RunDir.prepare)."""
        policy = self.policy if legacy or self.policy_identity is None else self.policy_identity
        extra = {} if self.system_prompt is None or legacy else {"system_prompt": self.system_prompt}
        return {"search": search.to_dict(), "policy": policy, "prm": prm_identity(self.prm), **extra,
                "embedder": self.embedder if search.strategy == "ets" else None,
                "dataset": self.dataset, "fields": [self.question_field, self.answer_field, self.id_field],
                "task": task,
                # named runs when waves still changed the samples (before per-child streams);
                # kept so those names still resume; left out when unset, as before the option
                **({"kv_capacity": self.kv_capacity} if self.kv_capacity is not None else {})}

    def run_dir(self, search: SearchConfig, task: dict, resume=None) -> RunDir:
        """The run directory of `search` (RunDir.prepare on `identity`), resuming one named the
        older way (by the policy's URL) where only that one exists."""
        legacy = (self.identity(search, task, legacy=True)
                  if self.policy_identity is not None and self.system_prompt is None else None)
        return RunDir.prepare(self.runs_dir, self.identity(search, task), self.to_dict(), resume=resume, legacy=legacy)


@dataclass
class Job:
    problem: Problem
    cfg: SearchConfig
    run: RunDir
    prm: object | None = None  # this job's reward model (ets compare --prm A,B); None: run_jobs's prm


@dataclass
class Failure:
    problem_id: str
    run: str
    message: str


@dataclass
class Outcome:
    computed: int = 0
    skipped: int = 0
    generated: int = 0
    failures: list[Failure] = field(default_factory=list)
    wall_s: float = 0.0
    ids: list[str] = field(default_factory=list)  # problems computed, in finishing order
    deferred: int = 0  # not started: admit_until had passed


# Fields of a problem record that hold the problem's and the model's own text (the tree's steps,
# the prompt): saved as they are. Every other field (names, engine figures, counters) is
# redacted: no URL credentials in a file, whichever model or server reported them.
_MODEL_TEXT = frozenset({"question", "prompt", "gold", "meta", "answer", "tree"})


def redact_obj(obj):
    from ets.http import redact_obj as redact  # (httpx is imported only by runs that use it)

    return redact(obj)


def redact_url(text: str) -> str:
    from ets.http import redact_url as redact

    return redact(text)


def failure_message(problem_id: str, run_name: str, exc: BaseException) -> str:
    """The two lines saved in errors/ and printed for a failed problem: what failed (the
    exception's words, whitespace runs collapsed to one line) and the fix; credentials redacted."""
    words = " ".join(str(exc).split()) or "(no message)"
    return redact_url(f"problem {problem_id!r} ({run_name}) failed: {type(exc).__name__}: {words}\n"
                      f"  fix: {hint(exc)}; then run the same command again (finished problems are kept).")


def failure_report(failures: list["Failure"]) -> list[str]:
    """The messages to print for failed problems, one per cause: the failures because every
    server is down share one (the first one's words); failures with the same words but for the
    problem's id (a server-wide failure, e.g. HTTP 500 on every request) are printed once with
    the problems listed; the others one each. Then the count and how to retry."""
    def listed(fs):
        return ", ".join(f.problem_id for f in fs[:5]) + (" ..." if len(fs) > 5 else "")

    down = [f for f in failures if "ServerDown:" in f.message]
    causes: dict[str, list] = {}
    for f in failures:
        if "ServerDown:" not in f.message:
            causes.setdefault(f.message.split(" failed: ", 1)[-1], []).append(f)
    out = []
    for cause, fs in causes.items():
        if len(fs) == 1:
            out.append(f"error: {fs[0].message}")
        else:
            what, _, fix = cause.partition("\n")
            out.append(f"error: {what}\n  {len(fs)} problem(s) not finished because of it: {listed(fs)}"
                       + (f"\n{fix}" if fix else ""))
    if down:
        why = down[0].message.split("ServerDown:", 1)[1].split("\n", 1)[0].strip()
        out.append(f"error: {why}\n  {len(down)} problem(s) not finished because of it: {listed(down)}")
    if failures:
        out.append(f"{len(failures)} problem(s) failed; the others are saved. Run the same command again to "
                   "retry only the missing ones.")
    return [redact_url(x) for x in out]


def hint(exc: BaseException) -> str:
    """What to do about a failure, by its kind."""
    from ets.prm.base import PRMError

    if getattr(exc, "hint", None):  # the error knows its own fix (ets.engines.server.ServerError)
        return exc.hint
    if isinstance(exc, OSError) and exc.filename and not isinstance(exc, ConnectionError):
        return (f"cannot use {exc.filename} ({exc.strerror}): check the permissions and free space "
                "of the run directory (--runs-dir)")
    if isinstance(exc, PRMError):
        return ("the PRM could not score a step: check that --step-delimiter matches the PRM's step "
                "tag and that --prm names the right model")
    text = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, (ConnectionError, OSError, TimeoutError)) or any(
            w in text for w in ("connect", "timeout", "refused", "unreachable", "http")):
        return ("a server did not answer: check that it is up (e.g. `ets serve`) and that the "
                "--policy/--prm URL is right")
    if isinstance(exc, MemoryError) or "out of memory" in text:
        return "out of memory: lower --concurrency or --width"
    return "see the message above"


def problem_record(problem: Problem, task: Task, prompt: str, result, vote: str, agg: str,
                   policy_name: str, prm_name: str, prm_tokens: int | None = None,
                   policy_params: float | None = None, prm_params: float | None = None) -> dict:
    """Everything saved for one finished problem (see docs/harness.md). `compute`: its tokens,
    wall time and FLOPs (ets.measures.problem_compute) from the tree and trace, the PRM tokens
    charged to it (None: the PRM does not count them) and the models' parameter counts (None:
    unknown)."""
    sel = select_from_tree(result.tree, task, vote, agg)
    trace = trace_to_list(result.trace)
    tree = tree_to_dict(result.tree)
    return {
        "format": 1, "id": problem.id, "question": problem.question, "prompt": prompt, "gold": problem.gold,
        "meta": problem.meta, "task": task.to_dict(),
        "answer": sel.to_dict(), "correct": task.grade(sel.answer, problem.gold),
        "solutions": len(result.solutions), "kv": result.kv_summary(), "counters": result.counters,
        "policy": policy_name, "prm": prm_name, "finished_at": time.time(),
        "engine": trace_measures(trace),
        "compute": problem_compute(tree, result.counters, trace, prm_tokens, policy_params, prm_params),
        "tree": tree, "trace": trace,
    }


async def run_jobs(groups: list[list[Job]], task: Task, policy, prm, embedders: dict | None = None,
                   concurrency: int = 1, vote: str = "weighted", agg: str = "last",
                   progress: bool = True, admit_until: float | None = None) -> dict[str, Outcome]:
    """Run every job not yet saved; returns an Outcome per run directory name.

    `groups`: one list of jobs per problem (run in that order). `embedders`: name -> embedder,
    shared by every ETS job whose config names it (loaded once). `admit_until`: Unix time after
    which a job (a problem under one config) that has not started is left for a later call
    (counted in Outcome.deferred), also the rest of a group already running; ets.admission.close()
    does the same from the moment it is called.

    Each run directory gets one sessions.jsonl line for this call: the ids computed, wall time,
    generated tokens, concurrency, and `engine` / `prm`: the policy's and PRM's stats() counter
    deltas over the call (ets.measures). Those deltas are the whole call's: exact for the run
    when the call holds one run (`interleaved_runs` 1), shared by all its runs otherwise. Each
    problem record gets `engine`: what the policy's observe() gave for that problem."""
    from tqdm import tqdm

    embedders = embedders if embedders is not None else {}
    outcomes: dict[str, Outcome] = {}
    runs: dict[str, RunDir] = {}
    todo = 0
    for jobs in groups:
        for job in jobs:
            runs[job.run.name] = job.run
            out = outcomes.setdefault(job.run.name, Outcome())
            if job.run.is_done(job.problem.id):
                out.skipped += 1
            else:
                todo += 1
    if todo:
        # load the grader and the embedders before any clock starts: their one-off start-up
        # would otherwise be charged to whichever config happens to run first
        task.grade("1", "1")
        for cfg in {id(j.cfg): j.cfg for jobs in groups for j in jobs}.values():
            _embedder(cfg, embedders)
        for emb in embedders.values():
            emb.embed(["warm up"])
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=todo, desc="problems", unit="job", file=sys.stderr, disable=not progress or todo == 0,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    live = LiveLine(bar)
    # each run's PRM (a compare over PRMs has several): its stats delta goes to that run's sessions line
    run_prm = {j.run.name: prm if j.prm is None else j.prm for jobs in groups for j in jobs}
    prms = {id(p): p for p in [prm, *run_prm.values()]}
    before = (snapshot(policy), {k: snapshot(p) for k, p in prms.items()})
    # compute accounting (ets.measures): parameter counts where known, and which PRMs count tokens
    policy_n = model_params(policy)
    prm_n = {k: model_params(p) for k, p in prms.items()}
    counts_tokens = {k: "prm_tokens" in snap for k, snap in before[1].items()}

    async def one(job: Job) -> None:
        out = outcomes[job.run.name]
        prompt = task.prompt(job.problem)
        t = time.perf_counter()
        try:
            emb = _embedder(job.cfg, embedders)
            job_prm = run_prm[job.run.name]
            charged: dict = {}  # what the PRM charges to this problem as it scores (ets.prm.base.charge)
            token = PROBLEM_COUNTERS.set(charged)
            try:
                result = await search(prompt, policy, job_prm, job.cfg, embedder=emb, on_depth=live.depth_done,
                                      reference=task.reference(job.problem))
            finally:
                PROBLEM_COUNTERS.reset(token)
            record = problem_record(job.problem, task, prompt, result, vote, agg,
                                    getattr(policy, "name", "?"), getattr(job_prm, "name", "?"),
                                    prm_tokens=charged.get("prm_tokens", 0) if counts_tokens[id(job_prm)] else None,
                                    policy_params=policy_n, prm_params=prm_n[id(job_prm)])
            record = {k: v if k in _MODEL_TEXT else redact_obj(v) for k, v in record.items()}
            job.run.write_problem(record)
            out.computed += 1
            out.ids.append(job.problem.id)
            out.generated += result.counters.get("generated_tokens", 0)
            live.last = f"{job.problem.id} {'right' if record['correct'] else 'wrong'}"
        except Exception as e:  # noqa: BLE001  (one problem's failure must not lose the others)
            msg = failure_message(job.problem.id, job.run.name, e)
            job.run.write_error(job.problem.id, msg)
            out.failures.append(Failure(job.problem.id, job.run.name, msg))
        finally:
            out.wall_s += time.perf_counter() - t
            bar.set_postfix_str(live.text(), refresh=False)
            bar.update(1)

    def admission_closed() -> bool:
        until = admission.deadline(admit_until)
        if until is None or time.time() < until:
            return False
        if admission.first_notice(until):
            print(f"[ets] admission closed at {time.strftime('%H:%M', time.gmtime(until))} UTC "
                  "(--admit-until or SIGUSR1): problems not started are left for the next run of the same "
                  "command", file=sys.stderr)
        return True

    async def problem(jobs: list[Job]) -> None:
        pending = [j for j in jobs if not j.run.is_done(j.problem.id)]
        if not pending:
            return
        async with sem:
            for k, job in enumerate(pending):
                # checked before each job, not once per group: a group's jobs run one after
                # another, so a group started just before the deadline would otherwise run all
                # its configs past it (pooled: every arm of a problem, each as slow as a problem)
                if admission_closed():
                    for rest in pending[k:]:
                        outcomes[rest.run.name].deferred += 1
                    bar.update(len(pending) - k)
                    return
                if not job.run.claim(job.problem.id):  # finished meanwhile, or another process has it
                    outcomes[job.run.name].skipped += 1
                    bar.update(1)
                    continue
                try:
                    await one(job)
                finally:
                    job.run.release(job.problem.id)

    try:
        await asyncio.gather(*(problem(jobs) for jobs in groups))
    finally:
        bar.close()
        elapsed = time.perf_counter() - t0
        engine = counter_delta(snapshot(policy), before[0])
        prm_delta = {k: counter_delta(snapshot(p), before[1][k]) for k, p in prms.items()}
        for name, out in outcomes.items():
            # one run in this invocation: its wall is the session's; several (compare): the time
            # spent in its own jobs, which is exact at concurrency 1 (documented in the summary)
            wall = elapsed if len(outcomes) == 1 else out.wall_s
            runs[name].append_session(redact_obj({"time": time.time(), "computed": out.computed, "skipped": out.skipped,
                                       "failed": len(out.failures), "wall_s": wall,
                                       "generated_tokens": out.generated,
                                       "concurrency": concurrency, "interleaved_runs": len(outcomes),
                                       "ids": out.ids, "engine": engine,
                                       "prm": prm_delta[id(run_prm.get(name, prm))]}))
    return outcomes


LIVE_EVERY_S = 0.5  # least seconds between two redraws of the live progress line


class LiveLine:
    """The progress bar's live postfix while problems run: tokens generated so far, tok/s since
    the start, the deepest depth any problem reached, the KV the engine holds (embedded: all trees
    in flight; server: the peak it measured during the latest expand) when it reports one, and
    the last problem finished. Updated after every depth of every problem, so the line moves long
    before the first problem finishes; redrawn at most every `every_s` seconds."""

    def __init__(self, bar, every_s: float | None = None):
        every_s = LIVE_EVERY_S if every_s is None else every_s
        self.bar, self.every_s = bar, every_s
        self.t0 = self.shown = time.perf_counter()
        self.tokens, self.deepest, self.kv, self.last = 0, 0, None, ""

    def depth_done(self, depth: int, tokens: int, engine: dict) -> None:
        self.tokens += tokens
        self.deepest = max(self.deepest, depth)
        kv = engine.get("kv_tokens_all", engine.get("server_kv_tokens_peak"))
        self.kv = kv if kv is not None else self.kv
        now = time.perf_counter()
        if now - self.shown >= self.every_s:
            self.shown = now
            self.bar.set_postfix_str(self.text(now), refresh=True)

    def text(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.t0
        parts = [f"{self.tokens} tok", f"{self.tokens / elapsed:.1f} tok/s" if elapsed > 0 else "",
                 f"depth {self.deepest}", f"KV {self.kv:.0f}" if self.kv is not None else "", self.last]
        return ", ".join(p for p in parts if p)


def _embedder(cfg: SearchConfig, embedders: dict):
    if cfg.strategy != "ets":
        return None
    from ets.cluster import make_embedder

    name = cfg.strategy_config().embedder
    if name not in embedders:
        embedders[name] = make_embedder(name)
    return embedders[name]


def write_summary(run: RunDir, problem_ids: list[str] | None = None, extra: dict | None = None) -> dict:
    """Recompute and save run's summary.json from its problem files and sessions (figures of
    ets.runs.summarize plus the engine/PRM measures of ets.measures.run_measures)."""
    records = list(run.iter_problems())
    if problem_ids is not None:
        wanted = set(problem_ids)
        records = [r for r in records if r["id"] in wanted]
    errors = [e for e in run.errors() if problem_ids is None or e["id"] in set(problem_ids)]
    summary = summarize(records, run.sessions(), n_selected=len(problem_ids) if problem_ids else None,
                        failed=len(errors))
    cfg = run.config()
    ident = cfg.get("identity", {})
    summary.update({"name": run.name, "hash": cfg.get("hash"), "strategy": ident.get("search", {}).get("strategy"),
                    "width": ident.get("search", {}).get("width"), "policy": ident.get("policy"),
                    "prm": cfg.get("run", {}).get("prm", ident.get("prm")), "dataset": ident.get("dataset"),
                    "vote": cfg.get("run", {}).get("vote", "weighted"), "agg": cfg.get("run", {}).get("agg", "last"),
                    "versions": versions()})
    summary.update(run_measures(records, run.sessions()))
    if extra:
        summary.update(extra)
    for k, v in list(summary.items()):
        if isinstance(v, float) and not math.isfinite(v):
            summary[k] = None
    summary = redact_obj(summary)
    run.write_summary(summary)
    return summary
