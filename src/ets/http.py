"""HTTP client helpers shared by the server policy (ets.engines.server) and the served PRM
(ets.prm.served): JSON requests with bounded retries and backoff, per-server health (a server
marked down gets no more requests), request timeouts that follow the work, URL lists, and
credentials kept out of every message.

Contract of `request_with_retries`: transient failures (connection refused/reset, timeouts,
HTTP 429/5xx) are retried with exponential backoff, bounded in count, then raise ServerError
naming the URL (credentials redacted) and the fix; other HTTP errors raise at once with the
server's message; a down server raises ServerDown without being asked.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import httpx

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
FIX_HINT = ("Is the server running and reachable? Start one with `ets serve` (vLLM) or check its "
            "log, or drop this URL from --policy. Finished problems are kept in the run directory, "
            "so rerunning the same command resumes.")


class ServerError(RuntimeError):
    """A server could not answer a request (after retries, where retrying made sense).
    `hint` says what to do (the runner prints it as the fix)."""

    hint = ("a server did not answer: check that it is up (e.g. `ets serve`) and that the "
            "--policy/--prm URL is right")


class ServerDown(ServerError):
    """Every server of a policy (or the PRM's server) is marked down: nothing more is sent."""


# Per-request timeout: a floor for queueing and prefill, plus a generous per-token allowance
# (a CPU vLLM under load decodes a few tokens/s per request; a GPU one far more).
TIMEOUT_BASE_S = 120.0
TIMEOUT_PER_TOKEN_S = 1.0
HEALTH_PROBE_S = 5.0  # a hung server is one that does not answer /health within this


def request_timeout(max_tokens: int, override: float | None = None) -> float:
    """Seconds one request for `max_tokens` generated tokens may take: `override` when given,
    else TIMEOUT_BASE_S + TIMEOUT_PER_TOKEN_S * max_tokens (256 tokens: 376 s)."""
    if override is not None:
        return float(override)
    return TIMEOUT_BASE_S + TIMEOUT_PER_TOKEN_S * max(0, int(max_tokens))


def redact_url(text: str) -> str:
    """`text` with the credentials of any URL in it replaced: http://user:pw@h -> http://***@h."""
    return re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s,]+@", r"\1***@", str(text))


@dataclass(eq=False)
class Health:
    """Consecutive-failure bookkeeping of one server. `failed()` returns True once it is down."""

    url: str
    down_after: int = 3
    failures: int = 0  # consecutive connection failures
    down: bool = False
    why: str = ""

    def ok(self) -> None:
        self.failures = 0

    def failed(self, why: str, hung: bool = False) -> bool:
        self.failures += 1
        self.why = why
        if hung or self.failures >= self.down_after:
            if not self.down:
                self.down = True
                _report(f"[ets] {redact_url(self.url)} marked down: {why}"
                        + ("" if hung else f" ({self.failures} connection failures in a row)"))
        return self.down

    def error(self) -> ServerDown:
        return ServerDown(f"server {redact_url(self.url)} is down ({self.why}). {FIX_HINT}")


def _report(msg: str) -> None:
    """A line on stderr that does not tear the progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr, flush=True)


async def _probe(client: httpx.AsyncClient, base: str, timeout_s: float) -> bool:
    """Whether the server at `base` answers GET /health (any HTTP status) within timeout_s."""
    try:
        await client.get(f"{base}/health", timeout=timeout_s)
        return True
    except httpx.HTTPError:
        return False


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """'http://a:8000,http://b:8000' or a list -> base URLs without a trailing '/' or '/v1'."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = []
    for u in items:
        u = u.strip().rstrip("/")
        if u.endswith("/v1"):
            u = u[:-3]
        if u:
            out.append(u)
    if not out:
        raise ValueError("no server URL given")
    return out


async def request_with_retries(client: httpx.AsyncClient, method: str, url: str, *, json=None,
                               retries: int, backoff_s: float, max_backoff_s: float,
                               timeout_s: float, counters: dict | None = None,
                               health: Health | None = None, stall_report_s: float | None = 30.0) -> dict:
    """Send one JSON request; retry transient failures `retries` times with exponential backoff
    (backoff_s * 2**attempt, capped at max_backoff_s). Returns the decoded JSON body.

    health: the server's Health: a down server is not asked (ServerDown at once); connection
    failures count toward marking it down, any HTTP answer resets the count; a timeout followed
    by an unanswered /health probe marks it down at once (hung). stall_report_s: report on
    stderr a request still waiting after this many seconds (then every 4x as long)."""
    last = ""
    shown = redact_url(url)
    for attempt in range(retries + 1):
        if health is not None and health.down:
            raise health.error()
        try:
            r = await _watched(client.request(method, url, json=json, timeout=timeout_s), shown,
                               timeout_s, stall_report_s)
        except httpx.TransportError as e:  # refused, reset, timeouts, protocol errors
            last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if isinstance(e, httpx.TimeoutException):
                last = f"no answer within the {timeout_s:.0f} s request timeout ({type(e).__name__})"
            if health is not None:
                hung = (isinstance(e, httpx.ReadTimeout | httpx.WriteTimeout | httpx.PoolTimeout)
                        and not await _probe(client, health.url, min(HEALTH_PROBE_S, timeout_s)))
                if hung:
                    last += "; it does not answer /health either: hung"
                if health.failed(last, hung=hung):
                    raise health.error() from e
        else:
            if health is not None:
                health.ok()
            if r.status_code < 400:
                try:
                    return r.json()
                except ValueError as e:
                    raise ServerError(f"{shown} answered with invalid JSON: {r.text[:300]!r}") from e
            if r.status_code not in TRANSIENT_STATUS:
                raise ServerError(f"{shown} answered HTTP {r.status_code}: {r.text[:500]}")
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        if attempt == retries:
            break
        if counters is not None:
            counters["retries"] = counters.get("retries", 0) + 1
        await asyncio.sleep(min(max_backoff_s, backoff_s * 2 ** attempt))
    raise ServerError(f"{shown} failed after {retries + 1} tries ({last}). {FIX_HINT}")


# Requests waiting past stall_report_s, by the URL they wait on: {url: {id(task): start time}}.
# One line per URL per stall_report_s sums them up (with hundreds of requests in flight on a
# slow server, a line per request would bury everything else).
_WAITING: dict[str, dict[int, float]] = {}
_LAST_REPORT: dict[str, float] = {}


async def _watched(coro, shown_url: str, timeout_s: float, stall_report_s: float | None):
    """Await `coro`; while it waits longer than stall_report_s, it counts in its URL's line
    '[ets] waiting on URL: N requests unanswered, the longest for S s' (at most one a period)."""
    if stall_report_s is None or stall_report_s >= timeout_s:
        return await coro
    task = asyncio.ensure_future(coro)
    t0 = time.monotonic()
    waiting = _WAITING.setdefault(shown_url, {})
    try:
        done, _ = await asyncio.wait({task}, timeout=stall_report_s)
        while not done:
            waiting[id(task)] = t0
            now = time.monotonic()
            if now - _LAST_REPORT.get(shown_url, 0.0) >= stall_report_s:
                _LAST_REPORT[shown_url] = now
                _report(f"[ets] waiting on {shown_url}: {len(waiting)} request(s) unanswered, the longest for "
                        f"{now - min(waiting.values()):.0f} s (request timeout {timeout_s:.0f} s; "
                        "--request-timeout changes it)")
            done, _ = await asyncio.wait({task}, timeout=stall_report_s)
        return task.result()
    finally:
        waiting.pop(id(task), None)
        if not task.done():
            task.cancel()
