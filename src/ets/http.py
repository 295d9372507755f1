"""HTTP client helpers shared by the server policy (ets.engines.server) and the served PRM
(ets.prm.served): JSON requests with bounded retries and backoff, per-server health (a server
marked down gets no more requests), request timeouts that follow the work, URL lists, and
credentials kept out of every message.

Contract of `request_with_retries`: one try is bounded as a whole by `timeout_s` (connect, send
and the full answer: a server trickling its answer a byte at a time is cut at the deadline, not
waited for byte after byte); transient failures (connection refused/reset, deadlines, HTTP
429/5xx) are retried with exponential backoff, bounded in count, then raise ServerError naming
the URL (credentials redacted) and the fix; other HTTP errors raise at once with the server's
message; a down server raises ServerDown without being asked.

Redaction: `redact_url` is the one function that takes credentials out of text; ServerError
applies it to its own message, and `redact_obj` to whatever is written to disk (ets.runner).
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import httpx

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
FIX_HINT = ("Is the server running and reachable? Start one with `ets serve` (vLLM) or check its "
            "log, or drop this URL from --policy. Finished problems are kept in the run directory, "
            "so rerunning the same command resumes.")


class ServerError(RuntimeError):
    """A server could not answer a request (after retries, where retrying made sense), or
    answered something that cannot be used. `hint` says what to do (the runner prints it as the
    fix). The message is redacted on construction: no credentials whoever builds it."""

    hint = ("a server did not answer: check that it is up (e.g. `ets serve`) and that the "
            "--policy/--prm URL is right")

    def __init__(self, *args):
        super().__init__(*(redact_url(a) if isinstance(a, str) else a for a in args))


class BadAnswer(ServerError):
    """A server answered, but with something that cannot be used (wrong shape, ids outside the
    vocabulary, too few samples): the problem fails at once; retrying would get the same."""

    hint = ("the server's answer cannot be used: check that --policy/--prm points at a server of "
            "the right model and kind (e.g. started by `ets serve`), or restart it")


class RequestDeadline(httpx.TimeoutException):
    """One try of a request (connect, send, full answer) did not finish within its deadline."""


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


_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s,'\"]*@")


def redact_url(text: str) -> str:
    """`text` with the credentials of any URL in it replaced: http://user:pw@h -> http://***@h
    (also when the password itself holds an '@')."""
    return _CREDENTIALS.sub(r"\1***@", str(text))


def redact_obj(obj):
    """A copy of a JSON-like `obj` (dicts, lists, tuples, strings, numbers) with redact_url
    applied to every string in it, dict keys included."""
    if isinstance(obj, str):
        return redact_url(obj)
    if isinstance(obj, dict):
        return {redact_obj(k) if isinstance(k, str) else k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


def one_line(text, limit: int = 300) -> str:
    """A server's words as one short line: whitespace runs collapsed, cut at `limit` characters,
    credentials redacted."""
    t = " ".join(str(text).split())
    return redact_url(t if len(t) <= limit else t[: limit - 3] + "...")


async def within(coro, timeout_s: float):
    """Await `coro`, raising RequestDeadline when it has not finished after `timeout_s` seconds
    (the whole of it, however the time is spent)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await coro
    except TimeoutError:
        raise RequestDeadline(f"no complete answer within the {timeout_s:g} s request deadline") from None


def run_blocking(factory):
    """`factory()`'s coroutine run to its end in a private event loop, from synchronous code: in
    this thread when it runs no loop, else in a helper thread (this one waits; Ctrl-C still
    interrupts the wait)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    box: dict = {}

    def work():
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    t = threading.Thread(target=work, daemon=True, name="ets-blocking-request")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass(eq=False)
class Health:
    """Consecutive-failure bookkeeping of one server. `failed()` returns True once it is down."""

    url: str
    down_after: int = 3
    failures: int = 0  # consecutive connection failures
    down: bool = False
    why: str = ""
    busy_seen: tuple[float, bool, bool] | None = None  # (when, busy, answered /health) of the latest busy()

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


# Counters of a serving engine's /metrics that grow while it computes (prefill or decode): a
# server whose counters grow is making progress, whatever else it answers.
PROGRESS_COUNTERS = ("vllm:generation_tokens_total", "vllm:prompt_tokens_total",
                     "sglang:generation_tokens_total", "sglang:prompt_tokens_total")
BUSY_CHECK_S = 1.0  # seconds between the two /metrics reads of a progress check
BUSY_FRESH_S = 2.0  # a progress check this recent answers for every request of its server


async def _progress(client: httpx.AsyncClient, base: str, timeout_s: float) -> float | None:
    """The sum of the server's PROGRESS_COUNTERS now (None: no /metrics page with them)."""
    from ets.engines.server_metrics import parse_prometheus

    try:
        r = await within(client.get(f"{base}/metrics", timeout=timeout_s), timeout_s)
    except httpx.HTTPError:
        return None
    if r.status_code >= 400:
        return None
    vals = [x.value for x in parse_prometheus(r.text) if x.name in PROGRESS_COUNTERS]
    return sum(vals) if vals else None


async def busy(client: httpx.AsyncClient, health: Health, timeout_s: float) -> bool:
    """Whether the server is alive and making progress: it answers /health, and a /metrics
    token counter grows over BUSY_CHECK_S. Such a server has a queue, not a fault: a request
    waiting on it is waited for, not sent again. One check a BUSY_FRESH_S per server serves all
    of its requests."""
    now = time.monotonic()
    if health.busy_seen is not None and now - health.busy_seen[0] < BUSY_FRESH_S:
        return health.busy_seen[1]
    probe_s = min(HEALTH_PROBE_S, timeout_s)
    answer = False
    alive = await _probe(client, health.url, probe_s)
    if alive:
        before = await _progress(client, health.url, probe_s)
        if before is not None:
            await asyncio.sleep(BUSY_CHECK_S)
            after = await _progress(client, health.url, probe_s)
            answer = after is not None and after > before
    health.busy_seen = (time.monotonic(), answer, alive)
    return answer


async def _deadline(coro, timeout_s: float, still_busy=None, max_waits: int = 0, on_wait=None):
    """Await `coro` with a deadline of `timeout_s`; at the deadline, while `still_busy()` says
    the server is making progress (at most `max_waits` times), grant another `timeout_s`
    (`on_wait()` is told) instead of giving up; then RequestDeadline."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nothing left unretrieved
    try:
        waits = 0
        while True:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if done:
                return task.result()
            if waits < max_waits and still_busy is not None:
                progressing = await still_busy()
                if task.done():  # the answer came while the server was asked
                    return task.result()
                if progressing:
                    waits += 1
                    if on_wait is not None:
                        on_wait()
                    continue
            raise RequestDeadline(f"no complete answer within the {timeout_s:g} s request deadline")
    finally:
        if not task.done():
            task.cancel()


async def _probe(client: httpx.AsyncClient, base: str, timeout_s: float) -> bool:
    """Whether the server at `base` answers GET /health (any HTTP status) within timeout_s."""
    try:
        await within(client.get(f"{base}/health", timeout=timeout_s), timeout_s)
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

    timeout_s: the deadline of one try as a whole (connect, send, the full answer), not of each
    wait between bytes; with `health`, a try at its deadline on a server that is alive and
    making progress (see `busy`) is granted another timeout_s instead (at most `retries` times,
    counted in counters["busy_waits"]): a queue is waited for, a retry is for a server that
    failed or stopped progressing. health: the server's Health: a down server is not asked (ServerDown at
    once); connection failures and missed deadlines count toward marking it down, any HTTP
    answer resets the count; a missed deadline followed by an unanswered /health probe marks it
    down at once (hung). stall_report_s: report on stderr a request still waiting after this
    many seconds (then every 4x as long). counters: "retries" counts the tries sent again, and
    "retries_<why>" each reason's share (deadline, connection, http_<status>)."""
    last = ""
    shown = redact_url(url)
    still_busy = None if health is None else (lambda: busy(client, health, timeout_s))

    def waited():
        if counters is not None:
            counters["busy_waits"] = counters.get("busy_waits", 0) + 1

    for attempt in range(retries + 1):
        if health is not None and health.down:
            raise health.error()
        try:
            # httpx bounds the connect; the whole try is bounded by _deadline (which may grant a
            # busy server more time, so httpx must not cut the wait for the answer on its own)
            phases = httpx.Timeout(timeout_s, read=None, write=None, pool=None)
            r = await _watched(_deadline(client.request(method, url, json=json, timeout=phases), timeout_s,
                                         still_busy, retries, waited), shown, timeout_s, stall_report_s)
        except httpx.TransportError as e:  # refused, reset, deadlines, protocol errors
            last = one_line(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, 200)
            reason = "connection"
            if isinstance(e, httpx.TimeoutException):
                last = f"no complete answer within the {timeout_s:g} s request timeout ({type(e).__name__})"
                reason = "deadline"
            if health is not None:
                seen = health.busy_seen  # the progress check at the deadline probed /health already
                if isinstance(e, RequestDeadline) and seen is not None and time.monotonic() - seen[0] < BUSY_FRESH_S:
                    hung = not seen[2]
                else:
                    hung = (isinstance(e, httpx.ReadTimeout | httpx.WriteTimeout | httpx.PoolTimeout | RequestDeadline)
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
                    raise BadAnswer(f"{shown} answered with invalid JSON: {one_line(repr(r.text[:300]))}") from e
            if r.status_code not in TRANSIENT_STATUS:
                raise ServerError(f"{shown} answered HTTP {r.status_code}: {one_line(r.text, 500)}")
            last = f"HTTP {r.status_code}: {one_line(r.text, 200)}"
            reason = f"http_{r.status_code}"
        if attempt == retries:
            break
        if counters is not None:
            counters["retries"] = counters.get("retries", 0) + 1
            key = f"retries_{reason}"
            counters[key] = counters.get(key, 0) + 1
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
