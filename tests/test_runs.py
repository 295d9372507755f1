"""Run directories: atomic writes, naming, resume after a failure or a SIGKILL, summaries."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ets.config import RunConfig, SearchConfig
from ets.engines.mock import MockPolicy
from ets.prm.base import PRMError
from ets.prm.mock import MockPRM
from ets.runner import Job, run_jobs, write_summary
from ets.runs import RunDir, RunMismatch, atomic_write_json, run_name, safe_name
from ets.tasks import load_dataset


def make_dataset(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": f"problem {i}: what is 6*7?", "answer": "42"}) + "\n"
                            for i in range(n)))
    return path


def setup(tmp_path, n=6, strategy="rebase", width=4):
    tmp_path.mkdir(parents=True, exist_ok=True)
    task, problems = load_dataset(str(make_dataset(tmp_path / "toy.jsonl", n)), id_field="id")
    params = {"embedder": "hash"} if strategy == "ets" else {}
    cfg = SearchConfig(strategy=strategy, width=width, max_tokens=200, strategy_params=params)
    rc = RunConfig(dataset="toy", policy="mock", prm="mock", embedder="hash", runs_dir=str(tmp_path / "runs"))
    run = RunDir.prepare(rc.runs_dir, rc.identity(cfg, task.to_dict()), rc.to_dict())
    return task, problems, cfg, run


class FailingPRM(MockPRM):
    """Raises for one problem, like a PRM that cannot score its steps."""

    def __init__(self, bad: str):
        super().__init__()
        self.bad = bad

    async def score(self, requests):
        if self.bad in requests[0].question:
            raise PRMError("no step tag reached the PRM")
        return await super().score(requests)


def snapshot(run: RunDir) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run.path / "problems").glob("*.json")}


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]  # no tmp file left behind


def test_run_name_is_a_hash_of_the_identity(tmp_path):
    rc = RunConfig()
    a = rc.identity(SearchConfig(strategy="ets", width=16), {"name": "gsm8k"})
    b = rc.identity(SearchConfig(strategy="ets", width=16, seed=1), {"name": "gsm8k"})
    assert run_name(a) == run_name(dict(a)) and run_name(a).startswith("ets-w16-")
    assert run_name(a) != run_name(b)
    # problem selection and concurrency do not change the run
    assert RunConfig(limit=3, concurrency=4).identity(SearchConfig(strategy="ets", width=16), {"name": "gsm8k"}) == a


def test_resume_with_other_config_refused(tmp_path):
    _, _, cfg, run = setup(tmp_path)
    other = RunConfig(policy="mock", prm="mock").identity(SearchConfig(strategy="beam", width=4), {})
    with pytest.raises(RunMismatch, match="another configuration"):
        RunDir.prepare(tmp_path, other, {}, resume=run.path)


def test_safe_names_do_not_collide():
    assert safe_name("gsm8k-3") == "gsm8k-3"
    a, b = safe_name("test/algebra/1.json"), safe_name("test_algebra_1.json")
    assert a != b and "/" not in a


def test_failure_keeps_others_then_resume_recomputes_nothing(tmp_path):
    task, problems, cfg, run = setup(tmp_path, n=6)
    groups = [[Job(p, cfg, run)] for p in problems]
    policy = MockPolicy()
    out = asyncio.run(run_jobs(groups, task, policy, FailingPRM("problem 3:"), concurrency=2, progress=False))
    o = out[run.name]
    assert o.computed == 5 and [f.problem_id for f in o.failures] == ["p3"]
    assert "p3" in o.failures[0].message and "--step-delimiter" in o.failures[0].message
    assert run.errors()[0]["id"] == "p3"
    before = snapshot(run)
    assert len(before) == 5

    # the missing problem alone, in a fresh directory: the policy calls it needs
    t2, p2, cfg2, run2 = setup(tmp_path / "alone", n=6)
    solo = MockPolicy()
    asyncio.run(run_jobs([[Job(p2[3], cfg2, run2)]], t2, solo, MockPRM(), progress=False))

    policy = MockPolicy()
    out = asyncio.run(run_jobs(groups, task, policy, MockPRM(), concurrency=2, progress=False))
    o = out[run.name]
    assert (o.computed, o.skipped, o.failures) == (1, 5, [])
    assert policy.calls == solo.calls > 0  # only p3 was generated again
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k in before} == before  # finished files untouched
    assert len(after) == 6 and run.errors() == []
    s = write_summary(run, [p.id for p in problems])
    assert s["problems"] == 6 and s["failed"] == 0
    assert s["computed"] == 6 and len(run.sessions()) == 2


def test_summary_figures(tmp_path):
    task, problems, cfg, run = setup(tmp_path, n=4, strategy="ets")
    asyncio.run(run_jobs([[Job(p, cfg, run)] for p in problems], task, MockPolicy(), MockPRM(), progress=False))
    s = write_summary(run, [p.id for p in problems])
    recs = list(run.iter_problems())
    assert s["problems"] == 4 and s["correct"] == sum(r["correct"] for r in recs)
    assert s["accuracy"] == s["correct"] / 4
    assert s["kv_peak"] == max(r["kv"]["kv_peak"] for r in recs) > s["kv_mean"] > 0
    assert s["generated_tokens"] == sum(r["counters"]["generated_tokens"] for r in recs) > 0
    assert s["tokens_per_s"] > 0 and s["problems_per_s"] > 0 and s["in_flight"] == 1
    assert s["embedder"] == "hash-bow-256"
    assert s["versions"]["ets"] and s["strategy"] == "ets" and s["width"] == 4
    assert json.loads((run.path / "summary.json").read_text())["accuracy"] == s["accuracy"]


@pytest.mark.slow  # several seconds: in the full run (-m "") and CI
def test_sigkill_mid_run_then_rerun_loses_and_recomputes_nothing(tmp_path):
    make_dataset(tmp_path / "toy.jsonl", 120)
    cmd = [sys.executable, "-m", "ets.cli", "run", "--policy", "mock", "--prm", "mock", "--embedder", "hash",
           "--strategy", "rebase", "--dataset", str(tmp_path / "toy.jsonl"), "--id-field", "id", "--limit", "0",
           "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.time() + 60
    done = []
    while time.time() < deadline and len(done) < 5:
        done = list((tmp_path / "runs").glob("*/problems/*.json"))
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = RunDir(next((tmp_path / "runs").iterdir()))
    before = snapshot(run)
    assert 5 <= len(before) < 120, "the run must be killed part-way"
    for rec in run.iter_problems():  # every file on disk is whole
        assert rec["tree"]["nodes"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    after = snapshot(run)
    assert len(after) == 120
    assert {k: v for k, v in after.items() if k in before} == before
    assert f"{len(before)} already done" in res.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_exits_130_and_writes_the_summary(tmp_path, signum):
    make_dataset(tmp_path / "toy.jsonl", 120)
    cmd = [sys.executable, "-m", "ets.cli", "run", "--policy", "mock", "--prm", "mock", "--embedder", "hash",
           "--strategy", "rebase", "--dataset", str(tmp_path / "toy.jsonl"), "--id-field", "id", "--limit", "0",
           "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    # a job started in the background by a non-interactive shell (as CI may be) inherits SIGINT
    # ignored; a terminal's Ctrl-C reaches a process with the default disposition
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and len(list((tmp_path / "runs").glob("*/problems/*.json"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "never retrieved" not in err
    run = RunDir(next((tmp_path / "runs").iterdir()))
    summary = json.loads((run.path / "summary.json").read_text())
    assert 3 <= summary["problems"] == len(list(run.iter_problems())) < 120


def test_saved_record_round_trips_tree_and_trace(tmp_path):
    from dataclasses import asdict

    from ets.treeio import trace_from_list, tree_from_dict, tree_to_dict

    task, problems, cfg, run = setup(tmp_path, n=1, strategy="ets")
    asyncio.run(run_jobs([[Job(problems[0], cfg, run)]], task, MockPolicy(), MockPRM(), progress=False))
    rec = run.load_problem("p0")
    tree = tree_from_dict(rec["tree"])
    assert tree_to_dict(tree) == rec["tree"] and len(tree.nodes) > 5
    trace = trace_from_list(rec["trace"])
    assert [asdict(t) for t in trace] == rec["trace"]
    assert any(t.info.get("num_clusters") is not None or t.info.get("objective") is not None for t in trace)
    assert rec["kv"]["kv_peak"] == max(t.kv_tokens for t in trace)


def test_run_names_are_pinned():
    """Run directory names are a hash of RunConfig.identity(...): runs on disk resume only while
    these stay the same. A change here orphans every saved run; moving code must not."""
    from ets.config import SamplingConfig

    task = {"name": "gsm8k", "numeric": True,
            "instruction": "Please reason step by step, and put your final answer within \\boxed{}."}
    s = SamplingConfig(max_step_tokens=256, step_delimiter="\n")
    cases = [
        (RunConfig(), SearchConfig(strategy="ets", width=4, max_tokens=256, sampling=s,
                                   strategy_params={"embedder": "minilm"}), "ets-w4-015ef419"),
        (RunConfig(kv_capacity=4096, vote="majority", agg="min"), SearchConfig(strategy="rebase", width=16),
         "rebase-w16-02a42ca3"),
        (RunConfig(policy="mock", prm="mock"),
         SearchConfig(strategy="beam", width=8, seed=3, strategy_params={"overshoot": True}), "beam-w8-e9e02314"),
    ]
    for rc, sc, name in cases:
        assert run_name(rc.identity(sc, task)) == name


def test_progress_line_moves_before_the_first_problem_finishes(tmp_path, monkeypatch, capsys):
    """While the first problem runs (the bar still at 0/2), the line already shows the tokens
    generated, tok/s, the deepest depth and, when the engine reports it, the KV held."""
    import ets.runner

    monkeypatch.setattr(ets.runner, "LIVE_EVERY_S", 0.0)
    task, problems, cfg, run = setup(tmp_path, n=2)

    class KVMock(MockPolicy):  # an engine that reports the KV it holds
        def observe(self, root):
            return {"kv_tokens_all": 123}

    asyncio.run(run_jobs([[Job(p, cfg, run)] for p in problems], task, KVMock(seed=0), MockPRM(), progress=True))
    frames = capsys.readouterr().err.replace("\n", "\r").split("\r")
    early = [f for f in frames if "0/2" in f and "depth" in f]
    assert early, frames
    assert re.search(r"\d+ tok, [\d.]+ tok/s, depth [1-9]\d*, KV 123", early[0]), early[0]
    depths = [int(re.search(r"depth (\d+)", f).group(1)) for f in early]
    assert depths == sorted(depths) and depths[-1] > depths[0]  # it moves


def test_live_line_without_engine_kv():
    from ets.runner import LiveLine

    line = LiveLine(bar=None, every_s=1e9)  # never redraws: only the text is read
    line.depth_done(1, 10, {})
    line.depth_done(3, 5, {"kv_tokens_all": None})
    text = line.text()
    assert text.startswith("15 tok, ") and "depth 3" in text and "KV" not in text


def test_configs_live_beside_their_readers_and_old_imports_still_work():
    import ets.config
    import ets.engines.sampling
    import ets.runner

    assert ets.config.RunConfig is ets.runner.RunConfig
    assert ets.config.SamplingConfig is ets.engines.sampling.SamplingConfig
    assert ets.runner.RunConfig.__module__ == "ets.runner"
    assert ets.engines.sampling.SamplingConfig.__module__ == "ets.engines.sampling"
