"""The step loop: continuous batching over every request in flight.

One background task per event loop runs iterations while any request is in flight; each
iteration is
    schedule (scheduler.py) -> prefill forward (new segments, preempted rows' steps)
    -> new rows sample their first token from their parent's logits and join the decode batch
    -> one decode forward over every running row of every problem -> finished rows leave
and then yields to the event loop once, so callers whose request completed carry on (score,
select, ask again) and their next request joins at a following iteration. There is no barrier
between problems and no waiting for other callers: a request is admitted as soon as it is in.

Forwards run synchronously inside the event loop: the KVStore is also touched by `release`
and `observe` from callers, so one thread owns it. Strategy selection runs in a worker thread
(ets.search), in parallel with the forwards.

Exact accounting (checked by tests), with no two identical sibling steps in a tree:
    computed tokens - recomputed tokens = prefilled + decoded - recomputed
                                        = unique tokens of the tree - (non-root nodes never expanded)
because every token is fed once, except the last token of a step that was never expanded, and
except what was fed again after a preemption or an eviction (`recomputed_tokens`, 0 when the
capacity is never reached).
"""

from __future__ import annotations

import asyncio
import time

import torch

from ets.engines.base import STOP, Stopped
from ets.engines.kv_store import KVStore
from ets.engines.model_runner import DecodeBatch, ModelRunner, PrefillJob
from ets.engines.request import Request, Row
from ets.engines.sampler import StepEnd, sample
from ets.engines.scheduler import Plan, Scheduler


class TreeEngine:
    def __init__(self, runner: ModelRunner, store: KVStore, scheduler: Scheduler, step_end: StepEnd):
        self.runner, self.store, self.scheduler, self.step_end = runner, store, scheduler, step_end
        self.batch = DecodeBatch(runner.device)
        self._task: asyncio.Task | None = None
        self.counters = {"policy_calls": 0, "prefill_tokens": 0, "decode_tokens": 0, "prefill_calls": 0,
                         "decode_steps": 0, "waves": 0, "rows": 0, "max_batch_rows": 0, "generated_tokens": 0,
                         "peak_inflight_kv_tokens": 0, "expand_s": 0.0, "batched_calls": 0,
                         "iterations": 0, "preempted_rows": 0, "recomputed_row_tokens": 0}

    # --- the loop ------------------------------------------------------------------------------
    async def submit(self, req: Request) -> list[list[Row]]:
        """Queue a request; returns its rows (per expansion) once every one has finished."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            for old in [r for r in self.scheduler.requests if r.future.get_loop() is not loop]:
                self._drop(old)  # left behind by an event loop that has ended
            self._task = loop.create_task(self._loop())
        self.scheduler.add(req)
        return await req.future

    async def _loop(self) -> None:
        while self.scheduler.busy():
            try:
                done = self.step()
            except Exception as e:  # noqa: BLE001  (every caller in flight gets the error)
                for req in list(self.scheduler.requests):
                    self.scheduler.drop(req)
                    if not req.future.done():
                        req.future.set_exception(e)
                self.batch = DecodeBatch(self.runner.device)
                return
            for req in done:
                if not req.future.done():
                    req.future.set_result(req.rows)
            await asyncio.sleep(0)

    def _drop(self, req: Request) -> None:
        for row in self.scheduler.drop(req):
            self.batch.remove(row)

    # --- one iteration ---------------------------------------------------------------------------
    @torch.inference_mode()  # every tensor the engine makes (batch, segments) is an inference tensor
    def step(self) -> list[Request]:
        """One iteration; returns the requests it completed."""
        if STOP.is_set():  # SIGTERM: give up now, not after the rows' steps end
            raise Stopped("stopped by a signal")
        t0 = time.perf_counter()
        for req in [r for r in self.scheduler.requests if r.abandoned]:
            self._drop(req)
        plan = self.scheduler.schedule()
        for row in plan.preempted:
            self.batch.remove(row)
        self.counters["preempted_rows"] += len(plan.preempted)
        self._prefill(plan)
        done = self._join(plan.admitted)
        if len(self.batch):
            done += self._decode()
        self.counters["iterations"] += 1
        self.counters["expand_s"] += time.perf_counter() - t0
        return done

    def _prefill(self, plan: Plan) -> None:
        """Feed the planned segment jobs and recompute the resumed rows' steps, in one forward."""
        resumed = plan.resumed
        if not plan.jobs and not resumed:
            return
        jobs = [PrefillJob(*_held(j.target.path()), j.tokens) for j in plan.jobs]
        jobs += [PrefillJob(*_held(r.parent.path()), r.tokens[:-1]) for r in resumed]
        out = self.runner.prefill(jobs)
        self.counters["prefill_calls"] += 1
        self.counters["prefill_tokens"] += sum(len(j.tokens) for j in jobs)
        for job, (kv, logits) in zip(plan.jobs, out):
            at = 0
            for seg in job.parts:  # the chunk fills the parts in path order
                n = min(len(seg.tokens) - seg.fed, len(job.tokens) - at)
                if n > 0:
                    self.store.extend(seg, [(k[:, at:at + n], v[:, at:at + n]) for k, v in kv], n)
                at += n
            if job.completes:
                job.target.next_logits = logits
        for row, (kv, _) in zip(resumed, out[len(plan.jobs):]):
            row.tail = kv
            self.counters["recomputed_row_tokens"] += len(row.tokens) - 1

    def _join(self, rows: list[Row]) -> list[Request]:
        """New rows take their first token from their parent's logits; rows still open join the
        decode batch with a copy of their path's KV (and of their recomputed step)."""
        done: list[Request] = []
        fresh = [r for r in rows if not r.tokens]
        if fresh:
            self._sample(fresh, torch.stack([r.parent.next_logits for r in fresh]))
        if rows:
            self.counters["waves"] += 1
            self.counters["rows"] += len(rows)
            self.counters["policy_calls"] += any(not r.req.started for r in rows)
        for row in rows:
            row.req.started = True
            if row.stop is not None:  # ended on its first token: nothing was fed
                req = self.scheduler.finish(row, None, 0)
                done += [req] if req else []
                continue
            parts = [s.kv for s in row.parent.path()] + ([row.tail] if row.tail else [])
            self.batch.add(row, parts, row.parent.end + row.fed, self.scheduler.max_batch)
            row.tail = None
            self.scheduler.run(row)
        return done

    def _decode(self) -> list[Request]:
        rows = list(self.batch.rows)
        inflight = self.scheduler.committed()  # what the KV holds during this forward
        self.counters["peak_inflight_kv_tokens"] = max(self.counters["peak_inflight_kv_tokens"], inflight)
        logits = self.runner.decode(self.batch)
        self.counters["decode_steps"] += 1
        self.counters["decode_tokens"] += len(rows)
        self.counters["max_batch_rows"] = max(self.counters["max_batch_rows"], len(rows))
        self._sample(rows, logits)
        done: list[Request] = []
        for row in rows:
            if row.stop is None:
                continue
            # the step's KV: every token but the last (sampled, never fed)
            req = self.scheduler.finish(row, self.batch.tail(row, row.fed), row.fed)
            self.batch.remove(row)
            done += [req] if req else []
        return done

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> None:
        """One token per row (logits: [len(rows), V]), rows grouped by their sampling settings;
        then whether each row's step has ended."""
        groups: dict = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.req.sampling, []).append(i)
        for sampling, idx in groups.items():
            ids, lps = sample(logits[idx], sampling.temperature, sampling.top_p, [rows[i].gen for i in idx])
            for i, t, lp in zip(idx, ids.tolist(), lps.tolist()):
                row = rows[i]
                row.tokens.append(t)
                row.logprobs.append(lp)
                row.stop = self.step_end(row.tokens, sampling)


def _held(path) -> tuple[list, int]:
    """The held KV pieces of a path (its fed segments, in order) and their token count."""
    fed = [s for s in path if s.fed]
    return [s.kv for s in fed], sum(s.fed for s in fed)
