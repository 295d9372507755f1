"""`ets api` (ets.api) as a real process on 127.0.0.1, asked by the official `openai` client (and
raw httpx for what that client cannot send), with the mock policy and mock PRM.

Every server is a subprocess started here and always terminated (killed if it does not stop);
every client call has a timeout, and every test runs under an alarm."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

import ets.cli as cli  # noqa: E402
from ets.treeio import tree_from_dict  # noqa: E402

MOCK = ["--policy", "mock", "--prm", "mock", "--embedder", "hash"]
QUESTION = "What is 6 * 7?"
TEST_S = 120  # no test runs longer than this
SLOW_S = 0.3  # seconds each expand of the slow mock policy waits
# `ets api` with a mock policy whose expand waits SLOW_S and logs "EXPAND" first (the CLI's own
# entry point, ets.cli.main, so the dispatch is the one users get)
SLOW_BOOT = f"""
import asyncio, sys
import ets.engines.mock as m
real = m.MockPolicy.expand
async def slow(self, requests, sampling):
    print("EXPAND", flush=True, file=sys.stderr)
    await asyncio.sleep({SLOW_S})
    return await real(self, requests, sampling)
m.MockPolicy.expand = slow
from ets.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def bounded():
    """Every test ends within TEST_S seconds (an alarm raises in it otherwise)."""
    def expire(signum, frame):
        raise TimeoutError(f"test ran past {TEST_S} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


class Api:
    """A running `ets api` process: its URL, its runs dir and its stderr lines so far."""

    def __init__(self, runs: Path, extra: list[str], boot: str | None = None, env: dict | None = None):
        self.runs = runs
        head = [sys.executable, "-c", boot] if boot else [sys.executable, "-m", "ets.cli"]
        self.proc = subprocess.Popen([*head, "api", *MOCK, "--port", "0", "--runs-dir", str(runs), *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(60):
            self.stop()
            raise RuntimeError("ets api did not start in 60 s:\n" + self.log())
        self.url = re.search(r"listening on (http://\S+)", self.log()).group(1)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on" in line:
                self._ready.set()
        self._ready.set()  # ended: the waiter sees why in the log

    def log(self) -> str:
        return "".join(self.lines)

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"),
                             timeout=kw.pop("timeout", 60), max_retries=0, **kw)

    def wait_log(self, text: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > end:
                raise AssertionError(f"{text!r} not in the server's log within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def record(self, ets: dict) -> dict:
        path = Path(ets["run"]) / "problems" / f"{ets['problem_id']}.json"
        return json.loads(path.read_text())

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _start(tmp_path_factory, name: str, *extra: str, boot: str | None = None, env: dict | None = None):
    return Api(tmp_path_factory.mktemp(name) / "runs", list(extra), boot, env)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    server = _start(tmp_path_factory, "api", "--models", "ets-w8,rebase-w8,best_of_n-w4")
    try:
        yield server
    finally:
        assert server.stop() == 0 and "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="module")
def slow_api(tmp_path_factory):
    server = _start(tmp_path_factory, "slow", "--models", "ets-w4", boot=SLOW_BOOT)
    try:
        yield server
    finally:
        assert server.stop() == 0 and "Traceback" not in server.log(), server.log()


def _path_text(record: dict, node_id: int) -> str:
    tree = tree_from_dict(record["tree"])
    return "".join(tree.nodes[node_id].step_texts())


# -- answers and usage ---------------------------------------------------------------------------

def test_chat_completion_is_the_searched_solution_with_honest_usage(api, tmp_path):
    out = api.client().chat.completions.create(
        model="ets-w8", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                                  {"role": "assistant", "content": "hi"}, {"role": "user", "content": QUESTION}])
    assert out.object == "chat.completion" and out.model == "ets-w8" and out.id.startswith("chatcmpl-")
    ets = out.model_extra["ets"]
    rec = api.record(ets)
    # the question is the last user message; the record is the problem, under the config's run dir
    assert rec["question"] == QUESTION and rec["id"] == out.id == ets["problem_id"]
    assert Path(ets["run"]).name.startswith("ets-w8-") and (ets["strategy"], ets["width"]) == ("ets", 8)
    # the answer is the selected solution's whole path text, and the vote's answer
    [choice] = out.choices
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content == _path_text(rec, rec["answer"]["node_id"])
    assert ets["answer"] == rec["answer"]["answer"] is not None and ets["vote"] == rec["answer"]
    # usage: every generated token of the tree; the mock engine reports no prompt tokens, so the prompt's
    nodes = rec["tree"]["nodes"]
    generated = sum(len(n["token_ids"]) for n in nodes[1:])
    assert out.usage.completion_tokens == generated == rec["counters"]["generated_tokens"] > 0
    assert out.usage.prompt_tokens == len(nodes[0]["token_ids"]) > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert ets["usage"]["prompt_tokens_from"].startswith("the prompt")
    assert (ets["kv_mean"], ets["kv_peak"]) == (rec["kv"]["kv_mean"], rec["kv"]["kv_peak"]) and ets["kv_peak"] > 0
    assert rec["correct"] is None and rec["api"]["usage"] == out.usage.model_dump(exclude_none=True)
    # the record's compute: the tree's tokens, and the PRM tokens charged to this request (the mock counts them)
    assert rec["compute"]["generated_tokens"] == generated and rec["compute"]["prm_tokens"] > 0
    # `ets view RUN --problem ID` opens that tree
    html = tmp_path / "tree.html"
    assert cli.main(["view", ets["run"], "--problem", ets["problem_id"], "-o", str(html)]) == 0
    assert "<html" in html.read_text().lower()


def test_completions_endpoint_and_streaming(api):
    client = api.client()
    out = client.completions.create(model="rebase-w8", prompt=QUESTION)
    ets = out.model_extra["ets"]
    rec = api.record(ets)
    assert out.object == "text_completion" and ets["strategy"] == "rebase" and rec["question"] == QUESTION
    assert out.choices[0].text == _path_text(rec, rec["answer"]["node_id"])
    assert out.usage.completion_tokens == rec["counters"]["generated_tokens"]
    # streamed: the same search (the mock is deterministic), sent when it ends
    chunks = list(client.chat.completions.create(model="rebase-w8", messages=[{"role": "user", "content": QUESTION}],
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].text and chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_models_lists_the_configs(api):
    models = {m.id: m.model_extra["ets"] for m in api.client().models.list()}
    assert set(models) == {"ets-w8", "rebase-w8", "best_of_n-w4", "ets"}
    assert models["best_of_n-w4"]["strategy"] == "best_of_n" and models["best_of_n-w4"]["width"] == 4
    assert models["ets"]["base"] is True and models["ets"]["width"] == 4  # --strategy/--width defaults
    assert api.client().models.retrieve("rebase-w8").id == "rebase-w8"


def test_base_model_with_an_ets_object(api):
    out = api.client().chat.completions.create(
        model="ets", messages=[{"role": "user", "content": QUESTION}],
        temperature=0.5, max_tokens=64, seed=7,
        extra_body={"ets": {"strategy": "ets", "width": 3, "lambda_c": 2.0, "vote": "majority"}})
    ets = out.model_extra["ets"]
    cfg = json.loads((Path(ets["run"]) / "config.json").read_text())["identity"]["search"]
    assert (cfg["strategy"], cfg["width"], cfg["strategy_config"]["lambda_c"]) == ("ets", 3, 2.0)
    assert (cfg["sampling"]["temperature"], cfg["max_tokens"], cfg["seed"]) == (0.5, 64, 7)
    assert ets["vote"]["vote"] == "majority" and Path(ets["run"]).name.startswith("ets-w3-")
    out = api.client().chat.completions.create(model="best_of_n-w4", messages=[{"role": "user", "content": QUESTION}],
                                               extra_body={"ets": {"strategy": "rebase"}})
    assert out.model_extra["ets"]["strategy"] == "rebase" and out.model_extra["ets"]["width"] == 4


# -- bad requests --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, status, code", [
    ({"model": "nope-w4", "messages": [{"role": "user", "content": "q"}]}, 404, "model_not_found"),
    ({"model": "ets-w8", "messages": []}, 400, "missing_messages"),
    ({"model": "ets-w8", "messages": [{"role": "system", "content": "only a system turn"}]}, 400, "missing_messages"),
    ({"model": "ets", "messages": [{"role": "user", "content": "q"}], "extra_body": {"ets": {"width": 0}}},
     400, "width_out_of_range"),
    ({"model": "ets", "messages": [{"role": "user", "content": "q"}], "extra_body": {"ets": {"width": 65}}},
     400, "width_out_of_range"),
    ({"model": "ets", "messages": [{"role": "user", "content": "q"}], "extra_body": {"ets": {"lambda_c": "big"}}},
     400, "invalid_ets_parameter"),
    ({"model": "ets", "messages": [{"role": "user", "content": "q"}], "extra_body": {"ets": {"bogus": 1}}},
     400, "invalid_ets_parameter"),
    ({"model": "ets", "messages": [{"role": "user", "content": "q"}], "extra_body": {"ets": {"strategy": "x"}}},
     400, "invalid_strategy"),
    ({"model": "ets", "messages": [{"role": "user", "content": "q"}], "temperature": -1}, 400, "invalid_value"),
])
def test_bad_requests_get_openai_errors(api, kwargs, status, code):
    with pytest.raises(openai.APIStatusError) as e:
        api.client().chat.completions.create(**kwargs)
    assert e.value.status_code == status and e.value.body["code"] == code
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]


def test_bad_json_and_paths_raw(api):
    with httpx.Client(base_url=api.url, timeout=30) as h:
        for r, status, code in [
            (h.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json"),
            (h.post("/v1/chat/completions", content=b"[1, 2]"), 400, "invalid_json"),
            (h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]}), 400,
             "missing_model"),
            (h.post("/v1/completions", json={"model": "ets"}), 400, "missing_prompt"),
            (h.get("/v1/nothing"), 404, "not_found"),
            (h.get("/v1/chat/completions"), 405, "method_not_allowed"),
            (h.get("/v1/models/nope"), 404, "model_not_found"),
        ]:
            assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
            assert r.json()["error"]["code"] == code
        assert h.get("/health").json() == {"status": "ok", "searches_in_flight": 0}


# -- concurrency and disconnects -----------------------------------------------------------------

def test_concurrent_requests_share_the_engine(slow_api):
    async def ask(client, k):
        return await client.chat.completions.create(model="ets-w4",
                                                    messages=[{"role": "user", "content": f"{QUESTION} ({k})"}])

    async def main():
        async with openai.AsyncOpenAI(base_url=slow_api.url + "/v1", api_key="unused", timeout=90,
                                      max_retries=0) as client:
            return await asyncio.wait_for(asyncio.gather(*(ask(client, k) for k in range(4))), 100)

    outs = asyncio.run(main())
    recs = [slow_api.record(o.model_extra["ets"]) for o in outs]
    assert sorted(r["question"] for r in recs) == sorted(f"{QUESTION} ({k})" for k in range(4))
    assert len({o.id for o in outs}) == 4
    for o, r in zip(outs, recs):
        assert o.usage.completion_tokens == r["counters"]["generated_tokens"] > 0
        assert o.choices[0].message.content == _path_text(r, r["answer"]["node_id"])
    # all four were searched at once: each saw the three others in flight
    assert [o.model_extra["ets"]["usage"]["shared_with"] for o in outs] == [3, 3, 3, 3]


def test_client_disconnect_stops_the_search(slow_api):
    before = set(slow_api.runs.glob("*/problems/*.json"))
    started = slow_api.log().count("started")
    with pytest.raises(openai.APITimeoutError):  # the client gives up mid-search and closes its connection
        slow_api.client(timeout=SLOW_S * 2.5).chat.completions.create(
            model="ets-w4", messages=[{"role": "user", "content": "a question nobody waits for"}])
    slow_api.wait_log("cancelled (client disconnected)")
    assert slow_api.log().count("started") == started + 1
    expands = slow_api.log().count("EXPAND")
    time.sleep(SLOW_S * 4)  # a running search would have expanded again by now
    assert slow_api.log().count("EXPAND") == expands
    with httpx.Client(base_url=slow_api.url, timeout=30) as h:
        assert h.get("/health").json()["searches_in_flight"] == 0  # no search task left
    assert set(slow_api.runs.glob("*/problems/*.json")) == before  # nothing saved for it
    assert not list(slow_api.runs.glob("*/claims/*"))
    # the server goes on answering
    out = slow_api.client().chat.completions.create(model="ets-w4", messages=[{"role": "user", "content": QUESTION}])
    assert out.usage.completion_tokens > 0


# -- the key -------------------------------------------------------------------------------------

def test_api_key_is_checked_and_never_written(tmp_path_factory):
    key = "sk-test-4f1c9e0b7a"
    server = _start(tmp_path_factory, "keyed", "--models", "best_of_n-w2", env={"ETS_API_KEY": key})
    try:
        msg = [{"role": "user", "content": QUESTION}]
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(api_key="not-the-key").chat.completions.create(model="best_of_n-w2", messages=msg)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with httpx.Client(base_url=server.url, timeout=30) as h:  # no key, or the key under another scheme
            for headers in ({}, {"Authorization": f"Basic {key}"}, {"Authorization": key}):
                for r in (h.get("/v1/models", headers=headers),
                          h.post("/v1/chat/completions", json={"model": "best_of_n-w2", "messages": msg},
                                 headers=headers)):
                    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert h.get("/health").status_code == 200  # a liveness probe needs no key
        out = server.client(api_key=key).chat.completions.create(model="best_of_n-w2", messages=msg)
        assert out.usage.completion_tokens > 0
        assert [m.id for m in server.client(api_key=key).models.list()] == ["best_of_n-w2", "ets"]
    finally:
        assert server.stop() == 0  # SIGTERM: a clean stop
    assert "stopped" in server.log() and key not in server.log() and "Traceback" not in server.log()
    files = [p for p in server.runs.rglob("*") if p.is_file()]
    assert files and not any(key in p.read_text() for p in files)
    assert (Path(out.model_extra["ets"]["run"]) / "summary.json").is_file()  # written at the stop
