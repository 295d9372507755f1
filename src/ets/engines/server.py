"""ServerPolicy: grow the tree through OpenAI-compatible serving engines (vLLM, SGLang).

Contract (on top of `Policy`'s):
- Prompts travel as TOKEN IDS: a node's request carries exactly `node.path_token_ids()`, so the
  server's prefix cache sees the very sharing the tree has (siblings share their parent's ids).
- One HTTP request per expanded node asks for all its `n` children (`n`), each stopping at the
  step delimiter, which stays in the step. The step's token ids and log-probabilities come back
  from the server; its text is the local tokenizer's decoding of those ids (special tokens
  skipped, as the embedded engine does), so text and ids agree even where the server's stop
  logic cut the text inside a token; without a loaded tokenizer, the server's text.
- Finish reasons map to Step.stop_reason: the delimiter -> "delimiter", EOS/stop token -> "eos",
  the max_step_tokens cap -> "length".
- `format_prompt` applies the model's chat template locally (transformers tokenizer from a
  local folder), so prompt ids match what the server would have made of the same chat.
- Routing: all requests of one problem (one root node) go to the same server, chosen when the
  problem first expands as the server with the fewest problems in flight (a problem leaves its
  server when every open node of its tree has been released, or when its tree is dropped).
- Transient failures (connection refused/reset, timeouts, HTTP 429/5xx) are retried with
  exponential backoff, bounded in count; then the problem fails with a ServerError naming the
  URL and the fix. Other HTTP errors fail at once with the server's message.
- Timeouts follow the work: a request for `max_step_tokens` tokens may take
  `request_timeout(max_step_tokens)` seconds (or `timeout_s` when given: `--request-timeout`),
  as a whole: connect, send and the full answer (ets.http.within). A request still waiting
  after `stall_report_s` is reported on stderr (server, seconds waited).
- The served model's name (`model=None`) is asked from GET /v1/models once per server per run,
  with the same deadline (`request_timeout(0)`), retries and health bookkeeping as every other
  request; its answer, or its failure, is kept for the rest of the run (problems behind a hung
  lookup do not each wait for their own).
- Answers are checked before use: a list of choices with the samples asked for, each with
  integer token ids in [0, vocabulary size) (the local tokenizer's, when one is loaded); anything
  else fails the problem with BadAnswer naming the server and what was wrong.
- Health: `down_after` consecutive connection failures (refused, reset, dropped mid-answer), or
  one timeout after which the server does not answer GET /health within a few seconds (hung),
  mark a server down for the rest of the run: no request goes to it again. A problem on a down
  server moves to a live one (its whole expand is asked again there); with no live server left
  every request fails at once with ServerDown, so a run fails fast with one message and keeps
  everything finished.
- While an expand runs, the server's /metrics is sampled (server_metrics.Monitor); `observe(root)`
  returns that expand's measured KV peak and prefix-cache delta. These are server-wide figures:
  with several problems in flight on one server they cover all of them (`problems_on_server`
  says how many there were).
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import httpx

from ets.engines.sampling import SamplingConfig
# the HTTP layer is shared with the served PRM; its public names stay importable from here
from ets.http import (FIX_HINT, BadAnswer, Health, ServerDown, ServerError, _report, redact_url,  # noqa: F401
                      one_line, request_timeout, request_with_retries, run_blocking, split_urls, within)
from ets.engines.base import DELIMITER, EOS, LENGTH, Expansion, Policy, Step, node_seed
from ets.engines.server_metrics import SGLANG, VLLM, Monitor
from ets.tree import Node

FLAVOURS = (VLLM, SGLANG)


@dataclass(eq=False)
class _Server:
    url: str
    problems: int = 0  # problems routed here and not finished
    health: Health | None = None  # down: no request goes there again in this run
    model: str | None = None
    root: str | None = None  # what /v1/models gives as the model's root (vLLM: the weights it loaded)
    model_error: ServerError | None = None  # the /v1/models lookup failed: kept for the run
    monitor: Monitor | None = None
    counters: dict = field(default_factory=lambda: {"requests": 0, "retries": 0, "failures": 0,
                                                    "prompt_tokens": 0, "completion_tokens": 0,
                                                    "cached_tokens": 0, "problems": 0})

    @property
    def down(self) -> bool:
        return self.health is not None and self.health.down


@dataclass(eq=False)
class _Problem:
    server: _Server
    open: int = 1  # nodes that may still be expanded: the root to begin with
    released: set = field(default_factory=set)
    done: bool = False


class ServerPolicy(Policy):
    name = "server"

    def __init__(self, urls: str | Sequence[str], model: str | None = None,
                 tokenizer_path: str | Path | None = None, max_concurrency: int = 256,
                 timeout_s: float | None = None, retries: int = 4, backoff_s: float = 0.5,
                 max_backoff_s: float = 8.0, flavour: str = VLLM, measure: bool = True,
                 metrics_interval_s: float = 0.1, system_prompt: str | None = None,
                 seed: int | None = 0, prefill_first: bool = True, down_after: int = 3, stall_report_s: float | None = 30.0):
        """urls: one base URL, a comma-separated string, or a list (one per server).
        model: the name the servers serve (None: asked from /v1/models, per server).
        tokenizer_path: local folder of the model's tokenizer (None: `model` when it is a local
        folder, as it is for a server started by `ets serve`).
        max_concurrency: HTTP requests in flight per server (`--max-requests`): a best-of-N node asks
        for one sequence, so below the server's batch (vLLM CPU: 128 sequences) it caps the batch
        (64 did: best-of-16 with 32 problems in flight ran 63 sequences on the 2-core server).
        timeout_s: per request (None: scaled by the tokens asked for, see request_timeout). down_after: consecutive connection
        failures that mark a server down. stall_report_s: report requests waiting this long.
        retries/backoff_s/max_backoff_s: transient-failure policy (see request_with_retries).
        measure: sample /metrics during each expand (metrics_interval_s apart).
        system_prompt: a system turn before the question (None: the template's own default).
        seed: the run's seed; each request carries `node_seed(seed, node's path)` so a node's
        children are the same samples whoever asks (None: unseeded requests).
        prefill_first: before a root's n > 1 children (vLLM), one 1-token request computes the
        prompt's KV so the children share it through the prefix cache (see _prefill)."""
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
        if (max_concurrency < 1 or retries < 0 or (timeout_s is not None and not timeout_s > 0)
                or metrics_interval_s <= 0 or down_after < 1):
            raise ValueError("max_concurrency >= 1, retries >= 0, timeout_s > 0, metrics_interval_s > 0, "
                             "down_after >= 1")
        self.flavour, self.model, self.tokenizer_path = flavour, model, tokenizer_path
        self.max_concurrency, self.timeout_s, self.retries = max_concurrency, timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.measure, self.metrics_interval_s = measure, metrics_interval_s
        self.system_prompt = system_prompt
        self.seed = seed
        self.prefill_first = prefill_first
        self.down_after, self.stall_report_s = down_after, stall_report_s
        self.servers = [_Server(u, health=Health(u, down_after)) for u in split_urls(urls)]
        self.name = f"server:{flavour}"
        self._tok = None
        self._problems: weakref.WeakKeyDictionary[Node, _Problem] = weakref.WeakKeyDictionary()
        self._obs: weakref.WeakKeyDictionary[Node, dict] = weakref.WeakKeyDictionary()
        self._loop = None  # the event loop the client and semaphores belong to
        self._client: httpx.AsyncClient | None = None
        self._sems: dict[str, asyncio.Semaphore] = {}

    # ---- prompt -------------------------------------------------------------------------

    def _tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            path = self.tokenizer_path
            if path is None:
                model = self.model or self._model_name_sync(self.servers[0])
                if not Path(model).is_dir():
                    raise ValueError(f"the server serves {model!r}, which is not a local folder: pass "
                                     "tokenizer_path= (a folder with that model's tokenizer)")
                path = model
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.eos_token_id = self._tok.eos_token_id
        return self._tok

    def format_prompt(self, question: str) -> tuple[list[int], str]:
        """Same rule as the embedded engine: the chat template with the question as the user
        turn (after `system_prompt` if given); a model without a template gets plain text."""
        tok = self._tokenizer()
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": question}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = question if self.system_prompt is None else f"{self.system_prompt}\n\n{question}"
            text += "\n"
        # The template already holds any BOS it wants: add no special tokens a second time.
        return list(tok(text, add_special_tokens=False)["input_ids"]), text

    def model_identity(self) -> dict:
        """What names a run made with this policy (ets.runner.RunConfig.identity): the model, not
        where it is served. The first server's model id and root (from /v1/models), and a hash
        of the tokenizer's vocabulary and chat template (what turns a question into token ids)
        and of the system prompt. The same model on another port gives the same identity; another
        model on the same URL does not. Every server of a policy must serve the same model."""
        import hashlib
        import json

        names = {self._model_name_sync(s) for s in self.servers}
        if len(names) > 1:
            raise ValueError(f"the --policy servers serve different models ({sorted(names)}): one policy, one model")
        try:
            tok = self._tokenizer()
        except (ValueError, OSError):  # no local tokenizer: format_prompt will say so; the id still names it
            digest = None
        else:
            vocab = sorted(tok.get_vocab().items())
            digest = hashlib.sha256(json.dumps([vocab, getattr(tok, "chat_template", None) or "",
                                                self.system_prompt]).encode()).hexdigest()[:16]
        server = self.servers[0]
        return {"served": Path(names.pop().rstrip("/")).name, "root": Path(str(server.root or "").rstrip("/")).name or None,
                "tokenizer": digest}

    def _model_name_sync(self, server: _Server) -> str:
        """The served model's name from synchronous code (the tokenizer, a learned PRM's check):
        the same lookup as `_model_name`, sharing its cache, run to its end on a private loop."""
        if self.model is not None:
            return self.model
        if server.model is None and server.model_error is None:
            async def go():
                async with httpx.AsyncClient() as client:
                    return await self._lookup(server, client)
            try:
                run_blocking(go)
            except ServerError:
                pass  # kept in server.model_error (a ServerDown: the server's health says so)
        return self._model_or_raise(server)

    async def _lookup(self, server: _Server, client: httpx.AsyncClient) -> None:
        """GET /v1/models once: server.model, or server.model_error (kept for the run)."""
        try:
            body = await request_with_retries(
                client, "GET", f"{server.url}/v1/models", retries=self.retries, backoff_s=self.backoff_s,
                max_backoff_s=self.max_backoff_s, timeout_s=request_timeout(0, self.timeout_s),
                counters=server.counters, health=server.health, stall_report_s=self.stall_report_s)
        except ServerDown:
            raise  # the health says so for the rest of the run; problems move to a live server
        except ServerError as e:
            server.model_error = e
            raise
        try:
            name = body["data"][0]["id"]
            if not isinstance(name, str) or not name:
                raise TypeError("not a name")
        except (KeyError, IndexError, TypeError) as e:
            server.model_error = BadAnswer(
                f"{server.url}/v1/models did not name a model ({one_line(body, 200)}): is it an "
                "OpenAI-compatible server (vLLM)? Or pass the model's name explicitly")
            raise server.model_error from e
        server.model = name
        root = body["data"][0].get("root")
        server.root = root if isinstance(root, str) else None

    def _model_or_raise(self, server: _Server) -> str:
        if server.model is not None:
            return server.model
        if server.down:
            raise server.health.error()
        err = server.model_error or ServerError(f"{server.url}/v1/models gave no model name")
        copy = type(err)(str(err))  # each problem gets its own exception (and traceback)
        copy.hint = err.hint
        raise copy

    # ---- event-loop bound resources ---------------------------------------------------------

    def _bind_loop(self) -> None:
        """httpx clients, semaphores and monitors belong to one event loop; a new loop (e.g. a
        second asyncio.run) gets fresh ones."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        self._loop = loop
        self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None))
        self._sems = {s.url: asyncio.Semaphore(self.max_concurrency) for s in self.servers}
        self._lookups = {s.url: asyncio.Lock() for s in self.servers}
        for s in self.servers:
            if self.measure:
                s.monitor = Monitor(f"{s.url}/metrics", self.flavour, self.metrics_interval_s, self._get_text)

    async def _get_text(self, url: str) -> str:
        timeout = min(10.0, self.timeout_s or 10.0)
        r = await within(self._client.get(url, timeout=timeout), timeout)
        r.raise_for_status()
        return r.text

    async def _request(self, server: _Server, method: str, path: str, payload=None,
                       max_tokens: int = 0) -> dict:
        async with self._sems[server.url]:
            server.counters["requests"] += 1
            return await request_with_retries(
                self._client, method, f"{server.url}{path}", json=payload, retries=self.retries,
                backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s,
                timeout_s=request_timeout(max_tokens, self.timeout_s), counters=server.counters,
                health=server.health, stall_report_s=self.stall_report_s)

    async def _model_name(self, server: _Server) -> str | None:
        """The model `server` serves (vLLM: asked once per server per run, see _lookup)."""
        if self.model is not None:
            return self.model
        if self.flavour != VLLM:
            return server.model
        if server.model is None and server.model_error is None:
            async with self._lookups[server.url]:  # one lookup at a time: the others wait for its answer
                if server.model is None and server.model_error is None and not server.down:
                    async with self._sems[server.url]:
                        server.counters["requests"] += 1
                        try:
                            await self._lookup(server, self._client)
                        except ServerError:
                            pass  # kept in server.model_error, or the server is down
        return self._model_or_raise(server)

    # ---- routing ------------------------------------------------------------------------

    def _pick(self) -> _Server:
        """The live server with the fewest problems in flight (ties: the first listed);
        ServerDown when every server is down."""
        live = [s for s in self.servers if not s.down]
        if not live:
            raise ServerDown("every policy server is down: " + "; ".join(
                f"{redact_url(s.url)} ({s.health.why})" for s in self.servers) + f". {FIX_HINT}")
        return min(live, key=lambda s: s.problems)

    def _problem(self, root: Node) -> _Problem:
        prob = self._problems.get(root)
        if prob is None:
            server = self._pick()
            server.problems += 1
            server.counters["problems"] += 1
            prob = _Problem(server)
            self._problems[root] = prob
            weakref.finalize(root, self._finish, prob)  # a dropped tree frees its slot
        return prob

    @staticmethod
    def _finish(prob: _Problem) -> None:
        if not prob.done:
            prob.done = True
            prob.server.problems -= 1

    def release(self, nodes: Iterable[Node]) -> None:
        """Bookkeeping only (the server frees KV itself): a problem whose open nodes are all
        released has finished and no longer counts against its server."""
        for node in nodes:
            root = node
            while root.parent is not None:
                root = root.parent
            prob = self._problems.get(root)
            if prob is None or prob.done or node.id in prob.released:
                continue
            prob.released.add(node.id)
            prob.open -= 1
            if prob.open <= 0:
                self._finish(prob)

    # ---- expand -------------------------------------------------------------------------

    async def expand(self, requests: Sequence[Expansion], sampling: SamplingConfig) -> list[list[Step]]:
        self._bind_loop()
        by_root: dict[Node, list[int]] = {}
        for i, req in enumerate(requests):
            root = req.node
            while root.parent is not None:
                root = root.parent
            by_root.setdefault(root, []).append(i)
        out: list[list[Step] | None] = [None] * len(requests)

        async def one_problem(root: Node, idx: list[int]) -> None:
            prob = self._problem(root)
            prob.open += sum(requests[i].n for i in idx) - len({id(requests[i].node) for i in idx})
            steps = await self._expand_problem(prob, root, [requests[i] for i in idx], sampling)
            for i, s in zip(idx, steps):
                out[i] = s

        results = await asyncio.gather(*(one_problem(r, idx) for r, idx in by_root.items()),
                                       return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res
        return out  # type: ignore[return-value]

    async def _expand_problem(self, prob: _Problem, root: Node, reqs: list[Expansion],
                              sampling: SamplingConfig) -> list[list[Step]]:
        """Expand on the problem's server; when that server goes down, move the problem to a
        live one and ask again there (ServerDown once none is left)."""
        while True:
            try:
                return await self._expand_on(prob, root, reqs, sampling)
            except ServerDown:
                if not prob.server.down:
                    raise
                try:
                    new = self._pick()
                except ServerDown:
                    self._finish(prob)
                    raise
                _report(f"[ets] moving a problem from {redact_url(prob.server.url)} to {redact_url(new.url)}")
                if not prob.done:
                    prob.server.problems -= 1
                    new.problems += 1
                new.counters["problems"] += 1
                prob.server = new

    async def _expand_on(self, prob: _Problem, root: Node, reqs: list[Expansion],
                         sampling: SamplingConfig) -> list[list[Step]]:
        server = prob.server
        window = await server.monitor.open() if server.monitor else None
        try:
            # wait for every request (none is left running unobserved), then raise the first error
            steps = await asyncio.gather(*(self._sample(server, r.node, r.n, sampling) for r in reqs),
                                         return_exceptions=True)
            for res in steps:
                if isinstance(res, BaseException):
                    raise res
        except ServerDown:
            raise
        except ServerError:
            server.counters["failures"] += 1
            self._finish(prob)  # this problem fails; the server slot is free again
            raise
        finally:
            obs = await server.monitor.close(window) if window is not None else {}
        obs.update(server=redact_url(server.url), problems_on_server=server.problems, requests=len(reqs))
        self._obs[root] = obs
        return list(steps)

    async def _sample(self, server: _Server, node: Node, n: int, sampling: SamplingConfig) -> list[Step]:
        ids = node.path_token_ids()
        model = await self._model_name(server)
        seed = None if self.seed is None else node_seed(self.seed, ids)
        if self.flavour == VLLM:
            if self.prefill_first and n > 1 and node.parent is None:
                await self._prefill(server, ids, model)
            payload = {"prompt": ids, "n": n, "max_tokens": sampling.max_step_tokens,
                       "temperature": sampling.temperature, "top_p": sampling.top_p,
                       "stop": [sampling.step_delimiter], "include_stop_str_in_output": True,
                       "logprobs": 0, "return_token_ids": True}
            if seed is not None:  # vLLM seeds child i with seed + i
                payload["seed"] = seed
            if model is not None:
                payload["model"] = model
            body = await self._request(server, "POST", "/v1/completions", payload, sampling.max_step_tokens)
            steps = self._parse_vllm(server, body, sampling)
        else:
            payload = {"input_ids": ids, "return_logprob": True,
                       "sampling_params": {"n": n, "max_new_tokens": sampling.max_step_tokens,
                                           "temperature": sampling.temperature, "top_p": sampling.top_p,
                                           "stop": [sampling.step_delimiter], "no_stop_trim": True,
                                           **({"sampling_seed": seed} if seed is not None else {})}}
            body = await self._request(server, "POST", "/generate", payload, sampling.max_step_tokens)
            steps = self._parse_sglang(server, body, sampling, len(ids))
        if len(steps) != n:
            raise BadAnswer(f"{server.url} returned {len(steps)} samples for a node, asked for {n}: is it a "
                            "vLLM/SGLang server honouring `n`? (restart it, or drop it from --policy)")
        return steps

    async def _prefill(self, server: _Server, ids: list[int], model: str | None) -> None:
        """Compute the prompt's KV once (one greedy token), so the n children that follow find it
        in the prefix cache: vLLM schedules a request's n children together, before any of them
        has cached the prompt, and would compute it n times (seen: 16x the prompt per problem)."""
        payload = {"prompt": ids, "n": 1, "max_tokens": 1, "temperature": 0.0}
        if model is not None:
            payload["model"] = model
        body = await self._request(server, "POST", "/v1/completions", payload, 1)
        usage = body.get("usage") or {}
        server.counters["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
        server.counters["prefill_requests"] = server.counters.get("prefill_requests", 0) + 1

    def _vocab(self) -> int | None:
        """Token ids the local tokenizer knows (None: no tokenizer loaded, no upper check)."""
        tok = self._tok
        if tok is None:
            return None
        try:
            return max(len(tok), int(getattr(tok, "vocab_size", 0) or 0))
        except TypeError:
            return None

    def _token_ids(self, server: _Server, ids, k: int) -> tuple[int, ...]:
        """A sample's token ids, checked: integers in [0, vocabulary size)."""
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise BadAnswer(f"{server.url} returned token ids that are not a list of integers (sample {k}: "
                            f"{one_line(ids, 80)}): is it a vLLM/SGLang server? Point --policy at one")
        vocab = self._vocab()
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            where = f"[0, {vocab})" if vocab is not None else "[0, vocabulary size)"
            raise BadAnswer(f"{server.url} returned token id {bad[0]} in sample {k}, outside the vocabulary "
                            f"{where}: the server runs another model than this tokenizer's, or is broken; "
                            "point --policy at a server of the same model (or restart it)")
        return tuple(ids)

    @staticmethod
    def _count(x) -> int:
        """A usage figure from a server: a non-negative integer, else 0 (advisory)."""
        return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 else 0

    def _parse_vllm(self, server: _Server, body: dict, sampling: SamplingConfig) -> list[Step]:
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise BadAnswer(f"{server.url}/v1/completions answered without a list of choices "
                            f"({one_line(body, 200)}): is it a vLLM (OpenAI-compatible) server?")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        server.counters["prompt_tokens"] += self._count(usage.get("prompt_tokens"))
        server.counters["completion_tokens"] += self._count(usage.get("completion_tokens"))
        steps = []
        index = lambda c: c["index"] if isinstance(c.get("index"), int) else 0  # noqa: E731
        for k, c in enumerate(sorted(choices, key=index)):
            ids = c.get("token_ids")
            if ids is None:
                raise BadAnswer(f"{server.url} returned no token ids: it needs a vLLM with "
                                "`return_token_ids` (0.10 or later)")
            ids = self._token_ids(server, ids, k)
            fr, sr = c.get("finish_reason"), c.get("stop_reason")
            if fr == "length":
                reason = LENGTH
            elif fr == "stop":
                # a matched stop string comes back as that string; EOS/stop tokens as None or an int
                reason = DELIMITER if sr == sampling.step_delimiter else EOS
            else:
                raise BadAnswer(f"{server.url} ended a sample with finish_reason={one_line(repr(fr), 80)}")
            lps = c.get("logprobs")
            lp = self._logprobs(lps.get("token_logprobs") if isinstance(lps, dict) else None, len(ids))
            steps.append(Step(ids, self._text(list(ids), c.get("text", "")), reason, lp))
        return steps

    @staticmethod
    def _logprobs(lp, n: int) -> tuple[float, ...] | None:
        """Per-token log-probabilities when the server gave one finite number per token, else None
        (they are optional: a step without them is scored without them)."""
        if not isinstance(lp, list) or len(lp) != n or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in lp):
            return None
        return tuple(float(x) for x in lp)

    def _parse_sglang(self, server: _Server, body, sampling: SamplingConfig, n_prompt: int) -> list[Step]:
        items = body if isinstance(body, list) else [body]  # n == 1 answers one object
        if not all(isinstance(item, dict) for item in items):
            raise BadAnswer(f"{server.url}/generate answered {one_line(body, 200)}: is it an SGLang server?")
        server.counters["prompt_tokens"] += n_prompt
        steps = []
        for k, item in enumerate(items):
            meta = item.get("meta_info") if isinstance(item.get("meta_info"), dict) else {}
            server.counters["completion_tokens"] += self._count(meta.get("completion_tokens"))
            server.counters["cached_tokens"] += self._count(meta.get("cached_tokens"))
            lps = meta.get("output_token_logprobs")  # [[logprob, token_id, text|None], ...]
            if lps is not None and not (isinstance(lps, list) and all(isinstance(e, list) and len(e) >= 2 for e in lps)):
                lps = None
            ids = item.get("output_ids")
            if ids is None and lps is not None:
                ids = [e[1] for e in lps]
            if ids is None:
                raise BadAnswer(f"{server.url} returned no output token ids (output_ids / "
                                "meta_info.output_token_logprobs)")
            ids = self._token_ids(server, ids, k)
            fin = meta.get("finish_reason") or {}
            kind = fin.get("type") if isinstance(fin, dict) else fin
            if kind == "length":
                reason = LENGTH
            elif kind == "stop":
                reason = DELIMITER if fin.get("matched") == sampling.step_delimiter else EOS
            else:
                raise BadAnswer(f"{server.url} ended a sample with finish_reason={one_line(repr(fin), 80)}")
            lp = self._logprobs([e[0] for e in lps] if lps else None, len(ids))
            steps.append(Step(ids, self._text(list(ids), item.get("text", "")), reason, lp))
        return steps

    def _text(self, ids: list[int], server_text: str) -> str:
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=True)
        return server_text if isinstance(server_text, str) else ""

    # ---- measurements -------------------------------------------------------------------

    def observe(self, root: Node) -> dict:
        """The server's figures for `root`'s latest expand: kv_tokens_peak (KV tokens held by
        running requests, sampled from /metrics while it ran), kv_capacity_tokens, prefix_hits /
        prefix_queries / prefix_hit_rate (prompt tokens, counter deltas over the expand), the
        server's URL and how many problems it had in flight (all figures are server-wide)."""
        return dict(self._obs.get(root, {}))

    def stats(self) -> dict:
        per = {}
        totals = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
        hits = queries = 0
        kv_peak = preemptions = None
        load = {"server_running_sum": 0.0, "server_waiting_sum": 0.0, "server_load_samples": 0}
        for s in self.servers:
            m = s.monitor.totals() if s.monitor else {}
            per[redact_url(s.url)] = {**s.counters, **m}
            for k in totals:
                totals[k] += s.counters[k]
            for k, v in s.counters.items():  # why requests were sent again, or waited for (ets.http)
                if k.startswith("retries_") or k == "busy_waits":
                    totals[k] = totals.get(k, 0) + v
            if m.get("prefix_queries") is not None:
                hits += m["prefix_hits"]
                queries += m["prefix_queries"]
            if m.get("kv_tokens_peak") is not None:
                kv_peak = max(kv_peak or 0, m["kv_tokens_peak"])
            if m.get("preemptions") is not None:
                preemptions = (preemptions or 0) + m["preemptions"]
            for k in ("running_sum", "waiting_sum", "load_samples"):
                load["server_" + k] += m.get(k, 0)
        return {**totals, "server_prefix_hits": hits, "server_prefix_queries": queries,
                "server_prefix_hit_rate": hits / queries if queries else None,
                # prompt tokens the engines computed rather than took from their prefix cache
                "prefilled_tokens": queries - hits if queries else None,
                "server_kv_tokens_peak": kv_peak,
                # sequences the servers evicted for want of KV blocks (vLLM), and their load while
                # this client had requests out: mean running / waiting = sum / server_load_samples
                "server_preemptions": preemptions, **load, "servers": per}

    async def aclose(self) -> None:
        for s in self.servers:
            if s.monitor is not None:
                await s.monitor.stop()
        if self._client is not None:
            await self._client.aclose()
            self._client, self._loop = None, None
