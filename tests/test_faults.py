"""Fault injection (issue 38): servers that misbehave as real ones do, files that are corrupt as
real ones are, values that are absurd. Every server here is a loopback stand-in on 127.0.0.1,
every wait in it is bounded, and every case asserts a bounded time, the exit status, a short
message without a traceback, and no secret anywhere (stdout, stderr, the run directory)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

import ets.cli as cli
from conftest import _Server, free_port
from test_server_policy import FakeVLLM

SECRET = "s3cret"
MOCK = ["--policy", "mock", "--prm", "mock", "--embedder", "hash", "--no-progress"]


def _with_secret(url: str) -> str:
    return url.replace("http://", f"http://user:{SECRET}@")


@pytest.fixture
def toy(tmp_path):
    """4 problems t0..t3 and the flags of a small server-policy run on them."""
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "question": f"q{i}", "answer": "42"}) + "\n" for i in range(4)))
    return ["--dataset", str(path), "--id-field", "id", "--runs-dir", str(tmp_path / "runs"), "--limit", "0",
            "--embedder", "hash", "--no-progress", "--width", "2", "--max-tokens", "40", "--max-step-tokens", "8"]


class _NoTok:
    """What a run asks of a tokenizer before any problem starts (its identity), and no more."""

    chat_template = None

    def get_vocab(self):
        return {"a": 0}


@pytest.fixture
def no_tokenizer(monkeypatch):
    """The stand-ins serve no real model: a prompt becomes a few token ids naming its problem."""
    from ets.engines.server import ServerPolicy

    monkeypatch.setattr(ServerPolicy, "format_prompt", lambda self, q: ([1000 + int(q[1:].split()[0]), 1, 2], q))
    monkeypatch.setattr(ServerPolicy, "_tokenizer", lambda self: _NoTok())


def _main(argv, capsys):
    """cli.main(argv) -> (exit status, stdout, stderr, seconds)."""
    capsys.readouterr()
    t = time.monotonic()
    try:
        code = cli.main([str(x) for x in argv])
    except SystemExit as e:  # argparse
        code = e.code
    took = time.monotonic() - t
    out = capsys.readouterr()
    return code, out.out, out.err, took


def _no_secret_anywhere(root: Path, *texts: str) -> None:
    for t in texts:
        assert SECRET not in t, t
    for p in root.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), f"{p}: {p.read_text(errors='replace')[:500]}"


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def _completion(choices):
    return {"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}


def _choice(ids, k=0):
    return {"index": k, "text": "x\n\n", "token_ids": ids, "finish_reason": "stop", "stop_reason": "\n\n",
            "logprobs": {"token_logprobs": [-0.5] * len(ids)}}


# -- 1. redaction: a password in a URL is never printed or written -----------------------------------

def _policy_fault(kind):
    """A /v1/completions handler answering with fault `kind`; everything else as FakeVLLM."""
    fake = FakeVLLM(delimiter_only=True)

    def handler(method, path, body):
        if path == "/v1/completions":
            n = body["n"]
            if kind == "no-token-ids":
                return 200, _completion([{"index": k, "text": "x", "finish_reason": "stop"} for k in range(n)])
            if kind == "too-few-samples" and body["max_tokens"] > 1:
                return 200, _completion([_choice([5, 6, 7])] * (n - 1))
            if kind == "http-500":
                return 500, {"error": "internal"}
            if kind == "invalid-json":
                return 200, "<html>not json</html>"
            if kind == "negative-ids":
                return 200, _completion([_choice([5, -7, 198], k) for k in range(n)])
        if path == "/v1/models" and kind == "models-garbage":
            return 200, {"unexpected": True}
        return fake(method, path, body)

    return handler


POLICY_FAULTS = [
    ("no-token-ids", "returned no token ids"),
    ("too-few-samples", "samples for a node, asked for 2"),
    ("http-500", "HTTP 500"),
    ("invalid-json", "answered with invalid JSON"),
    ("negative-ids", "returned token id -7"),
    ("models-garbage", "did not name a model"),
]


@pytest.mark.parametrize("kind,phrase", POLICY_FAULTS, ids=[k for k, _ in POLICY_FAULTS])
def test_policy_server_faults_never_leak_the_password(kind, phrase, tmp_path, toy, no_tokenizer, stand_in, capsys):
    srv = stand_in(_policy_fault(kind))
    code, out, err, took = _main(["run", "--policy", _with_secret(srv.url), "--prm", "mock", *toy, "--limit", "2",
                                  "--concurrency", "2"], capsys)
    assert code == 1, err
    assert phrase in err and "Traceback" not in err, err
    assert "http://***@127.0.0.1" in err, err  # the server is named, redacted
    assert took < 40, took  # HTTP 500: 5 tries, 7.5 s of backoff
    _no_secret_anywhere(tmp_path, out, err)
    errors = list(tmp_path.glob("runs/*/errors/*.json"))  # none where the run failed before it started
    assert all(phrase in json.loads(p.read_text())["error"] for p in errors)


def test_dead_policy_server_never_leaks_the_password(tmp_path, toy, no_tokenizer, capsys):
    url = _with_secret(f"http://127.0.0.1:{free_port()}")  # nothing listens
    code, out, err, took = _main(["run", "--policy", url, "--prm", "mock", *toy], capsys)
    assert code == 1 and "is down" in err and "Traceback" not in err
    assert took < 10
    _no_secret_anywhere(tmp_path, out, err)


def _compare_with_secret(tmp_path, srv, capsys):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "question": f"q{i}", "answer": "42"}) + "\n" for i in range(2)))
    return _main(["compare", "--policy", _with_secret(srv.url), "--prm", "mock", "--embedder", "hash", "--no-progress",
                  "--dataset", data, "--runs-dir", tmp_path / "runs", "--widths", "2", "--methods", "ets",
                  "--max-tokens", "40", "--max-step-tokens", "8", "--limit", "1"], capsys)


def test_compare_run_directories_never_hold_the_password(tmp_path, no_tokenizer, stand_in, capsys):
    srv = stand_in(FakeVLLM(delimiter_only=True))
    code, out, err, _ = _compare_with_secret(tmp_path, srv, capsys)
    assert code == 0, err
    runs = [d for d in (tmp_path / "runs").iterdir() if not d.name.startswith("compare-")]
    assert runs
    for d in runs:
        _no_secret_anywhere(d, out, err)


def test_compare_record_never_holds_the_password(tmp_path, no_tokenizer, stand_in, capsys):
    srv = stand_in(FakeVLLM(delimiter_only=True))
    code, out, err, _ = _compare_with_secret(tmp_path, srv, capsys)
    assert code == 0, err
    _no_secret_anywhere(tmp_path, out, err)


def _pooling(kind):
    def handler(method, path, body):
        if path != "/pooling":
            return 404, {}
        data = []
        for i, text in enumerate(body["input"]):
            vecs = [[0.0, 0.5] for _ in text.split("<extra_0>")[:-1]]
            if kind == "nan":
                vecs = [[0.0, float("nan")] for _ in vecs]  # json.dumps writes NaN
            if kind == "strings":
                vecs = [["a", "b"] for _ in vecs]
            data.append({"index": i, "data": vecs})
        if kind == "too-few-results":
            data = data[:-1] if len(data) > 1 else []
        return 200, {"data": data}
    return handler


PRM_FAULTS = [("too-few-results", "results for"), ("nan", "non-finite score"), ("strings", "not a number or a list")]


@pytest.mark.parametrize("kind,phrase", PRM_FAULTS, ids=[k for k, _ in PRM_FAULTS])
def test_prm_server_faults_name_the_server_and_never_leak_the_password(kind, phrase, tmp_path, toy, stand_in, capsys):
    srv = stand_in(_pooling(kind))
    toy = [x for x in toy if x not in ("--width", "2")]
    code, out, err, took = _main(["run", "--policy", "mock", "--prm", _with_secret(srv.url), *toy, "--limit", "2",
                                  "--width", "2"], capsys)
    assert code == 1, err
    assert phrase in err and "Traceback" not in err, err
    assert "http://***@127.0.0.1" in err, err  # the PRM server is named, redacted
    assert "step-delimiter" not in err  # the server's answer is at fault, not the steps
    assert took < 30
    _no_secret_anywhere(tmp_path, out, err)


# -- 2. deadlines: --request-timeout bounds the whole request ---------------------------------------

class Trickle:
    """A server on 127.0.0.1: /health and /v1/models answered at once; /v1/completions (and
    /slow) answered one byte every `gap_s` seconds, a connection held at most `max_s` seconds."""

    def __init__(self, gap_s: float = 0.25, max_s: float = 8.0, body: dict | None = None):
        self.stop = threading.Event()
        self.posts = 0
        outer = self
        answer = json.dumps(body or {"pad": "x" * 40}).encode()

        class H(BaseHTTPRequestHandler):
            def _send(self, data: bytes, trickle: bool):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not trickle:
                    self.wfile.write(data)
                    return
                t0 = time.monotonic()
                for i in range(len(data)):
                    if outer.stop.wait(gap_s) or time.monotonic() - t0 > max_s:
                        return  # drop the connection
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(json.dumps({"data": [{"id": "m"}]}).encode(), False)
                elif self.path == "/slow":
                    self._send(answer, True)
                else:
                    self._send(b"{}", False)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts += 1
                self._send(answer, True)

            def log_message(self, *a):
                pass

        self.httpd = _Server(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def trickle():
    made = []

    def make(**kw):
        made.append(Trickle(**kw))
        return made[-1]

    yield make
    for t in made:
        t.close()


def test_a_trickling_answer_is_cut_at_the_deadline(trickle):
    """One byte every 0.25 s: each wait between bytes is short, the whole answer takes ~12 s; a
    1 s deadline must cut it after about 1 s, not wait byte after byte."""
    import httpx

    from ets.http import ServerError, request_with_retries

    t = trickle(gap_s=0.25)

    async def go():
        async with httpx.AsyncClient() as client:
            return await request_with_retries(client, "GET", f"{t.url}/slow", retries=0, backoff_s=0.01,
                                              max_backoff_s=0.01, timeout_s=1.0)

    start = time.monotonic()
    with pytest.raises(ServerError, match="within the 1 s request timeout"):
        asyncio.run(go())
    assert time.monotonic() - start < 4  # the whole answer would take ~12 s (cut by the stand-in at 8)


def test_a_trickling_policy_server_is_marked_down_in_bounded_time(tmp_path, toy, no_tokenizer, trickle, capsys):
    t = trickle(gap_s=0.25, max_s=6.0)
    code, out, err, took = _main(["run", "--policy", _with_secret(t.url), "--prm", "mock", "--request-timeout", "1",
                                  *toy, "--limit", "2"], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert "every policy server is down" in err and "request timeout" in err, err
    assert "2 problem(s) not finished because of it: t0, t1" in err
    assert took < 20, took  # three 1 s deadlines and 1.5 s of backoff (~5 s), then nothing is sent
    assert t.posts <= 4
    [session] = [json.loads(x) for f in tmp_path.glob("runs/*/sessions.jsonl") for x in f.read_text().splitlines()]
    assert session["engine"]["retries_deadline"] >= 1  # the run records the retries it made, and why
    _no_secret_anywhere(tmp_path, out, err)


def test_a_busy_but_progressing_server_is_waited_for_not_sent_the_request_again(stand_in):
    """The answer takes 2.5 s, the deadline is 1 s, and the server's token counters grow all the
    while (a queue, not a fault): the request is waited for, sent once, and the waits counted."""
    from ets.config import SamplingConfig
    from ets.engines.base import Expansion
    from ets.engines.server import ServerPolicy
    from ets.tree import Tree

    fake, tokens, pause = FakeVLLM(delimiter_only=True), [0], threading.Event()

    def queued(method, path, body):
        if path == "/metrics":
            tokens[0] += 7
            return 200, f'vllm:generation_tokens_total{{engine="0"}} {tokens[0]}.0\n'
        if path == "/v1/completions":
            pause.wait(2.5)
        return fake(method, path, body)

    srv = stand_in(queued)
    policy = ServerPolicy(srv.url, model="m", timeout_s=1, measure=False, prefill_first=False, backoff_s=0.01)

    async def go():
        try:
            return await policy.expand([Expansion(Tree([1, 2], "p").root, 2)], SamplingConfig(max_step_tokens=8))
        finally:
            await policy.aclose()

    t = time.monotonic()
    try:
        steps = asyncio.run(go())
    finally:
        pause.set()
    assert len(steps[0]) == 2 and time.monotonic() - t < 8
    assert len(srv.posts("/v1/completions")) == 1  # not sent again
    st = policy.stats()["servers"][srv.url]
    assert st["retries"] == 0 and st["busy_waits"] >= 1 and policy.stats()["busy_waits"] == st["busy_waits"]


def test_model_lookup_is_made_once_per_server_per_run(tmp_path, toy, no_tokenizer, stand_in, capsys):
    fake = FakeVLLM(delimiter_only=True)
    srv = stand_in(fake)
    code, out, err, _ = _main(["run", "--policy", srv.url, "--prm", "mock", *toy, "--concurrency", "4"], capsys)
    assert code == 0, err
    assert [p for m, p, _ in srv.requests].count("/v1/models") == 1


@pytest.mark.slow  # several seconds: in the full run (-m "") and CI
def test_a_failing_model_lookup_is_retried_then_kept_for_the_run(tmp_path, toy, no_tokenizer, stand_in, capsys):
    fake = FakeVLLM(delimiter_only=True)

    def handler(method, path, body):
        if path == "/v1/models":
            return 503, {"error": "loading"}
        return fake(method, path, body)

    srv = stand_in(handler)
    code, out, err, took = _main(["run", "--policy", srv.url, "--prm", "mock", *toy, "--concurrency", "4"], capsys)
    assert code == 1 and "Traceback" not in err and "HTTP 503" in err
    lookups = [p for m, p, _ in srv.requests].count("/v1/models")
    assert lookups == 5  # one lookup for the run, retried (4 retries), not one per problem
    assert not srv.posts("/v1/completions")
    assert took < 15


def test_a_hung_model_lookup_marks_the_server_down_within_the_deadline(stand_in):
    """The synchronous lookup (the tokenizer's, a learned PRM's check) has the run's deadline and
    health bookkeeping too, not a fixed 30 s; and its failure is kept."""
    from ets.engines.server import ServerDown, ServerError, ServerPolicy

    release = threading.Event()

    def hang(method, path, body):
        release.wait(10)
        return 503, {}

    srv = stand_in(hang)
    policy = ServerPolicy(srv.url, timeout_s=1, retries=2, backoff_s=0.01, measure=False)
    start = time.monotonic()
    try:
        with pytest.raises(ServerError):
            policy._model_name_sync(policy.servers[0])
        took = time.monotonic() - start
        assert took < 8, took  # the old lookup: a fixed 30 s, no health bookkeeping
        assert policy.servers[0].down  # counted toward marking it down: hung
        with pytest.raises(ServerDown):  # asked again: at once, nothing sent
            policy._model_name_sync(policy.servers[0])
        assert time.monotonic() - start - took < 0.5
    finally:
        release.set()


# -- 3. advisory figures never fail a search; answers are checked ------------------------------------

@pytest.mark.parametrize("page", [
    'vllm:kv_cache_usage_perc{engine="0"} NaN\nvllm:prefix_cache_hits_total{engine="0"} +Inf\n'
    'vllm:prefix_cache_queries_total{engine="0"} -Inf\n'
    'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="+Inf"} 1.0\n'
    'vllm:num_preemptions_total{engine="0"} NaN\n',
    'vllm:kv_cache_usage_perc{engine="0"} 1e308\n'
    'vllm:cache_config_info{block_size="1e308",engine="0",num_gpu_blocks="1e308"} 1.0\n',
    "\x00\x01 garbage {{{ not a metrics page\n" * 50,
], ids=["nan-inf", "overflow", "garbage"])
def test_a_bad_metrics_page_drops_the_figures_and_says_so_once(page, tmp_path, toy, no_tokenizer, stand_in, capsys):
    fake = FakeVLLM(delimiter_only=True)
    srv = stand_in(lambda m, p, b: (200, page) if p == "/metrics" else fake(m, p, b))
    code, out, err, _ = _main(["run", "--policy", srv.url, "--prm", "mock", *toy, "--concurrency", "2"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert err.count("Said once") == 1, err
    assert len(list(tmp_path.glob("runs/*/problems/*.json"))) == 4


def test_metrics_parser_drops_non_finite_values():
    from ets.engines.server_metrics import parse_prometheus, snapshot

    dropped = []
    text = 'a 1\nb NaN\nc +Inf\nd -Inf\ne 2.5\n'
    assert [(s.name, s.value) for s in parse_prometheus(text, dropped)] == [("a", 1.0), ("e", 2.5)]
    assert dropped == ["b", "c", "d"]
    snap = snapshot('vllm:kv_cache_usage_perc{engine="0"} 0.5\n'
                    'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="NaN"} 1\n')
    assert snap.kv_used_tokens is None and snap.kv_capacity_tokens is None


class _Tok:
    """A tokenizer stand-in of `n` tokens."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


@pytest.mark.parametrize("ids,phrase", [([5, 600, 7], "token id 600"), ([5, -1], "token id -1"),
                                        ([5, 1.5], "not a list of integers"), ("abc", "not a list of integers")])
def test_token_ids_outside_the_vocabulary_are_refused(ids, phrase, stand_in):
    from ets.config import SamplingConfig
    from ets.engines.base import Expansion
    from ets.engines.server import ServerError, ServerPolicy
    from ets.tree import Tree

    srv = stand_in(lambda m, p, b: (200, _completion([_choice(ids)])))
    policy = ServerPolicy(_with_secret(srv.url), model="m", measure=False, prefill_first=False)
    policy._tok = _Tok(500)

    async def go():
        try:
            return await policy.expand([Expansion(Tree([1, 2], "p").root, 1)], SamplingConfig(max_step_tokens=8))
        finally:
            await policy.aclose()

    with pytest.raises(ServerError) as e:
        asyncio.run(go())
    msg = str(e.value)
    assert phrase in msg and "http://***@127.0.0.1" in msg and SECRET not in msg
    assert "\n" not in msg


def test_a_server_answer_of_the_wrong_shape_fails_the_problem_with_the_servers_name(stand_in):
    from ets.config import SamplingConfig
    from ets.engines.base import Expansion
    from ets.engines.server import ServerError, ServerPolicy
    from ets.tree import Tree

    for answer in ([1, 2, 3], {"choices": "none"}, {"choices": [1, 2]}):
        srv = stand_in(lambda m, p, b, answer=answer: (200, answer))
        policy = ServerPolicy(srv.url, model="m", measure=False, prefill_first=False)

        async def go():
            try:
                return await policy.expand([Expansion(Tree([1], "p").root, 1)], SamplingConfig(max_step_tokens=8))
            finally:
                await policy.aclose()

        with pytest.raises(ServerError, match="without a list of choices"):
            asyncio.run(go())


def test_served_prm_vectors_are_checked(stand_in):
    from ets.engines.base import DELIMITER
    from ets.prm.base import PRMError, ScoreRequest
    from ets.prm.served import ServedPRM
    from ets.tree import Tree

    for vec, phrase in ((["a", "b"], "not a number or a list"), ([[1, 2]], "not a number or a list"),
                        ([], "not a number or a list"), ([0.0, float("inf")], "non-finite score")):
        srv = stand_in(lambda m, p, b, vec=vec: (200, {"data": [{"index": 0, "data": [vec]}]}))
        prm = ServedPRM(_with_secret(srv.url))
        tree = Tree([1], "q")
        node = tree.add_child(tree.root, [2], "Step.\n\n", DELIMITER)

        async def go():
            try:
                return await prm.score([ScoreRequest("q?", node)])
            finally:
                await prm.aclose()

        with pytest.raises(PRMError) as e:
            asyncio.run(go())
        assert phrase in str(e.value) and "http://***@127.0.0.1" in str(e.value) and SECRET not in str(e.value)
        assert "step-delimiter" not in e.value.hint


# -- 4. corrupt files ---------------------------------------------------------------------------------

def _learned_file(tmp_path: Path, name="ok.npz", dim=None, stats=None):
    from ets.prm import learned

    stats = list(learned.STAT_NAMES) if stats is None else stats
    dim = len(stats) if dim is None else dim
    return learned.save(tmp_path / name, np.zeros(dim), 0.0, np.zeros(dim), np.ones(dim),
                        {"policy": "mock", "features": {"version": learned.FEATURES_VERSION, "set": "stats",
                                                        "stats": stats}})


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "wrong-shape", "nan-weights"])
def test_a_corrupt_learned_prm_file_is_refused_at_load_with_one_line(kind, tmp_path, capsys):
    from ets.prm import learned

    good = _learned_file(tmp_path)
    bad = tmp_path / "bad.npz"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "garbage":
        bad.write_bytes(os.urandom(300))
    elif kind == "wrong-shape":
        _learned_file(tmp_path, "bad.npz", dim=5)
    else:
        learned.save(bad, np.full(len(learned.STAT_NAMES), np.nan), 0.0, np.zeros(len(learned.STAT_NAMES)),
                     np.ones(len(learned.STAT_NAMES)),
                     {"policy": "mock", "features": {"version": learned.FEATURES_VERSION, "set": "stats",
                                                     "stats": list(learned.STAT_NAMES)}})
    with pytest.raises(ValueError, match="ets train-prm"):
        learned.load(bad)
    learned.load(good)  # the good one loads
    data = tmp_path / "toy.jsonl"
    data.write_text(json.dumps({"question": "6*7?", "answer": "42"}) + "\n")
    before = _files(tmp_path)
    code, out, err, took = _main(["run", "--policy", "mock", "--prm", f"learned:{bad}", "--embedder", "hash",
                                  "--no-progress", "--dataset", data, "--runs-dir", tmp_path / "runs"], capsys)
    assert code == 2 and "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "ets train-prm" in lines[0], err
    assert _files(tmp_path) == before  # no run directory
    assert took < 20


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_dataset_is_refused_as_not_a_regular_file(tmp_path, capsys):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    code, out, err, took = _main(["run", *MOCK, "--dataset", fifo, "--runs-dir", tmp_path / "runs"], capsys)
    assert code == 2 and "not a regular file" in err and "Traceback" not in err, err
    assert took < 10 and not (tmp_path / "runs").exists()
    if Path("/dev/null").exists():
        code, out, err, _ = _main(["run", *MOCK, "--dataset", "/dev/null", "--runs-dir", tmp_path / "runs"], capsys)
        assert code == 2 and "not a regular file" in err


# -- 5. values: bounded, and compare checks everything up front --------------------------------------

def _compare(tmp, *extra):
    return ["compare", *MOCK, "--dataset", tmp / "toy.jsonl", "--runs-dir", tmp / "runs", "--limit", "1", *extra]


VALUE_CASES = [
    ("compare-param-not-a-number", lambda t: _compare(t, "--methods", "ets:lambda_c=abc"), "lambda_c='abc' is not a number"),
    ("compare-param-nan", lambda t: _compare(t, "--methods", "ets:lambda_c=nan"), "lambda_c=nan is not a finite"),
    ("compare-widths-empty-entry", lambda t: _compare(t, "--widths", "4,,8"), "'4,,8': an empty entry"),
    ("compare-widths-trailing-comma", lambda t: _compare(t, "--widths=4,"), "an empty entry"),
    ("compare-width-too-large", lambda t: _compare(t, "--widths", "4,100000"), "--widths 100000: at most 4096"),
    ("compare-one-bad-prm", lambda t: _compare(t, "--prm", "mock,bogus"), "--prm bogus: unknown PRM"),
    ("compare-one-missing-prm", lambda t: _compare(t, "--prm", "mock,learned:/nonexistent.npz"), "/nonexistent.npz"),
    ("run-width-huge", lambda t: ["run", *MOCK, "--dataset", t / "toy.jsonl", "--runs-dir", t / "runs",
                                  "--width", "1000000000"], "--width 1000000000: at most 4096"),
    ("run-concurrency-huge", lambda t: ["run", *MOCK, "--dataset", t / "toy.jsonl", "--runs-dir", t / "runs",
                                        "--concurrency", "10000000"], "--concurrency 10000000: at most"),
    ("run-max-tokens-huge", lambda t: ["run", *MOCK, "--dataset", t / "toy.jsonl", "--runs-dir", t / "runs",
                                       "--max-tokens", "100000000000"], "--max-tokens 100000000000: at most"),
    ("run-max-depth-huge", lambda t: ["run", *MOCK, "--dataset", t / "toy.jsonl", "--runs-dir", t / "runs",
                                      "--max-depth", "1000000000"], "--max-depth 1000000000: at most"),
]


@pytest.mark.parametrize("name,argv,phrase", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_absurd_values_give_one_line_and_leave_nothing(name, argv, phrase, tmp_path, capsys):
    (tmp_path / "toy.jsonl").write_text(json.dumps({"id": "a", "question": "6*7?", "answer": "42"}) + "\n")
    before = _files(tmp_path)
    code, out, err, took = _main(argv(tmp_path), capsys)
    assert code == 2, err
    assert phrase in err and "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert _files(tmp_path) == before  # no run directory, nothing half-written
    assert took < 20


# -- 6. interrupts and server-wide failures ----------------------------------------------------------

def test_ctrl_c_during_start_up_prints_no_traceback(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        code, out, err, _ = _main(["run"], capsys)
    except KeyboardInterrupt:  # (caught here, or it would end the whole test session)
        pytest.fail("KeyboardInterrupt escaped ets.cli.main: a traceback for the user")
    assert code == 130 and "interrupted" in err and "Traceback" not in err


@pytest.mark.slow  # several seconds: in the full run (-m "") and CI
def test_a_server_wide_failure_is_printed_once_with_the_problems_listed(tmp_path, toy, no_tokenizer, stand_in, capsys):
    srv = stand_in(_policy_fault("http-500"))
    code, out, err, took = _main(["run", "--policy", _with_secret(srv.url), "--prm", "mock", *toy,
                                  "--concurrency", "4"], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert err.count("HTTP 500") == 1, err
    import re

    listed = re.findall(r"4 problem\(s\) not finished because of it: (.*)", err)
    assert len(listed) == 1 and sorted(listed[0].split(", ")) == ["t0", "t1", "t2", "t3"], err
    assert err.count("fix:") == 1
    assert len(list(tmp_path.glob("runs/*/errors/*.json"))) == 4  # each problem's error file is kept
    assert took < 40  # 5 tries, 7.5 s of backoff, the four problems at once
    _no_secret_anywhere(tmp_path, out, err)


def test_finished_problems_are_kept_and_a_rerun_resumes(tmp_path, toy, no_tokenizer, stand_in, capsys):
    """Problem t2 meets a broken answer (negative token ids); the rest finish. A rerun against a
    repaired server computes only t2."""
    fake, broken = FakeVLLM(delimiter_only=True), {"on": True}

    def handler(method, path, body):
        if path == "/v1/completions" and body["prompt"][0] == 1002 and broken["on"]:
            return 200, _completion([_choice([5, -3], k) for k in range(body["n"])])
        return fake(method, path, body)

    srv = stand_in(handler)
    argv = ["run", "--policy", srv.url, "--prm", "mock", *toy]
    code, out, err, _ = _main(argv, capsys)
    assert code == 1 and "returned token id -3" in err and "problem 't2'" in err
    assert sorted(p.stem for p in tmp_path.glob("runs/*/problems/*.json")) == ["t0", "t1", "t3"]
    broken["on"] = False
    before = len(srv.posts("/v1/completions"))
    code, out, err, _ = _main(argv, capsys)
    assert code == 0, err
    assert sorted(p.stem for p in tmp_path.glob("runs/*/problems/*.json")) == ["t0", "t1", "t2", "t3"]
    assert {b["prompt"][0] for b in srv.posts("/v1/completions")[before:]} == {1002}  # only t2 again
