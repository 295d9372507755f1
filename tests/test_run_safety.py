"""Run-directory safety (claims, corrupt files, read-only runs, umask, config written once),
`ets serve` cleaning up on signals, and bounded work on hostile text."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ets.cli as cli
from ets.runs import RunDir
from conftest import toy_dataset

MOCK = ["--policy", "mock", "--prm", "mock", "--embedder", "hash", "--no-progress"]


@pytest.fixture
def toy(tmp_path):
    return toy_dataset(tmp_path, 3)


def _run_dir(tmp_path) -> Path:
    [d] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    return d


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.claim("p1")
    holder = json.loads(run.claim_path("p1").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # a live other process holds p2: not ours
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        run.claim_path("p2").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "time": 0}))
        assert not run.claim("p2") and run.claimed_elsewhere["p2"]["pid"] == other.pid
    finally:
        other.kill()
        other.wait()
    assert run.claim("p2")  # its process is dead now: taken over
    run.release("p1")
    assert not run.claim_path("p1").exists()
    run.path.joinpath("problems").mkdir()
    run.problem_path("p3").write_text("{}")
    assert not run.claim("p3") and not run.claim_path("p3").exists()  # finished: nothing to claim


@pytest.mark.slow  # several seconds: in the full run (-m "") and CI
def test_two_runs_at_once_never_compute_a_problem_twice(tmp_path, toy):
    cmd = [sys.executable, "-m", "ets.cli", "run", *MOCK, *toy, "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    sessions = [json.loads(line) for line in (_run_dir(tmp_path) / "sessions.jsonl").read_text().splitlines()]
    assert sum(s["computed"] for s in sessions) == 3  # not 6
    assert not list(_run_dir(tmp_path).glob("claims/*.claim"))


def test_corrupt_problem_file_is_moved_aside_and_recomputed(tmp_path, toy, capsys):
    assert cli.main(["run", *MOCK, *toy]) == 0
    d = _run_dir(tmp_path)
    bad = d / "problems" / "t1.json"
    bad.write_text('{"id": "t1", "tr')  # torn by hand
    capsys.readouterr()
    assert cli.main(["score", str(d)]) == 0  # skipped with a warning that names it
    assert "t1.json" in capsys.readouterr().err
    assert cli.main(["run", *MOCK, *toy]) == 0
    err = capsys.readouterr().err
    assert "t1.json" in err and "moved aside" in err
    assert json.loads(bad.read_text())["id"] == "t1"  # recomputed
    assert len(list((d / "problems").glob("t1.json.corrupt-*"))) == 1  # kept


def test_finished_read_only_run_scores_and_views_and_rerun_keeps_config(tmp_path, toy, capsys, monkeypatch):
    old = os.umask(0o027)
    try:
        assert cli.main(["run", *MOCK, *toy]) == 0
    finally:
        os.umask(old)
    d = _run_dir(tmp_path)
    assert (d / "config.json").stat().st_mode & 0o777 == 0o640  # the umask, not mkstemp's 0600
    before = (d / "config.json").stat().st_mtime_ns
    assert cli.main(["run", *MOCK, *toy, "--concurrency", "2"]) == 0
    assert (d / "config.json").stat().st_mtime_ns == before  # not rewritten
    if os.geteuid() == 0:
        pytest.skip("root writes read-only directories anyway")
    for p in [d, *d.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        monkeypatch.chdir(tmp_path)
        assert cli.main(["score", str(d)]) == 0
        assert cli.main(["view", str(d), "-o", str(tmp_path / "t.html")]) == 0
    finally:
        for p in [d, *d.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_unwritable_problems_dir_is_not_called_a_server_problem(tmp_path, toy, capsys, monkeypatch):
    from ets.runner import hint

    e = PermissionError(13, "Permission denied", str(tmp_path / "problems" / "x.json"))
    assert "cannot use" in hint(e) and "server" not in hint(e)


SERVE = textwrap.dedent("""
    import sys, ets.serve as s
    # a stand-in "vLLM": a process that starts a child of its own and answers /health
    child = ("import http.server, subprocess, sys;"
             "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);"
             "open(sys.argv[1], 'w').write(str(c.pid));"
             "h = type('H', (http.server.BaseHTTPRequestHandler,), {'do_GET': lambda self: (self.send_response(200), self.end_headers()), 'log_message': lambda *a: None});"
             "http.server.HTTPServer(('127.0.0.1', int(sys.argv[2])), h).serve_forever()")
    s.ensure_vllm_venv = lambda venv: sys.executable
    s.vllm_command = lambda python, model, port, host, bs, extra, **kw: [sys.executable, '-c', child, sys.argv[1], str(port)]
    sys.exit(s.main(['/m', '--port', sys.argv[2], '--log', sys.argv[3]]))
""")


@pytest.mark.slow  # several seconds: in the full run (-m "") and CI
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_serve_stops_its_server_and_its_children_on_signals(tmp_path, sig):
    from conftest import free_port

    pidfile = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(pidfile), str(free_port()), str(tmp_path / "log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()  # printed once /health answers
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        grandchild = int(pidfile.read_text())
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:  # gone, or a zombie nobody reaps (a container's init may not)
                if Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except (OSError, IndexError):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the server's child outlived `ets serve`: {Path(f'/proc/{grandchild}/stat').read_text()[:80]} {proc.returncode} {proc.stderr.read()[-500:]}")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_grading_a_pathological_answer_is_bounded():
    from ets.tasks.grading import equivalent

    t = time.monotonic()
    assert equivalent("\\frac{" * 2000 + "1" + "}" * 2000 + "+" + "1+" * 6000 + "1", "42") is False
    assert equivalent("1" * 16000, "42") is False
    assert time.monotonic() - t < 2.0


def test_default_prm_on_a_long_chain_is_bounded():
    from ets.prm.default import check_arithmetic

    t = time.monotonic()
    chain = " + ".join(["1"] * 5000) + " = 5000"
    deep = "(" * 3000 + "1" + ")" * 3000 + " + 1 = 2"
    check_arithmetic(chain)
    check_arithmetic(deep)  # deeper than Python's parser allows: no crash
    assert time.monotonic() - t < 2.0


HOLDER = r'''
import json, os, sys, time
path = sys.argv[1]
with open(path, "w") as f:  # a claim as another host's ets writes it
    json.dump({"pid": 1, "host": "elsewhere", "start": None, "time": time.time(), "heartbeat": 0.1}, f)
print("held", flush=True)
while True:  # its heartbeat
    os.utime(path)
    time.sleep(0.1)
'''


def test_a_dead_hosts_claim_is_taken_over_once_its_heartbeat_stops(tmp_path, monkeypatch):
    import subprocess

    from ets import runs

    monkeypatch.setattr(runs, "HEARTBEAT_STALE_S", 1.0)
    run = RunDir(tmp_path / "run")
    path = run.claim_path("p1")
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        while time.time() - t0 < 2.5:  # alive and beating: never taken over
            assert not run.claim("p1")
            time.sleep(0.2)
        assert run.claimed_elsewhere["p1"]["host"] == "elsewhere"
    finally:
        holder.kill()
        holder.wait(timeout=10)
    t0 = time.time()
    while not run.claim("p1"):  # the host died: its claim goes stale within HEARTBEAT_STALE_S
        assert time.time() - t0 < 5, "the dead host's claim was not taken over"
        time.sleep(0.1)
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_holder_keeps_its_claims_alive(tmp_path, monkeypatch):
    from ets import runs

    monkeypatch.setattr(runs, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(runs, "_HEARTBEAT", runs._Heartbeat())  # one whose thread sleeps 0.1 s
    run = RunDir(tmp_path / "run")
    assert run.claim("p1")
    path = run.claim_path("p1")
    os.utime(path, (0, 0))  # as if untouched since 1970
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 1.0  # the heartbeat touched it
    run.release("p1")
    assert not path.exists()
