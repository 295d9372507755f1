"""What a serving engine says about its KV cache, read from its Prometheus `/metrics` page.

Assumed metric names (checked against vLLM 0.32; SGLang's taken from its documentation, tested
here only against a stand-in):

vLLM (one sample per engine, label `engine`; data-parallel engines behind one URL are summed):
  vllm:prefix_cache_hits_total     counter, prompt tokens served from the prefix cache
  vllm:prefix_cache_queries_total  counter, prompt tokens looked up in the prefix cache
  vllm:kv_cache_usage_perc         gauge in [0, 1], share of KV blocks held by running requests
                                   (cached-but-free blocks are not counted: they are evictable)
  vllm:cache_config_info           info gauge; labels num_gpu_blocks and block_size give capacity
  vllm:num_requests_running        gauge, sequences in the running batch
  vllm:num_requests_waiting        gauge, sequences queued (no room in the batch or the KV cache)
  vllm:num_preemptions_total       counter, running sequences evicted for want of KV blocks
SGLang (started with --enable-metrics):
  sglang:cached_tokens_total / sglang:prompt_tokens_total   counters (hits / queries), if exported
  sglang:cache_hit_rate            gauge, used only when the counters are absent
  sglang:num_used_tokens           gauge, KV tokens in use
  sglang:token_usage               gauge in [0, 1]; with sglang:max_total_num_tokens when
                                   num_used_tokens is absent
  sglang:num_running_reqs / sglang:num_queue_reqs   gauges, running and queued requests

A missing metric reads as None, never as 0: a figure that was not measured is not reported.
The figures are advisory: a sample whose value is NaN or infinite (legal in the text format), a
page that is not a metrics page at all, or a read that fails drops the figures it would have
given (said once per server on stderr) and never fails a search.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

VLLM, SGLANG = "vllm", "sglang"

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


def parse_prometheus(text: str, dropped: list | None = None) -> list[Sample]:
    """Samples of a Prometheus text exposition (comments and malformed lines skipped). Samples
    whose value is NaN or infinite are left out; their names are appended to `dropped`."""
    out = []
    if not isinstance(text, str):
        return out
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        if not math.isfinite(value):
            if dropped is not None:
                dropped.append(m.group(1))
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        out.append(Sample(m.group(1), labels, value))
    return out


@dataclass(frozen=True)
class Snapshot:
    """One reading of a server's cache state."""

    prefix_hits: float | None  # cumulative prompt tokens found in the prefix cache
    prefix_queries: float | None  # cumulative prompt tokens looked up
    kv_used_tokens: float | None  # KV tokens held by running requests now
    kv_capacity_tokens: float | None  # KV tokens the cache can hold
    hit_rate_gauge: float | None = None  # SGLang's own rate, when it has no counters
    running: float | None = None  # sequences running now
    waiting: float | None = None  # sequences queued now
    preemptions: float | None = None  # cumulative preemptions (vLLM)


def _sum(samples: list[Sample], name: str) -> float | None:
    vals = [s.value for s in samples if s.name == name]
    total = sum(vals) if vals else None
    return total if total is None or math.isfinite(total) else None


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def snapshot(text: str, flavour: str = VLLM, dropped: list | None = None) -> Snapshot:
    """The figures of one /metrics page; `dropped` (a list) collects the names of samples left
    out for a non-finite value."""
    samples = parse_prometheus(text, dropped)
    if flavour == SGLANG:
        used = _sum(samples, "sglang:num_used_tokens")
        cap = _sum(samples, "sglang:max_total_num_tokens")
        usage = _sum(samples, "sglang:token_usage")
        if used is None and usage is not None and cap is not None:
            used = usage * cap
        return Snapshot(_sum(samples, "sglang:cached_tokens_total"),
                        _sum(samples, "sglang:prompt_tokens_total"), used, cap,
                        _sum(samples, "sglang:cache_hit_rate"), _sum(samples, "sglang:num_running_reqs"),
                        _sum(samples, "sglang:num_queue_reqs"))
    # vLLM: capacity per engine from cache_config_info; usage is a fraction of that engine's.
    caps = {}
    for s in samples:
        if s.name == "vllm:cache_config_info":
            try:
                cap = float(s.labels["num_gpu_blocks"]) * float(s.labels["block_size"])
            except (KeyError, ValueError):
                continue
            if _finite(cap) and cap >= 0:
                caps[s.labels.get("engine")] = cap
            elif dropped is not None:
                dropped.append("vllm:cache_config_info")
    used = None
    for s in samples:
        if s.name == "vllm:kv_cache_usage_perc":
            cap = caps.get(s.labels.get("engine"), next(iter(caps.values()), None))
            if cap is not None and math.isfinite((used or 0.0) + s.value * cap):
                used = (used or 0.0) + s.value * cap
    return Snapshot(_sum(samples, "vllm:prefix_cache_hits_total"),
                    _sum(samples, "vllm:prefix_cache_queries_total"), used,
                    sum(caps.values()) if caps and math.isfinite(sum(caps.values())) else None, None, _sum(samples, "vllm:num_requests_running"),
                    _sum(samples, "vllm:num_requests_waiting"), _sum(samples, "vllm:num_preemptions_total"))


def _int(x) -> int | None:
    """A figure as an integer; None when unknown or not finite."""
    return int(round(x)) if isinstance(x, (int, float)) and math.isfinite(x) else None


def delta(before: Snapshot | None, after: Snapshot | None) -> dict:
    """Prefix-cache figures between two readings: hits, queries, hit rate (None if unknown)."""
    out = {"prefix_hits": None, "prefix_queries": None, "prefix_hit_rate": None}
    if before is None or after is None:
        return out
    if None not in (before.prefix_hits, after.prefix_hits, before.prefix_queries, after.prefix_queries):
        hits = after.prefix_hits - before.prefix_hits
        queries = after.prefix_queries - before.prefix_queries
        out.update(prefix_hits=_int(hits), prefix_queries=_int(queries),
                   prefix_hit_rate=(hits / queries) if queries > 0 else None)
    elif after.hit_rate_gauge is not None:
        out["prefix_hit_rate"] = after.hit_rate_gauge
    return out


class Window:
    """Readings taken while one expand ran on a server: the counters before, the KV peak."""

    def __init__(self, before: Snapshot | None):
        self.before = before
        self.kv_peak: float | None = None
        self.samples = 0

    def add(self, snap: Snapshot) -> None:
        self.samples += 1
        if snap.kv_used_tokens is not None:
            self.kv_peak = max(self.kv_peak or 0.0, snap.kv_used_tokens)


class Monitor:
    """Samples one server's `/metrics` every `interval_s` while at least one window is open.

    `fetch(url) -> text` is the caller's HTTP GET. Metrics are advisory: a failed read is counted
    in `errors` and leaves the figures None; it never fails a search."""

    def __init__(self, metrics_url: str, flavour: str, interval_s: float, fetch):
        self.url, self.flavour, self.interval_s, self.fetch = metrics_url, flavour, interval_s, fetch
        self.windows: set[Window] = set()
        self.errors = 0
        self.dropped = 0  # samples left out for a non-finite value
        self.last_error: str | None = None
        self.first: Snapshot | None = None  # first reading ever: run totals are measured from it
        self.last: Snapshot | None = None
        self.kv_peak: float | None = None  # over the whole run
        # load, summed over the readings that had it: mean = sum / load_samples
        self.running_sum = self.waiting_sum = 0.0
        self.load_samples = 0
        self._task = None
        self._said: set[str] = set()  # what has been reported on stderr (once each)

    def _say_once(self, kind: str, what: str) -> None:
        """One line on stderr about this server's page, the first time anything is wrong with it
        (what goes wrong later is counted in `errors` / `dropped`, not said again)."""
        if self._said:
            return
        self._said.add(kind)
        from ets.http import _report, redact_url

        _report(f"[ets] {redact_url(self.url)}: {redact_url(what)}; the KV and prefix-cache figures it would "
                "give are left out (advisory only: the search goes on). Said once.")

    async def read(self) -> Snapshot | None:
        dropped: list[str] = []
        try:
            snap = snapshot(await self.fetch(self.url), self.flavour, dropped)
        except Exception as e:  # noqa: BLE001 - advisory figures only, see the class docstring
            from ets.http import one_line

            self.errors += 1
            self.last_error = one_line(f"{type(e).__name__}: {e}", 200)
            self._say_once("read", f"reading it failed ({self.last_error})")
            return None
        if dropped:
            self.dropped += len(dropped)
            self._say_once("nonfinite", f"non-finite values (NaN/Inf) for {', '.join(sorted(set(dropped))[:4])}")
        if all(getattr(snap, f) is None for f in ("prefix_hits", "kv_used_tokens", "kv_capacity_tokens",
                                                   "hit_rate_gauge", "running")):
            self._say_once("empty", f"no {self.flavour} figure this client reads is on the page")
        if self.first is None:
            self.first = snap
        self.last = snap
        if snap.kv_used_tokens is not None:
            self.kv_peak = max(self.kv_peak or 0.0, snap.kv_used_tokens)
        if snap.running is not None:
            self.load_samples += 1
            self.running_sum += snap.running
            self.waiting_sum += snap.waiting or 0.0
        for w in self.windows:
            w.add(snap)
        return snap

    async def _poll(self) -> None:
        import asyncio

        while self.windows:
            await self.read()
            await asyncio.sleep(self.interval_s)

    async def open(self) -> Window:
        import asyncio

        window = Window(await self.read())
        self.windows.add(window)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
        return window

    async def close(self, window: Window) -> dict:
        after = await self.read()  # also lands in `window` (still open): the end state counts
        self.windows.discard(window)
        try:
            out = delta(window.before, after)
            out["kv_tokens_peak"] = _int(window.kv_peak)
            out["kv_capacity_tokens"] = None if after is None else _int(after.kv_capacity_tokens)
        except Exception as e:  # noqa: BLE001 - advisory figures never fail a search
            self._say_once("figures", f"its figures could not be combined ({type(e).__name__}: {e})")
            out = {"prefix_hits": None, "prefix_queries": None, "prefix_hit_rate": None,
                   "kv_tokens_peak": None, "kv_capacity_tokens": None}
        out["metrics_samples"] = window.samples
        return out

    async def stop(self) -> None:
        self.windows.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001 - cancelled on purpose
                pass
            self._task = None

    def totals(self) -> dict:
        """Run figures: prefix-cache delta since the first reading, KV peak over all readings,
        preemptions since the first reading (None if unknown), and the running / waiting
        sequences summed over the `load_samples` readings that had them (readings are taken
        while a request is out, every interval_s)."""
        try:
            out = delta(self.first, self.last)
        except Exception:  # noqa: BLE001 - advisory
            out = {"prefix_hits": None, "prefix_queries": None, "prefix_hit_rate": None}
        out["kv_tokens_peak"] = _int(self.kv_peak)
        out["metrics_errors"] = self.errors
        out["metrics_dropped"] = self.dropped
        first, last = self.first, self.last
        out["preemptions"] = None if first is None or last is None or None in (first.preemptions, last.preemptions) \
            else _int(last.preemptions - first.preemptions)
        out.update(running_sum=self.running_sum, waiting_sum=self.waiting_sum, load_samples=self.load_samples)
        return out
