"""Bad input, table-driven: every case ends with its exit status, a one-line error that names the
input (the phrase below), no traceback, and nothing new on disk. Then the server faults (hung,
dead, dead mid-run, 5xx, wrong answers) against loopback stand-ins, timed."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

import ets.cli as cli

MOCK = ["--policy", "mock", "--prm", "mock", "--embedder", "hash", "--no-progress"]


def _run(*extra):
    """`ets run` on the toy data set with the mock models, then `extra` (later flags win)."""
    return ["run", *MOCK, "--dataset", "{toy}", "--runs-dir", "{tmp}/runs", *extra]


def _data(text: bytes):
    def make(tmp: Path):
        (tmp / "data.jsonl").write_bytes(text)
    return make


def _model_dir(config: str | None):
    def make(tmp: Path):
        d = tmp / "model"
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(config)
    return make


def _finished_run(tmp: Path):
    """A finished mock run under tmp/done (2 problems)."""
    assert cli.main(["run", *MOCK, "--dataset", str(tmp / "toy.jsonl"), "--runs-dir", str(tmp / "done"),
                     "--limit", "2"]) == 0
    [d] = list((tmp / "done").iterdir())
    d.rename(tmp / "done" / "r")


def _config(text: str):
    def make(tmp: Path):
        (tmp / "fake").mkdir()
        (tmp / "fake" / "config.json").write_text(text)
    return make


GOOD_CFG = json.dumps({"format": 1, "name": "fake", "hash": "deadbeef",
                       "identity": {"search": {"strategy": "ets", "width": 4}}, "run": {}})
DATA = "{tmp}/data.jsonl"

# (id, argv, setup, exit status, phrase the message must contain)
CASES = [
    # -- numbers and choices ------------------------------------------------------------------
    ("width-0", _run("--width", "0"), None, 2, "width must be >= 1"),
    ("width-negative", _run("--width", "-3"), None, 2, "width must be >= 1"),
    ("width-text", _run("--width", "abc"), None, 2, "--width: invalid int value"),
    ("limit-negative", _run("--limit", "-1"), None, 2, "limit must be >= 0"),
    ("offset-negative", _run("--offset", "-1"), None, 2, "offset must be >= 0"),
    ("offset-past-end", _run("--offset", "100"), None, 2, "--offset 100: no problems left"),
    ("concurrency-0", _run("--concurrency", "0"), None, 2, "concurrency must be >= 1"),
    ("max-tokens-0", _run("--max-tokens", "0"), None, 2, "max_tokens must be >= 1"),
    ("max-depth-0", _run("--max-depth", "0"), None, 2, "max_depth must be >= 1"),
    ("max-step-tokens-0", _run("--max-step-tokens", "0"), None, 2, "max_step_tokens must be >= 1"),
    ("kv-block-size-0", _run("--kv-block-size", "0"), None, 2, "kv_block_size must be >= 1"),
    ("temperature-negative", _run("--temperature", "-1"), None, 2, "temperature must be >= 0"),
    ("temperature-nan", _run("--temperature", "nan"), None, 2, "--temperature: 'nan' is not a finite number"),
    ("top-p-0", _run("--top-p", "0"), None, 2, "top_p must be in (0, 1]"),
    ("top-p-above-1", _run("--top-p", "1.5"), None, 2, "top_p must be in (0, 1]"),
    ("top-p-inf", _run("--top-p", "inf"), None, 2, "--top-p: 'inf' is not a finite number"),
    ("lambda-c-nan", _run("--lambda-c", "nan"), None, 2, "--lambda-c: 'nan' is not a finite number"),
    ("lambda-c-inf", _run("--lambda-c", "inf"), None, 2, "--lambda-c: 'inf' is not a finite number"),
    ("lambda-s-minus-inf", _run("--lambda-s=-inf"), None, 2, "--lambda-s: '-inf' is not a finite number"),
    ("lambda-c-negative", _run("--lambda-c", "-1"), None, 2, "lambda_c and lambda_s must be >= 0"),
    ("lambda-c-text", _run("--lambda-c", "big"), None, 2, "--lambda-c: 'big' is not a number"),
    ("softmax-temperature-0", _run("--softmax-temperature", "0"), None, 2, "softmax_temperature must be > 0"),
    ("cluster-threshold-nan", _run("--cluster-threshold", "nan"), None, 2, "--cluster-threshold: 'nan'"),
    ("cluster-threshold-negative", _run("--cluster-threshold", "-1"), None, 2, "cluster_threshold is a cosine"),
    ("strategy-unknown", _run("--strategy", "bogus"), None, 2, "unknown strategy 'bogus'"),
    ("flag-not-of-strategy", _run("--strategy", "beam", "--lambda-c", "1"), None, 2, "does not apply to beam"),
    ("step-delimiter-empty", _run("--step-delimiter", ""), None, 2, "step_delimiter must not be empty"),
    ("embedder-unknown", _run("--embedder", "bogus"), None, 2, "unknown embedder 'bogus'"),
    ("vote-unknown", _run("--vote", "bogus"), None, 2, "--vote: invalid choice"),
    ("agg-unknown", _run("--agg", "bogus"), None, 2, "--agg: invalid choice"),
    ("node-cost-unknown", _run("--node-cost", "bogus"), None, 2, "--node-cost: invalid choice"),
    ("solver-unknown", _run("--solver", "bogus"), None, 2, "--solver: invalid choice"),
    ("kv-capacity-with-mock", _run("--kv-capacity", "100"), None, 2, "kv_capacity applies to the embedded engine only"),
    ("request-timeout-0", _run("--request-timeout", "0"), None, 2, "positive number of seconds"),
    ("request-timeout-nan", _run("--request-timeout", "nan"), None, 2, "--request-timeout: 'nan' is not a finite"),
    ("request-timeout-text", _run("--request-timeout", "soon"), None, 2, "'soon' is not a number"),
    ("unknown-flag", _run("--bogus-flag"), None, 2, "unrecognized arguments: --bogus-flag"),
    ("unknown-verb", ["frobnicate"], None, 2, "invalid choice: 'frobnicate'"),
    ("device-unknown", _run("--device", "quantum"), None, 2, "--device quantum: not a device name"),
    # -- models ---------------------------------------------------------------------------------
    ("policy-missing-folder", _run("--policy", "/nonexistent/model"), None, 2, "--policy /nonexistent/model: no such model"),
    ("policy-typo-never-a-hub", _run("--policy", "mok"), None, 2, "--policy mok: no such model folder"),
    ("policy-ftp", _run("--policy", "ftp://example.com/m"), None, 2, "is not an http(s) URL"),
    ("policy-no-scheme", _run("--policy", "127.0.0.1:8001"), None, 2, "--policy http://127.0.0.1:8001"),
    ("policy-no-host", _run("--policy", "http://"), None, 2, "--policy"),
    ("policy-port-out-of-range", _run("--policy", "http://127.0.0.1:99999"), None, 2, "--policy"),
    ("policy-one-bad-url-of-two", _run("--policy", "http://127.0.0.1:8001,ftp://b"), None, 2, "'ftp://b' is not an http(s)"),
    ("policy-credentials-redacted", _run("--policy", "ftp://user:hunter2@host"), None, 2, "ftp://***@host"),
    ("policy-bad-config-json", _run("--policy", "{tmp}/model"), _model_dir("{not json"), 2, "config.json is not valid JSON"),
    ("policy-folder-without-config", _run("--policy", "{tmp}/model"), _model_dir(None), 2, "has no config.json"),
    ("policy-config-without-model-type", _run("--policy", "{tmp}/model"), _model_dir("{}"), 2, "names no model_type"),
    ("policy-missing-gguf", _run("--policy", "{tmp}/m.gguf"), None, 2, "no such GGUF file"),
    ("prm-math-shepherd-missing", _run("--prm", "math-shepherd:/nonexistent"), None, 2, "--prm math-shepherd:/nonexistent: no such"),
    ("prm-qwen-missing", _run("--prm", "qwen-prm:/nonexistent"), None, 2, "--prm qwen-prm:/nonexistent: no such"),
    ("prm-unknown", _run("--prm", "bogus"), None, 2, "--prm bogus: unknown PRM"),
    ("prm-kind-without-path", _run("--prm", "math-shepherd:"), None, 2, "nothing after 'math-shepherd:'; give a path or URL"),
    ("prm-ftp", _run("--prm", "ftp://x/y"), None, 2, "--prm: 'ftp://x/y' is not an http(s) URL"),
    # -- data sets ----------------------------------------------------------------------------------
    ("dataset-directory", _run("--dataset", "{tmp}"), None, 2, "is a directory: --dataset takes a JSONL file"),
    ("dataset-missing", _run("--dataset", "/nonexistent.jsonl"), None, 2, "unknown data set '/nonexistent.jsonl'"),
    ("dataset-not-utf8", _run("--dataset", DATA), _data(b'{"question": "a", "answer": "1"}\n{"question": "\xff"}\n'),
     2, "data.jsonl:2: not UTF-8"),
    ("dataset-bad-json", _run("--dataset", DATA), _data(b'{"question": "a", "answer": "1"}\n{"question": \n'),
     2, "data.jsonl:2: not valid JSON"),
    ("dataset-empty", _run("--dataset", DATA), _data(b"\n\n"), 2, "no problems in the file"),
    ("dataset-missing-field", _run("--dataset", DATA), _data(b'{"question": "a"}\n'), 2, "data.jsonl:1: missing or empty field"),
    ("dataset-not-object", _run("--dataset", DATA), _data(b'[1, 2]\n'), 2, "data.jsonl:1: expected a JSON object"),
    ("dataset-duplicate-ids", _run("--dataset", DATA, "--id-field", "id"),
     _data(b'{"id": 1, "question": "a", "answer": "1"}\n{"id": 1, "question": "b", "answer": "2"}\n'), 2, "duplicate id '1'"),
    ("ids-unknown", _run("--ids", "nope"), None, 2, "unknown problem id(s) ['nope']"),
    ("id-field-missing", _run("--id-field", "nothere", "--dataset", DATA), _data(b'{"question": "a", "answer": "1"}\n'),
     2, "data.jsonl:1: missing or empty field(s) ['nothere']"),
    # -- directories ----------------------------------------------------------------------------------
    ("resume-missing", _run("--resume", "{tmp}/nothere"), None, 2, "--resume {tmp}/nothere: no such run directory"),
    ("resume-a-file", _run("--resume", "{toy}"), None, 2, "is a file; give a run directory"),
    ("resume-not-a-run", _run("--resume", "{tmp}/empty"), lambda t: (t / "empty").mkdir(), 2, "not a run directory"),
    ("resume-other-config", _run("--resume", "{tmp}/fake"), _config(GOOD_CFG), 2, "was made with another configuration"),
    ("resume-corrupt-config", _run("--resume", "{tmp}/fake"), _config("{oops"), 2, "fake/config.json: not valid JSON"),
    ("resume-config-wrong-shape", _run("--resume", "{tmp}/fake"), _config("[1, 2]"), 2, "not an ets run config"),
    ("runs-dir-is-a-file", _run("--runs-dir", "{toy}"), None, 2, "--runs-dir {toy}: is a file"),
    ("runs-dir-under-a-file", _run("--runs-dir", "{toy}/runs"), None, 2, "is a file, so the directory cannot be made"),
    ("runs-dir-read-only", _run("--runs-dir", "{tmp}/ro/runs"), lambda t: ((t / "ro").mkdir(), os.chmod(t / "ro", 0o555)),
     2, "is not writable"),
    # -- score / view ----------------------------------------------------------------------------------
    ("score-missing", ["score", "{tmp}/nothere"], None, 2, "is not a run directory (no config.json)"),
    ("score-a-file", ["score", "{toy}"], None, 2, "is not a run directory"),
    ("score-corrupt-config", ["score", "{tmp}/fake"], _config("\xff{"), 2, "fake/config.json: not valid JSON"),
    ("score-config-wrong-shape", ["score", "{tmp}/fake"], _config('{"identity": 3}'), 2, "not an ets run config"),
    ("score-vote-unknown", ["score", "{tmp}/done/r", "--vote", "bogus"], _finished_run, 2, "unknown vote/agg ['bogus']"),
    ("score-agg-unknown", ["score", "{tmp}/done/r", "--agg", "bogus"], _finished_run, 2, "unknown vote/agg ['bogus']"),
    ("score-no-dir", ["score"], None, 2, "the following arguments are required: RUN_DIR"),
    ("view-missing", ["view", "{tmp}/nothere"], None, 2, "is not a run directory"),
    ("view-output-a-directory", ["view", "{tmp}/done/r", "-o", "{tmp}"], _finished_run, 2, "-o {tmp}: is a directory"),
    ("view-problem-unknown", ["view", "{tmp}/done/r", "--problem", "nope"], _finished_run, 2, "no finished problem 'nope'"),
    ("view-no-problem-yet", ["view", "{tmp}/fake"], _config(GOOD_CFG), 2, "has no finished problem yet"),
    # -- compare (its own validation: it must be clean too) ----------------------------------------------
    ("compare-method-unknown", ["compare", *MOCK, "--methods", "bogus", "--dataset", "{toy}", "--runs-dir", "{tmp}/runs"],
     None, 2, "unknown strategy 'bogus'"),
    ("compare-widths-text", ["compare", *MOCK, "--widths", "a,b", "--dataset", "{toy}"], None, 2, "--widths: invalid"),
    ("compare-lambda-nan", ["compare", *MOCK, "--lambda-c", "nan", "--dataset", "{toy}"], None, 2, "'nan' is not a finite"),
]


def _tree_snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = None if p.is_dir() else p.stat().st_size
    return out


def test_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,argv,setup,status,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, argv, setup, status, phrase, tmp_path, capsys, monkeypatch):
    if name == "runs-dir-read-only" and os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    monkeypatch.chdir(tmp_path)  # view writes its page in the working directory by default
    (tmp_path / "toy.jsonl").write_text("".join(
        json.dumps({"id": f"t{i}", "question": f"problem {i}: 6*7?", "answer": "42"}) + "\n" for i in range(3)))
    if setup is not None:
        setup(tmp_path)
    capsys.readouterr()
    before = _tree_snapshot(tmp_path)
    fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace("{toy}", str(tmp_path / "toy.jsonl"))
    try:
        got = cli.main([fill(x) for x in argv])
    except SystemExit as e:  # argparse
        got = e.code
    err = capsys.readouterr().err
    assert got == status, err
    assert fill(phrase) in err, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "hunter2" not in err
    assert _tree_snapshot(tmp_path) == before  # nothing half-written, no empty run directory


# -- server faults against loopback stand-ins ------------------------------------------------------

from test_server_policy import FakeVLLM  # noqa: E402


@pytest.fixture
def toy4(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "question": f"q{i}", "answer": "42"}) + "\n" for i in range(4)))
    return ["--dataset", str(path), "--id-field", "id", "--runs-dir", str(tmp_path / "runs"), "--limit", "0",
            "--prm", "mock", "--embedder", "hash", "--no-progress", "--width", "2", "--max-tokens", "40",
            "--max-step-tokens", "8"]


@pytest.fixture
def no_tokenizer(monkeypatch):
    """The stand-ins serve no real model: prompts become a few token ids."""
    from ets.engines.server import ServerPolicy

    monkeypatch.setattr(ServerPolicy, "format_prompt", lambda self, q: ([1000 + int(q[1:].split()[0]), 1, 2], q))


def _timed(argv):
    t = time.monotonic()
    code = cli.main(argv)
    return code, time.monotonic() - t


def _problems(tmp_path) -> list[Path]:
    return sorted(tmp_path.glob("runs/*/problems/*.json"))


def test_dead_server_fails_fast_with_one_message(tmp_path, toy4, no_tokenizer, capsys):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    code, took = _timed(["run", "--policy", url, *toy4])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.count(f"every policy server is down: {url}") == 1
    assert "4 problem(s) not finished because of it: t0, t1, t2, t3" in err
    assert took < 5, took  # three refused connections, then nothing is sent
    print(f"dead server -> message: {took:.2f} s")


def test_hung_server_is_marked_down_after_one_timeout(tmp_path, toy4, no_tokenizer, stand_in, capsys):
    release = threading.Event()

    def hang(method, path, body):  # accepts connections, never answers (like kill -STOP)
        if path == "/v1/models":
            return 200, {"data": [{"id": "m"}]}
        release.wait(30)
        return 503, {}

    srv = stand_in(hang)
    try:
        code, took = _timed(["run", "--policy", srv.url, "--request-timeout", "1", *toy4])
    finally:
        release.set()
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "hung" in err and "4 problem(s) not finished" in err
    assert took < 8, took  # 1 s timeouts: /metrics, the request, the /health probe; then nothing waits
    print(f"hung server -> message: {took:.2f} s")


def test_server_dying_mid_run_keeps_finished_problems(tmp_path, toy4, no_tokenizer, stand_in, capsys):
    fake, box = FakeVLLM(delimiter_only=True), {}

    def dies(method, path, body):
        if path == "/v1/completions" and body["prompt"][0] == 1002:  # t0, t1 done; t2 starts
            # dies: stops listening before this last request gets its 503, so every retry is refused
            closing = threading.Thread(target=box["srv"].close, daemon=True)
            closing.start()
            closing.join(10)
            return 503, {"error": "shutting down"}
        return fake(method, path, body)

    box["srv"] = srv = stand_in(dies)
    code, took = _timed(["run", "--policy", srv.url, *toy4])
    err = capsys.readouterr().err
    done = _problems(tmp_path)
    assert code == 1 and "Traceback" not in err and [p.stem for p in done] == ["t0", "t1"]
    assert err.count("every policy server is down") == 1 and "2 problem(s) not finished because of it: t2, t3" in err
    assert took < 10, took
    print(f"server died mid-run -> message: {took:.2f} s ({len(done)} problems kept)")


@pytest.mark.slow  # several seconds: in the full run (-m "") and CI
def test_http_5xx_is_retried_then_the_problem_fails_and_others_go_on(tmp_path, toy4, no_tokenizer, stand_in, capsys):
    fake = FakeVLLM(delimiter_only=True)

    def flaky(method, path, body):  # problem 0 always meets a 500; the others are served
        if path == "/v1/completions" and body["prompt"][0] == 1000:
            return 500, {"error": "internal"}
        return fake(method, path, body)

    srv = stand_in(flaky)
    code, _ = _timed(["run", "--policy", srv.url, "--concurrency", "4", *toy4])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "problem 't0'" in err and "HTTP 500" in err and "is down" not in err
    assert len(_problems(tmp_path)) == 3


@pytest.mark.parametrize("wrong,phrase", [
    ({"choices": [{"index": 0, "text": "x", "finish_reason": "stop"}]}, "returned no token ids"),
    ({"choices": []}, "returned 0 samples"),
    ("not json at all", "answered with invalid JSON"),
])
def test_wrong_answers_fail_the_problem_with_the_servers_words(tmp_path, toy4, no_tokenizer, stand_in, capsys,
                                                                wrong, phrase):
    srv = stand_in(lambda m, p, b: (200, {"data": [{"id": "m"}]}) if p == "/v1/models" else (200, wrong))
    code, took = _timed(["run", "--policy", srv.url, *toy4, "--limit", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and phrase in err and "is down" not in err
    assert took < 5


def test_credentials_in_a_url_are_never_written_or_printed(tmp_path, toy4, no_tokenizer, stand_in, capsys):
    srv = stand_in(FakeVLLM(delimiter_only=True))
    url = srv.url.replace("http://", "http://user:hunter2@")
    assert cli.main(["run", "--policy", url, *toy4, "--limit", "1"]) == 0
    out = capsys.readouterr()
    assert "hunter2" not in out.out + out.err
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert b"hunter2" not in p.read_bytes(), p
    assert cli.main(["run", "--policy", url, *toy4, "--limit", "1"]) == 0  # resumes the same run
    assert len(list((tmp_path / "runs").iterdir())) == 1
