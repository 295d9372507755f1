"""The scheduler: which rows run in the next iteration, against `kv_capacity` and `max_batch`.

It owns the rows of every request in flight:
    waiting  rows not in the decode batch (new, or preempted), first come first served;
    running  rows in the decode batch, in the order they joined;
and each row is in exactly one of waiting, running or finished (Row.state says which).

KV counted against the capacity (logical, prefix-shared, as a paged engine holds it):
    committed = KV of the tree segments (KVStore.tokens)
              + per running row, its step's tokens once this iteration's decode fed the last
and `committed <= kv_capacity` holds at every forward. Each iteration, in order:
  1. relieve: while committed > capacity, the newest running row is preempted (it keeps its
     tokens and goes back to the front of `waiting`; its KV is recomputed when it runs again);
     a single row that does not fit makes room by evicting tree KV no running row needs
     (leaves first, problems with no work in flight first); if nothing can be evicted the
     capacity cannot hold one row: CapacityError.
  2. admit (only when nothing was preempted): waiting rows in order join while they fit, each
     with `GROWTH_RESERVE` tokens of room to grow beside every other row (so a row just admitted
     is not preempted at once). A row whose parent's KV or logits are not there yet gets a
     prefill job for its parent's path first, at most `prefill_budget` tokens per iteration (a
     longer prompt is fed in chunks over several iterations). A row alone may start with no
     reserve, after evicting what it needs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ets.engines.kv_store import KVStore, Segment
from ets.engines.request import FINISHED, RUNNING, WAITING, Request, Row

GROWTH_RESERVE = 16  # tokens of room per running row asked for before admitting another


class CapacityError(RuntimeError):
    """kv_capacity cannot hold even one row."""


@dataclass
class SegmentJob:
    """Feed `tokens` into the incomplete segments of `target`'s path (`parts`, in path order,
    each from its first unfed token); `completes`: the target is then complete (its logits kept)."""

    target: Segment
    parts: list[Segment]
    tokens: list[int]
    completes: bool


@dataclass
class Plan:
    """One iteration's work."""

    preempted: list[Row] = field(default_factory=list)  # leave the decode batch; KV dropped
    jobs: list[SegmentJob] = field(default_factory=list)  # prefill of tree segments
    admitted: list[Row] = field(default_factory=list)  # join the decode batch this iteration

    @property
    def resumed(self) -> list[Row]:
        """Admitted rows whose step so far is recomputed (prefill of tokens[:-1])."""
        return [r for r in self.admitted if len(r.tokens) > 1]


class Scheduler:
    def __init__(self, store: KVStore, kv_capacity: int | None, max_batch: int, prefill_budget: int):
        self.store, self.capacity = store, kv_capacity
        self.max_batch, self.prefill_budget = max_batch, prefill_budget
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self.requests: list[Request] = []

    # --- requests ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        for seg in req.parents:
            self.store.use(seg)
        self.requests.append(req)
        self.waiting.extend(req.all_rows())

    def busy(self) -> bool:
        return bool(self.requests)

    def drop(self, req: Request) -> list[Row]:
        """Forget a request (abandoned, or failed); returns its rows that were running (the
        caller takes them out of the decode batch). Steps already finished give their claim back."""
        self.requests.remove(req)
        rows = set(req.all_rows())
        self.waiting = deque(r for r in self.waiting if r not in rows)
        running = [r for r in self.running if r in rows]
        self.running = [r for r in self.running if r not in rows]
        for row in rows:
            if row.child is not None:
                self.store.unclaim(row.child)
                row.child = None
        for seg in req.parents:
            self.store.unuse(seg)
        return running

    # --- row transitions -------------------------------------------------------------------
    def run(self, row: Row) -> None:
        row.state = RUNNING
        self.running.append(row)

    def finish(self, row: Row, kv, fed: int) -> Request | None:
        """Store the finished row's step (KV of its first `fed` tokens); returns its request when
        that was the request's last row (its nodes are then consumed and its parents let go)."""
        if row.state == RUNNING:
            self.running.remove(row)
        row.state = FINISHED
        row.child = self.store.add_step(row.parent, tuple(row.tokens), kv, fed)
        req = row.req
        req.unfinished -= 1
        if req.unfinished:
            return None
        self.requests.remove(req)
        for exp in req.expansions:  # an expanded node is done; its KV lives on through its children
            self.store.consume(exp.node)
        for seg in req.parents:
            self.store.unuse(seg)
        for row in req.all_rows():  # the steps now belong to the caller, who creates their nodes
            row.child = None
        return req

    # --- accounting --------------------------------------------------------------------------
    def committed(self) -> int:
        """KV held once this iteration's decode has fed every running row's last token."""
        return self.store.tokens + sum(len(r.tokens) for r in self.running)

    def check(self, batch_rows) -> None:
        """Invariants (for tests)."""
        states = {WAITING: set(self.waiting), RUNNING: set(self.running)}
        for req in self.requests:
            for row in req.all_rows():
                assert sum(row in s for s in states.values()) == (row.state != FINISHED), row.state
                assert row.state == FINISHED or row in states[row.state]
        assert set(batch_rows) == states[RUNNING], "the decode batch holds exactly the running rows"
        assert self.capacity is None or self.committed() <= self.capacity + len(self.running)
        self.store.check()

    # --- one iteration -----------------------------------------------------------------------
    def schedule(self) -> Plan:
        plan = Plan()
        self._relieve(plan)
        if not plan.preempted:
            self._admit(plan)
        return plan

    def _relieve(self, plan: Plan) -> None:
        if self.capacity is None:
            return
        while self.committed() > self.capacity:
            if len(self.running) > 1:
                row = self.running.pop()  # the newest
                row.state = WAITING
                self.waiting.appendleft(row)  # popped newest first: older rows end up in front
                plan.preempted.append(row)
                continue
            row = self.running[0]
            over = self.committed() - self.capacity
            if self._evict(over, _paths([row.parent])) < over:
                raise CapacityError(self._too_small(row))

    def _admit(self, plan: Plan) -> None:
        budget = self.prefill_budget
        planned: dict[Segment, SegmentJob] = {}
        fed_by_plan: set[Segment] = set()
        extra = 0  # KV this plan adds: prefill tokens, admitted rows' steps
        reserve = sum(self._headroom(r) for r in self.running)
        for row in list(self.waiting):
            if len(self.running) + len(plan.admitted) >= self.max_batch:
                break
            parent = row.parent
            job = planned.get(parent)
            if not self._ready(row) and job is None:
                job = self._job(parent, budget, fed_by_plan)
                if job is None:
                    continue  # its path waits for a job planned for another target, or for budget
                if not self._fits(plan, extra + len(job.tokens), reserve):
                    idle = not self.running and not plan.admitted and not plan.jobs
                    if not (idle and self._make_room(extra + len(job.tokens), [parent])):
                        break
                plan.jobs.append(job)
                planned[job.target] = job
                fed_by_plan.update(job.parts)
                budget -= len(job.tokens)
                extra += len(job.tokens)
            if job is not None and not (job.target is parent and job.completes):
                continue  # the parent is not ready after this iteration
            tail = len(row.tokens) - 1 if row.tokens else 0
            if tail > budget and (plan.jobs or plan.resumed):
                continue  # one recomputation per iteration beyond the budget
            cost = len(row.tokens) if row.tokens else 1
            if not self._fits(plan, extra + cost, reserve + self._headroom(row)):
                idle = not self.running and not plan.admitted
                keep = [parent] + [j.target for j in plan.jobs]
                if not (idle and (self._fits(plan, extra + cost, 0) or self._make_room(extra + cost, keep))):
                    break
            plan.admitted.append(row)
            self.waiting.remove(row)
            budget -= tail
            extra += cost
            reserve += self._headroom(row)

    def _ready(self, row: Row) -> bool:
        """The row can join now: its parent's path is held (and, for a new row, its logits)."""
        parent = row.parent
        if not parent.complete:
            return False
        if row.tokens:
            return True
        if parent.next_logits is None:
            raise RuntimeError("a held segment lost its next-token logits")  # a bug: see kv_store
        return True

    def _job(self, target: Segment, budget: int, fed_by_plan: set[Segment]) -> SegmentJob | None:
        parts = [s for s in target.path() if not s.complete]
        if any(s in fed_by_plan for s in parts):
            return None
        # an incomplete ancestor that is itself being expanded is fed as its own target, so its
        # logits are kept; this path waits for it
        target = next((s for s in parts if s.users > 0), target)
        parts = parts[:parts.index(target) + 1]
        tokens = [t for s in parts for t in s.tokens[s.fed:]]
        if budget <= 0:
            return None
        return SegmentJob(target, parts, tokens[:budget], len(tokens) <= budget)

    def _headroom(self, row: Row) -> int:
        return max(0, min(GROWTH_RESERVE, row.req.sampling.max_step_tokens - len(row.tokens) - 1))

    def _fits(self, plan: Plan, extra: int, reserve: int) -> bool:
        return self.capacity is None or self.committed() + extra + reserve <= self.capacity

    def _make_room(self, extra: int, keep: list[Segment]) -> bool:
        """Evict tree KV (not on the paths of `keep`) until `extra` more tokens fit, or raise."""
        over = self.committed() + extra - self.capacity
        if self._evict(over, _paths(keep)) >= over:
            return True
        raise CapacityError(
            f"kv_capacity {self.capacity} cannot hold one row: {self.store.tokens} tokens held by the "
            f"trees in flight, of which nothing more can be evicted, and {extra} more needed to start it; "
            "raise the capacity, or lower max_step_tokens or the problems in flight")

    def _too_small(self, row: Row) -> str:
        path = sum(s.fed for s in row.parent.path())
        return (f"kv_capacity {self.capacity} cannot hold one row: its path holds {path} tokens and its step "
                f"has reached {len(row.tokens)} of up to {row.req.sampling.max_step_tokens} tokens, with "
                f"nothing left to evict; raise the capacity, or lower max_step_tokens")

    def _evict(self, need: int, pinned: set[Segment]) -> int:
        """Evict up to `need` tokens of tree KV outside `pinned`, leaves first; segments no
        request in flight is expanding go first, newest problems first. Returns tokens freed."""
        freed = 0
        for spare_users in (False, True):
            for root in reversed(list(self.store.roots.values())):
                for seg in _post_order(root):
                    if freed >= need:
                        return freed
                    if (seg.fed and seg not in pinned and (spare_users or seg.users == 0)
                            and all(c.fed == 0 for c in seg.children.values())):
                        freed += self.store.evict(seg)
        return freed


def _paths(segs) -> set[Segment]:
    return {s for seg in segs for s in seg.path()}


def _post_order(root: Segment) -> list[Segment]:
    out, stack = [], [(root, False)]
    while stack:
        seg, seen = stack.pop()
        if seen:
            out.append(seg)
            continue
        stack.append((seg, True))
        stack.extend((c, False) for c in seg.children.values())
    return out
