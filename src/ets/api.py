"""`ets api`: an OpenAI-compatible HTTP server whose "models" are search configurations.

    ets api --policy mock --prm mock --embedder hash --models ets-w16,rebase-w16,best_of_n-w8

Endpoints (HTTP/1.1, JSON, keep-alive; a small asyncio server, no web framework):

    GET  /v1/models              the configured models: each --models name STRATEGY-wWIDTH, and
                                 the base model (--base-model, default "ets": --strategy/--width)
    GET  /v1/models/NAME         one of them (404 otherwise)
    POST /v1/chat/completions    the last user message is the question
    POST /v1/completions         the prompt (a string, or a list of one string) is the question
    GET  /health                 {"status": "ok", "searches_in_flight": N} (no key needed)

Contract of a completion:
- The question is asked as `ets run` asks a problem (--prompt-template: by default the question,
  then the \\boxed{} instruction the search finishes a solution by) and searched with the model's
  SearchConfig: the flags of `ets run` (sampling, --max-tokens, strategy flags where the strategy
  has them) for the model's strategy and width, then the request's own `temperature`, `top_p`,
  `seed`, `max_tokens` (per trajectory, as --max-tokens) and its `ets` object: {"strategy",
  "width", "vote", "agg", and any strategy parameter such as "lambda_c"}, which overrides them.
- The answer (message content / text) is the whole path text of the solution the vote selects
  (ets.answer.select_from_tree, --vote/--agg); finish_reason "stop". No solution at all: the
  highest-scoring leaf's path, finish_reason "length".
- usage.completion_tokens: every token the search generated (the tree's, exactly).
  usage.prompt_tokens: the tokens the policy engine reports having been given as prompt over the
  search (the delta of its stats(): a server policy's "prompt_tokens", the embedded engine's
  "prefill_tokens"); an engine that reports none (mock): the prompt's own tokens. The engine's
  counters are process-wide: with other searches in flight meanwhile (`ets.usage.shared_with` > 0)
  the delta includes their prompt tokens too; `ets.usage` says which source was used.
- `ets` (an extension field): run (directory), problem_id, view (the `ets view` command that opens
  the tree), strategy, width, answer, vote (the selection with its groups), kv_mean, kv_peak,
  kv (all per-problem KV figures), solutions, generated_tokens, wall_s, usage details.
- Each request's tree is saved as a problem record (ets.runner.problem_record; "correct" is None:
  there is no gold answer) in the run directory of its SearchConfig under --runs-dir, with a
  sessions.jsonl line; summary.json is written when the server stops. The problem id is the
  completion's id.
- Concurrency: one policy and one PRM serve every request; each request is one asyncio task
  running ets.search.search (as problems in flight in `ets run`), at most --concurrency at once
  (the others wait their turn). A client that disconnects before its answer is sent cancels its
  search (queued or running); the tree's nodes are released to the engine; nothing is saved.
- Errors are JSON in OpenAI's shape {"error": {"message", "type", "code"}}: 400 bad JSON / missing
  messages or prompt / bad parameters / width outside 1..--max-width, 401 missing or wrong key
  (with --api-key or $ETS_API_KEY: `Authorization: Bearer KEY`; the key is never printed nor
  written), 404 unknown model or path, 405, 411, 413; a failed search is a 500 (recorded in the
  run's errors/).
- `stream: true` is answered once the search ends, as server-sent events: one chunk with the
  whole content, one with finish_reason, usage and `ets`, then [DONE].
- Binds 127.0.0.1 unless --host. Stops on SIGTERM / Ctrl-C (exit 0): searches in flight are
  cancelled, the models closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import sys
import time
import typing
import uuid
from dataclasses import replace

from ets import cli
from ets.checks import BadInput, Parser, safe

MAX_HEADER = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
# flags of `ets run` that mean nothing to a server (which problems to run, progress bars)
_HIDDEN = ("dataset", "question_field", "answer_field", "id_field", "limit", "offset", "ids",
           "admit_until", "json", "no_progress")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error"}


def log(msg: str) -> None:
    print(f"[ets api] {msg}", file=sys.stderr, flush=True)


class ApiError(Exception):
    """A request that gets an error answer: HTTP status, message, OpenAI error type and code."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}


# -- the command line ----------------------------------------------------------------------------

def build_parser() -> Parser:
    p = Parser(prog="ets api", description="OpenAI-compatible server whose models are search configurations "
                                           "(see ets.api). Model and search flags are those of `ets run`.")
    g = p.add_argument_group("api")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    g.add_argument("--models", type=cli._csv, default=["ets-w16", "rebase-w16", "best_of_n-w8"],
                   help="comma list of served configs STRATEGY-wWIDTH (default ets-w16,rebase-w16,best_of_n-w8)")
    g.add_argument("--base-model", default="ets",
                   help="name of the base model: --strategy/--width, or a request's `ets` object (default ets)")
    g.add_argument("--strategy", default="ets", help="the base model's strategy (default ets)")
    g.add_argument("--width", type=int, default=4, help="the base model's width (default 4)")
    g.add_argument("--max-width", type=int, default=64, help="largest width a request may ask for (default 64)")
    g.add_argument("--api-key", default=os.environ.get("ETS_API_KEY"), metavar="KEY",
                   help="require `Authorization: Bearer KEY` (default $ETS_API_KEY; none: no check)")
    cli._add_common(p)
    p.set_defaults(concurrency=8)
    for action in p._actions:
        if action.dest in _HIDDEN:
            action.help = argparse.SUPPRESS
        if action.dest == "concurrency":
            action.help = "searches running at once; further requests wait (default 8)"
    return p


def parse_model(name: str, max_width: int) -> tuple[str, int]:
    """(strategy, width) of a model name STRATEGY-wWIDTH; BadInput when it is not one."""
    from ets.strategies import STRATEGIES

    strategy, sep, width = name.rpartition("-w")
    if not sep or strategy not in STRATEGIES or not width.isdigit():
        raise BadInput(f"--models {name}: not STRATEGY-wWIDTH with a strategy of {sorted(STRATEGIES)}")
    if not 1 <= int(width) <= max_width:
        raise BadInput(f"--models {name}: width outside 1..{max_width} (--max-width)")
    return strategy, int(width)


def main(argv: list[str] | None = None) -> int:
    """`ets api ...`: 0 when stopped by a signal, 2 on bad arguments, 1 when a server fails."""
    from ets.factory import SpecError
    from ets.http import ServerError
    from ets.models import ModelNotFound

    a = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    a.cmd = "api"
    try:
        app = App(a)
        cli._execute(app.serve, a, app.rc, models=app.models)
    except KeyboardInterrupt:
        return 0
    except (SpecError, ValueError, ModelNotFound) as e:
        print(f"error: {safe(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(safe(f"error: {e.strerror or e}"), file=sys.stderr)
        return 2
    except ServerError as e:
        print(safe(f"error: {' '.join(str(e).split())}\n  fix: {e.hint}"), file=sys.stderr)
        return 1
    return 0


# -- the service ---------------------------------------------------------------------------------

class _Watched:
    """The policy as one search sees it: remembers the tree's root so that a cancelled search
    can release the tree's nodes (KV the embedded engine holds for them)."""

    def __init__(self, policy):
        self._policy, self.root = policy, None

    def __getattr__(self, name):
        return getattr(self._policy, name)

    async def expand(self, requests, sampling):
        if self.root is None and requests:
            node = requests[0].node
            while node.parent is not None:
                node = node.parent
            self.root = node
        return await self._policy.expand(requests, sampling)

    def release_tree(self) -> None:
        nodes, todo = [], [self.root] if self.root is not None else []
        while todo:
            n = todo.pop()
            nodes.append(n)
            todo.extend(n.children)
        if nodes:
            self._policy.release(nodes)


class App:
    """The models, the served configs and the run directories of one `ets api` process."""

    def __init__(self, a):
        from ets.checks import validate_run_args
        from ets.tasks import Task

        self.a = a
        if a.max_width < 1:
            raise BadInput(f"--max-width {a.max_width}: give a number >= 1")
        self.configs = {name: parse_model(name, a.max_width) for name in a.models}
        self.configs[a.base_model] = (a.strategy, a.width)
        try:  # the base config, checked as the others
            parse_model(f"{a.strategy}-w{a.width}", a.max_width)
        except BadInput:
            raise BadInput(f"--strategy {a.strategy} --width {a.width}: not a strategy, or a width outside "
                           f"1..{a.max_width} (--max-width)") from None
        for strategy, width in self.configs.values():
            cli.search_config(a, strategy, width, strict=False)  # every flag value checked now
        validate_run_args(a)
        rc = replace(cli.run_config(a), dataset="api")
        self.task = cli.asked_as(a, Task("api"))
        self.models = cli._models(a, rc)  # before any run directory: a model that cannot load leaves nothing
        self.rc = cli.with_policy_identity(rc, self.models[0])
        self.runs: dict = {}  # SearchConfig -> RunDir
        self.embedders: dict = {}
        self.live: dict[str, set] = {}  # request id -> ids of the other searches in flight meanwhile
        self.searches: set[asyncio.Task] = set()
        self.created = int(time.time())

    # -- requests -> configs
    def search_config(self, model, body: dict):
        """(SearchConfig, vote, agg) of a request; ApiError for an unknown model or a bad value."""
        from ets.answer import AGGREGATIONS, VOTES
        from ets.strategies import STRATEGIES

        if not isinstance(model, str) or model not in self.configs:
            raise ApiError(404, f"The model {model!r} does not exist; GET /v1/models lists "
                                f"{sorted(self.configs)}", "model_not_found")
        strategy, width = self.configs[model]
        ets = body.get("ets") or {}
        if not isinstance(ets, dict):
            raise ApiError(400, "`ets` must be an object: {\"strategy\", \"width\", \"vote\", \"agg\", "
                                "strategy parameters...}", "invalid_ets")
        ets = dict(ets)
        strategy = ets.pop("strategy", strategy)
        width = ets.pop("width", width)
        vote, agg = ets.pop("vote", self.rc.vote), ets.pop("agg", self.rc.agg)
        if strategy not in STRATEGIES:
            raise ApiError(400, f"ets.strategy {strategy!r}: choose one of {sorted(STRATEGIES)}", "invalid_strategy")
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= self.a.max_width:
            raise ApiError(400, f"width {width!r} is out of range: give an integer in 1..{self.a.max_width}",
                           "width_out_of_range")
        if vote not in VOTES or agg not in AGGREGATIONS:
            raise ApiError(400, f"ets.vote must be one of {VOTES} and ets.agg one of {AGGREGATIONS}", "invalid_vote")
        self._check_params(strategy, ets)
        cfg = cli.search_config(self.a, strategy, width, strict=False)
        sampling = {k: body[k] for k in ("temperature", "top_p") if body.get(k) is not None}
        top = {}
        if body.get("seed") is not None:
            top["seed"] = body["seed"]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None:
            top["max_tokens"] = limit
        for k, v in {**sampling, **top}.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or (k in top and not isinstance(v, int)):
                raise ApiError(400, f"{k} must be a {'integer' if k in top else 'number'}, got {v!r}", "invalid_value")
        if body.get("n") not in (None, 1):
            raise ApiError(400, "n must be 1: one search gives one answer", "invalid_value")
        try:
            return replace(cfg, sampling=replace(cfg.sampling, **sampling), **top,
                           strategy_params={**dict(cfg.strategy_params), **ets}), vote, agg
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), "invalid_value") from None

    def _check_params(self, strategy: str, params: dict) -> None:
        from ets.strategies import STRATEGIES

        cls = STRATEGIES[strategy].Config
        hints = typing.get_type_hints(cls)
        known = {k for k in hints if k not in cli.NOT_STRATEGY_FLAGS}
        for k, v in params.items():
            if k not in known:
                raise ApiError(400, f"ets.{k}: not a parameter of {strategy} (its parameters: "
                                    f"{sorted(known)}, and strategy, width, vote, agg)", "invalid_ets_parameter")
            if not _fits(v, cli.typing_args(hints[k])):
                raise ApiError(400, f"ets.{k}: {v!r} is not a {hints[k]}", "invalid_ets_parameter")

    def run_dir(self, cfg):
        if cfg not in self.runs:
            self.runs[cfg] = self.rc.run_dir(cfg, self.task.to_dict())
        return self.runs[cfg]

    # -- one search
    async def complete(self, rid: str, model: str, question: str, cfg, vote: str, agg: str) -> dict:
        """Search `question` under `cfg`, save its record, return the answer fields (see module doc).
        Cancellation (a client gone) releases the tree's nodes and saves nothing."""
        from ets.measures import counter_delta, snapshot
        from ets.prm.base import PROBLEM_COUNTERS
        from ets.runner import _MODEL_TEXT, _embedder, failure_message, problem_record, redact_obj
        from ets.search import search
        from ets.tasks import Problem

        policy, prm = self.models
        run = self.run_dir(cfg)
        problem = Problem(rid, question, None)
        prompt = self.task.prompt(problem)
        async with self._slot:
            for other in self.live.values():
                other.add(rid)
            self.live[rid] = set(self.live)
            watched, before = _Watched(policy), snapshot(policy)
            log(f"{rid}: {model} ({cfg.strategy}, W={cfg.width}) started")
            charged: dict = {}  # what the PRM charges to this request as it scores (ets.prm.base.charge)
            token = PROBLEM_COUNTERS.set(charged)
            try:
                result = await search(prompt, watched, prm, cfg, embedder=_embedder(cfg, self.embedders),
                                      reference=self.task.reference(problem))
            except asyncio.CancelledError:
                watched.release_tree()
                log(f"{rid}: cancelled (client disconnected); search stopped, nothing saved")
                raise
            except Exception as e:  # noqa: BLE001  (one request's failure is its own answer)
                watched.release_tree()
                msg = failure_message(rid, run.name, e)
                run.write_error(rid, msg)
                log(msg.replace("\n", " "))
                raise ApiError(500, msg, "search_failed", "server_error") from None
            finally:
                PROBLEM_COUNTERS.reset(token)
                shared = self.live.pop(rid)
            delta = counter_delta(snapshot(policy), before)
        record = problem_record(problem, self.task, prompt, result, vote, agg,
                                getattr(policy, "name", "?"), getattr(prm, "name", "?"),
                                prm_tokens=charged.get("prm_tokens", 0) if "prm_tokens" in snapshot(prm) else None)
        record["correct"] = None  # no gold answer to grade against
        generated = result.counters["generated_tokens"]
        key = next((k for k in ("prompt_tokens", "prefill_tokens") if isinstance(delta.get(k), (int, float))), None)
        prompt_tokens = int(delta[key]) if key else len(result.tree.root.token_ids)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                 "total_tokens": prompt_tokens + generated}
        detail = {"prompt_tokens_from": f"engine {key}" if key else "the prompt (the engine reports none)",
                  "shared_with": len(shared), "prompt_ids": len(result.tree.root.token_ids), "engine": delta}
        record["api"] = {"model": model, "usage": usage, "usage_detail": detail, "created": time.time()}
        record = {k: v if k in _MODEL_TEXT else redact_obj(v) for k, v in record.items()}
        run.write_problem(record)
        run.append_session(redact_obj({"time": time.time(), "computed": 1, "skipped": 0, "failed": 0,
                                       "wall_s": result.counters["wall_s"], "generated_tokens": generated,
                                       "concurrency": 1 + len(shared), "interleaved_runs": 1, "ids": [rid],
                                       "engine": delta, "prm": {}, "api": True}))
        text, finish = self._answer_text(result, record["answer"]["node_id"])
        kv = result.kv_summary()
        log(f"{rid}: done, {generated} tokens, answer {record['answer']['answer']!r}, saved in {run.path}")
        return {"text": text, "finish_reason": finish, "usage": usage,
                "ets": {"run": str(run.path), "problem_id": rid, "view": f"ets view {run.path} --problem {rid}",
                        "strategy": cfg.strategy, "width": cfg.width, "answer": record["answer"]["answer"],
                        "vote": record["answer"], "kv_mean": kv["kv_mean"], "kv_peak": kv["kv_peak"], "kv": kv,
                        "solutions": record["solutions"], "generated_tokens": generated,
                        "wall_s": result.counters["wall_s"], "usage": detail}}

    @staticmethod
    def _answer_text(result, node_id) -> tuple[str, str]:
        nodes = result.tree.nodes
        if node_id is not None:
            return "".join(nodes[node_id].step_texts()), "stop"
        leaves = [n for n in nodes[1:] if not n.children]
        if not leaves:
            return "", "length"
        best = max(leaves, key=lambda n: (n.score if n.score is not None else float("-inf"), -n.id))
        return "".join(best.step_texts()), "length"

    # -- HTTP
    async def serve(self, policy, prm) -> None:
        """Listen until cancelled (SIGTERM / Ctrl-C through ets.cli._execute); then cancel every
        connection and search, and write each run's summary."""
        from ets.runner import _embedder, write_summary

        self._slot = asyncio.Semaphore(self.rc.concurrency)
        self.task.grade("1", "1")  # load the grader before the first request
        for strategy, width in set(self.configs.values()):
            emb = _embedder(cli.search_config(self.a, strategy, width, strict=False), self.embedders)
            if emb is not None:
                emb.embed(["warm up"])
        connections: set[asyncio.Task] = set()

        async def on_connect(reader, writer):
            me = asyncio.current_task()
            connections.add(me)
            try:
                await self._connection(reader, writer)
            except asyncio.CancelledError:
                pass  # the server stopping; a handler that ends cancelled is reported by asyncio as an error
            finally:
                connections.discard(me)

        server = await asyncio.start_server(on_connect, self.a.host, self.a.port, limit=MAX_HEADER)
        host, port = server.sockets[0].getsockname()[:2]
        log(f"listening on http://{host}:{port} (models: {', '.join(self.configs)}; "
            f"key {'required' if self.a.api_key else 'not required'}; runs under {self.rc.runs_dir})")
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            for t in list(connections) + list(self.searches):
                t.cancel()
            await asyncio.gather(*connections, *self.searches, return_exceptions=True)
            for run in self.runs.values():
                with contextlib.suppress(Exception):
                    write_summary(run)
            log("stopped")

    async def _connection(self, reader, writer) -> None:
        buf = bytearray()
        try:
            while True:
                try:
                    req = await _read_request(reader, writer, buf)
                except ApiError as e:
                    await _send(writer, e.status, e.body(), keep=False)
                    return
                if req is None:
                    return
                if not await self._respond(req, reader, writer, buf):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, req: dict, reader, writer, buf: bytearray) -> bool:
        """Answer one request; False when the connection is to be closed."""
        keep = req["headers"].get("connection", "").lower() != "close" and req["version"] == "HTTP/1.1"
        try:
            status, out, stream = 200, await self._route(req, reader, buf), False
        except ApiError as e:
            status, out, stream = e.status, e.body(), False
        except _Gone:
            return False
        except Exception as e:  # noqa: BLE001  (a bug or a failing disk: the client still gets JSON)
            log(safe(f"{req['method']} {req['path']}: {type(e).__name__}: {e}"))
            status, out, stream = 500, ApiError(500, safe(f"{type(e).__name__}: {e}"), "internal_error",
                                                "server_error").body(), False
        if isinstance(out, tuple):  # a streamed answer
            out, stream = out[0], True
        if stream:
            await _send_events(writer, out)
            return False
        await _send(writer, status, out, keep)
        return keep

    async def _route(self, req: dict, reader, buf: bytearray):
        method, path = req["method"], req["path"].split("?", 1)[0].rstrip("/")
        if path == "/health":
            return {"status": "ok", "searches_in_flight": len(self.searches)}
        routes = {"/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}
        if path not in routes and not path.startswith("/v1/models/"):
            raise ApiError(404, f"no such path {path!r}: use {', '.join(routes)}", "not_found")
        self._authorize(req["headers"])
        if method != routes.get(path, "GET"):
            raise ApiError(405, f"{path} takes {routes.get(path, 'GET')}, not {method}", "method_not_allowed")
        if path == "/v1/models":
            return {"object": "list", "data": [self._model_card(m) for m in self.configs]}
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name not in self.configs:
                raise ApiError(404, f"The model {name!r} does not exist", "model_not_found")
            return self._model_card(name)
        body = _json_body(req["body"])
        chat = path == "/v1/chat/completions"
        question = _question(body, chat)
        cfg, vote, agg = self.search_config(body.get("model"), body)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        out = await self._until_answer_or_gone(self.complete(rid, body["model"], question, cfg, vote, agg),
                                               reader, buf)
        return _completion(rid, body["model"], out, chat, bool(body.get("stream")))

    async def _until_answer_or_gone(self, coro, reader, buf: bytearray):
        """The result of `coro` run as a search task; _Gone (the task cancelled and awaited)
        when the client closes its connection first."""
        search = asyncio.create_task(coro)
        self.searches.add(search)
        search.add_done_callback(self.searches.discard)
        watch = asyncio.create_task(_until_eof(reader, buf))
        try:
            await asyncio.wait({search, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (watch, search) if not search.done() else (watch,):
                t.cancel()
            await asyncio.gather(watch, search, return_exceptions=True)
        if search.cancelled():
            raise _Gone()
        return search.result()

    def _authorize(self, headers: dict) -> None:
        key = self.a.api_key
        if not key:
            return
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY` with the key "
                                "`ets api` was started with", "invalid_api_key")

    def _model_card(self, name: str) -> dict:
        strategy, width = self.configs[name]
        return {"id": name, "object": "model", "created": self.created, "owned_by": "ets",
                "ets": {"strategy": strategy, "width": width, "base": name == self.a.base_model,
                        "policy": safe(self.rc.policy), "prm": safe(self.rc.prm)}}


def _fits(value, types: tuple) -> bool:
    """Whether a JSON value is of one of `types` (an int is a float; a bool is only a bool)."""
    if value is None:
        return type(None) in types
    if isinstance(value, bool):
        return bool in types
    return any(isinstance(value, t) or (t is float and isinstance(value, int)) for t in types if t is not type(None))


class _Gone(Exception):
    """The client closed its connection before its answer."""


# -- HTTP/1.1 plumbing ---------------------------------------------------------------------------

async def _until_eof(reader, buf: bytearray) -> None:
    """Return when the client closes its side; bytes it sends meanwhile (a pipelined next
    request) are kept in `buf` for the next request."""
    while len(buf) <= MAX_BODY:
        data = await reader.read(65536)
        if not data:
            return
        buf.extend(data)


async def _read_request(reader, writer, buf: bytearray) -> dict | None:
    """The next request on the connection ({method, path, version, headers, body}); None when
    the client closed it between requests; ApiError for a malformed one."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEADER:
            raise ApiError(431, "request headers too large", "headers_too_large")
        data = await reader.read(65536)
        if not data:
            if buf.strip():
                raise ApiError(400, "incomplete request", "bad_request")
            return None
        buf.extend(data)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    del buf[:]
    buf.extend(rest)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ApiError(400, f"not an HTTP/1.x request line: {lines[0][:80]!r}", "bad_request")
    headers = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if not sep:
            raise ApiError(400, f"malformed header line {line[:80]!r}", "bad_request")
        headers[k.strip().lower()] = v.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ApiError(411, "send the body with a Content-Length (chunked bodies are not taken)", "length_required")
    try:
        n = int(headers.get("content-length", "0"))
    except ValueError:
        raise ApiError(400, "Content-Length is not a number", "bad_request") from None
    if n < 0 or n > MAX_BODY:
        raise ApiError(413, f"body of {n} bytes: at most {MAX_BODY}", "body_too_large")
    if len(buf) < n and headers.get("expect", "").lower() == "100-continue":  # curl, for larger bodies
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    while len(buf) < n:
        data = await reader.read(65536)
        if not data:
            raise asyncio.IncompleteReadError(bytes(buf), n)
        buf.extend(data)
    body = bytes(buf[:n])
    del buf[:n]
    return {"method": parts[0], "path": parts[1], "version": parts[2], "headers": headers, "body": body}


def _json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    if "model" not in body:
        raise ApiError(400, "missing `model`: GET /v1/models lists them", "missing_model")
    return body


def _question(body: dict, chat: bool) -> str:
    """The question of a request: the last user message (chat), the prompt (completions)."""
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "`prompt` must be a non-empty string (or a list of one): the question",
                           "missing_prompt")
        return prompt
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list; the last user message is the question",
                       "missing_messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ApiError(400, "no message with role `user`: the last user message is the question", "missing_messages")
    content = users[-1].get("content")
    if isinstance(content, list):  # content parts: the text ones, joined
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str) or not content.strip():
        raise ApiError(400, "the last user message has no text", "missing_messages")
    return content


def _completion(rid: str, model: str, out: dict, chat: bool, stream: bool):
    """The OpenAI answer object (a (events,) tuple when streamed)."""
    created = int(time.time())
    if not stream:
        choice = ({"index": 0, "message": {"role": "assistant", "content": out["text"]}}
                  if chat else {"index": 0, "text": out["text"]})
        choice.update(finish_reason=out["finish_reason"], logprobs=None)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": [choice], "usage": out["usage"], "ets": out["ets"]}
    obj = "chat.completion.chunk" if chat else "text_completion"
    first = {"delta": {"role": "assistant", "content": out["text"]}} if chat else {"text": out["text"]}
    last = {"delta": {}} if chat else {"text": ""}
    events = [{"id": rid, "object": obj, "created": created, "model": model,
               "choices": [{"index": 0, **first, "finish_reason": None, "logprobs": None}]},
              {"id": rid, "object": obj, "created": created, "model": model,
               "choices": [{"index": 0, **last, "finish_reason": out["finish_reason"], "logprobs": None}],
               "usage": out["usage"], "ets": out["ets"]}]
    return (events,)


async def _send(writer, status: int, obj, keep: bool) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n")
    writer.write(head.encode("latin-1") + data)
    await writer.drain()


async def _send_events(writer, events: list[dict]) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                 b"Connection: close\r\n\r\n")
    for e in events:
        writer.write(b"data: " + json.dumps(e, ensure_ascii=False).encode("utf-8") + b"\n\n")
    writer.write(b"data: [DONE]\n\n")
    await writer.drain()


if __name__ == "__main__":
    sys.exit(main())
