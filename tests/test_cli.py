"""The `ets` CLI with the mock policy/PRM: run, compare, score, view, info, serve, errors."""

import json
import sys
import types
from pathlib import Path

import pytest

import ets.cli as cli
from ets.prm.base import PRMError
from ets.prm.mock import MockPRM
from conftest import toy_dataset

MOCK = ["--policy", "mock", "--prm", "mock", "--embedder", "hash", "--no-progress"]


@pytest.fixture
def toy(tmp_path):
    return toy_dataset(tmp_path, 4)


def run_dirs(tmp_path):
    return sorted(p for p in (tmp_path / "runs").iterdir() if (p / "config.json").is_file())


def test_no_args_is_the_main_job(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_run", lambda a: seen.setdefault("a", a) and 0)
    assert cli.main([]) == 0
    a = seen["a"]
    assert (a.strategy, a.width, a.limit, a.max_tokens, a.dataset, a.policy, a.prm,
            a.embedder) == ("ets", 4, 2, 256, "gsm8k", "default", "default", "minilm")
    assert cli.search_config(a, a.strategy, a.width).sampling.step_delimiter == "\n"


@pytest.mark.parametrize("verb", ["run", "compare"])
def test_step_delimiter_default_follows_the_policy(verb):
    """One newline for the default model (its steps are lines), the spec's blank line for any
    other policy, and the flag wins over both."""
    def delim(*extra):
        a = cli.build_parser().parse_args([verb, *extra])
        return cli.search_config(a, "ets", 4).sampling.step_delimiter

    assert delim() == "\n"
    assert delim("--policy", "mock") == "\n\n"
    assert delim("--policy", "http://127.0.0.1:8000") == "\n\n"
    assert delim("--step-delimiter", "\\n\\n") == "\n\n"
    assert delim("--policy", "mock", "--step-delimiter", "STEP") == "STEP"


def test_run_json_and_rerun(tmp_path, toy, capsys):
    assert cli.main(["run", *MOCK, *toy, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] == 4 and summary["strategy"] == "ets" and summary["width"] == 4
    assert 0 <= summary["accuracy"] <= 1 and summary["kv_peak"] > 0 and summary["tokens_per_s"] > 0
    [d] = run_dirs(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    assert d.name == f"ets-w4-{cfg['hash']}"
    assert cfg["identity"]["search"]["strategy_params"]["embedder"] == "hash"
    assert len(list((d / "problems").glob("*.json"))) == 4
    # the same command again: nothing to do, same directory
    assert cli.main(["run", *MOCK, *toy]) == 0
    out, err = capsys.readouterr()
    assert "4 already done" in err and "accuracy" in out and run_dirs(tmp_path) == [d]


def test_search_flags_reach_the_config(tmp_path, toy):
    args = ["run", *MOCK, *toy, "--width", "3", "--lambda-c", "0.5", "--lambda-s", "0", "--node-cost", "tokens",
            "--max-tokens", "300", "--step-delimiter", "\\n", "--temperature", "0.7", "--seed", "3", "--limit", "1"]
    assert cli.main(args) == 0
    [d] = run_dirs(tmp_path)
    s = json.loads((d / "config.json").read_text())["identity"]["search"]
    assert s["width"] == 3 and s["max_tokens"] == 300 and s["seed"] == 3
    assert s["sampling"] == {"temperature": 0.7, "top_p": 1.0, "max_step_tokens": 256, "step_delimiter": "\n"}
    assert s["strategy_config"]["lambda_c"] == 0.5 and s["strategy_config"]["node_cost"] == "tokens"


def test_flag_that_does_not_apply_is_an_error(tmp_path, toy, capsys):
    assert cli.main(["run", *MOCK, *toy, "--strategy", "rebase", "--lambda-c", "1"]) == 2
    assert "--lambda-c does not apply to rebase" in capsys.readouterr().err
    assert cli.main(["run", *MOCK, *toy, "--width", "0"]) == 2
    assert "width must be >= 1" in capsys.readouterr().err


def test_kv_capacity_reaches_the_embedded_engine_and_the_run_name(tmp_path, toy, monkeypatch, capsys):
    import ets.factory as f

    seen = []
    real = f.make_policy
    monkeypatch.setattr(f, "make_policy", lambda spec, **opts: seen.append(opts) or real("mock", **opts))
    model = tmp_path / "m"  # a model folder as far as the CLI's checks go (loading is faked)
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    base = ["run", "--policy", str(model), "--prm", "mock", "--embedder", "hash", "--no-progress", *toy, "--limit", "1"]
    assert cli.main(base) == 0
    assert cli.main([*base, "--kv-capacity", "3000"]) == 0
    assert "kv_capacity" not in seen[0] and seen[1]["kv_capacity"] == 3000
    identities = [json.loads((d / "config.json").read_text())["identity"] for d in run_dirs(tmp_path)]
    assert sorted(i.get("kv_capacity", 0) for i in identities) == [0, 3000]  # two runs, two names
    capsys.readouterr()
    # a server or mock policy has no such option here: an error that says where to set it
    assert cli.main(["run", *MOCK, *toy, "--kv-capacity", "3000"]) == 2
    assert "kv_capacity applies to the embedded engine only" in capsys.readouterr().err
    assert cli.main([*base, "--kv-capacity", "0"]) == 2
    assert "kv_capacity must be a positive number" in capsys.readouterr().err


def test_malformed_dataset_stops_before_running(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n{"question": "b"\n')
    assert cli.main(["run", *MOCK, "--dataset", str(bad), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "not valid JSON" in err
    assert not (tmp_path / "runs").exists()


def test_failing_problem_exit_1_others_saved(tmp_path, toy, monkeypatch, capsys):
    class Failing(MockPRM):
        async def score(self, requests):
            if "problem 2:" in requests[0].question:
                raise PRMError("no step tag reached the PRM")
            return await super().score(requests)

    import ets.factory

    monkeypatch.setattr(ets.factory, "make_prm", lambda spec, policy=None, **kw: Failing())
    assert cli.main(["run", *MOCK, *toy]) == 1
    err = capsys.readouterr().err
    assert "problem 't2'" in err and "fix:" in err and "run the same command again" in err
    [d] = run_dirs(tmp_path)
    assert sorted(p.stem for p in (d / "problems").glob("*.json")) == ["t0", "t1", "t3"]
    monkeypatch.undo()
    assert cli.main(["run", *MOCK, *toy]) == 0
    assert "3 already done" in capsys.readouterr().err


def test_compare_interleaved_table_plot_and_score(tmp_path, toy, capsys):
    plot = tmp_path / "cmp.png"
    args = ["compare", *MOCK, *toy, "--methods", "ets,rebase,beam", "--widths", "2,4", "--plot", str(plot)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for m in ("ets", "rebase", "beam"):
        assert m in out
    assert "KV mean" in out and str(plot) in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 6
    # problem-major: every config finishes problem k before any config starts problem k+1
    recs = [json.loads(p.read_text()) for d in dirs for p in (d / "problems").glob("*.json")]
    order = [r["id"] for r in sorted(recs, key=lambda r: r["finished_at"])]
    assert order == sorted(order) and len(order) == 24

    # score: recomputed from the saved trees, no generation
    ets_w4 = next(d for d in dirs if d.name.startswith("ets-w4-"))
    assert cli.main(["score", str(ets_w4), "--vote", "weighted,majority,best", "--agg", "last,min", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6 and {r["problems"] for r in rows} == {4}
    summary = json.loads((ets_w4 / "summary.json").read_text())
    ref = next(r for r in rows if (r["vote"], r["agg"]) == ("weighted", "last"))
    assert ref["accuracy"] == summary["accuracy"]

    # compare again: resumes, nothing recomputed; --plot DIR puts the plot inside and says where
    stamps = {p: p.stat().st_mtime_ns for d in dirs for p in (d / "problems").glob("*.json")}
    plot_dir = tmp_path / "plots"
    plot_dir.mkdir()
    assert cli.main([*args[:-1], str(plot_dir)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for d in dirs for p in (d / "problems").glob("*.json")}
    assert f"plot: {plot_dir / 'widths.png'}" in capsys.readouterr().out
    assert (plot_dir / "widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_rejects_unknown_vote(tmp_path, toy, capsys):
    assert cli.main(["run", *MOCK, *toy, "--limit", "1"]) == 0
    [d] = run_dirs(tmp_path)
    assert cli.main(["score", str(d), "--vote", "plurality"]) == 2


def test_view_writes_html(tmp_path, toy, capsys):
    assert cli.main(["run", *MOCK, *toy, "--limit", "2"]) == 0
    [d] = run_dirs(tmp_path)
    out = tmp_path / "t.html"
    assert cli.main(["view", str(d), "--problem", "t1", "-o", str(out)]) == 0
    assert "Problem t1" in out.read_text()
    assert cli.main(["view", str(d), "--problem", "nope", "-o", str(out)]) == 2
    assert "no finished problem 'nope'" in capsys.readouterr().err


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["ets"] and info["cpus"] >= 1 and "device" in info and "vllm_venv" in info


def test_serve_delegates(monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "ets.serve", types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0))
    assert cli.main(["serve", "--port", "8000"]) == 0
    assert seen == [["--port", "8000"]]


def test_factory_dispatch(monkeypatch):
    import ets.factory as f
    from ets.prm.default import DefaultPRM
    from ets.prm.mock import MockPRM
    from ets.prm.reference import ReferencePRM
    from ets.prm.served import ServedPRM

    calls = []

    def fake(name):
        def ctor(*args, seed=None):
            calls.append((name, args, {"seed": seed}))
            return name
        return ctor

    monkeypatch.setitem(sys.modules, "ets.engines.hf", types.SimpleNamespace(load_policy=fake("hf")))
    monkeypatch.setitem(sys.modules, "ets.engines.server", types.SimpleNamespace(ServerPolicy=fake("server")))
    assert f.make_policy("default", seed=1, device="cpu") == "hf"
    assert f.make_policy("/models/x.gguf", seed=1) == "hf"
    assert f.make_policy("http://a:1, http://b:2", seed=1) == "server"
    assert calls == [("hf", (None,), {"seed": 1}), ("hf", ("/models/x.gguf",), {"seed": 1}),
                     ("server", (["http://a:1", "http://b:2"],), {"seed": 1})]
    assert type(f.make_policy("mock", seed=5)).__name__ == "MockPolicy"
    # PRMs: through the registry (ets.prm.registry), with the run's seed and timeout
    assert isinstance(f.make_prm("default", "POLICY", seed=2), DefaultPRM)
    assert isinstance(f.make_prm("mock", None, seed=2), MockPRM) and f.make_prm("mock", None, seed=2).seed == 2
    served = f.make_prm("https://prm:9", None, timeout_s=7)
    assert isinstance(served, ServedPRM) and served.convention.name == "qwen-prm" and served.timeout_s == 7
    served = f.make_prm("math-shepherd:http://prm:9?batch_size=3", None)
    assert served.convention.name == "math-shepherd" and served.batch_size == 3
    ref = f.make_prm("reference?noise=0.5", None, seed=4)
    assert isinstance(ref, ReferencePRM) and (ref.noise, ref.seed) == (0.5, 4) and ref.name == "reference(noise=0.5)"
    with pytest.raises(f.SpecError, match="unknown PRM kind 'nonsense'"):
        f.make_prm("nonsense", None)
    with pytest.raises(f.SpecError, match="one PRM per run; `ets compare --prm A,B`"):
        f.make_prm("default,mock", None)
    with pytest.raises(f.SpecError, match="noise='x' is not a number"):
        f.make_prm("reference?noise=x", None)
    with pytest.raises(f.SpecError, match="has no option 'nosie'"):
        f.make_prm("reference?nosie=1", None)
    with pytest.raises(f.SpecError, match="takes reference$"):
        f.make_prm("reference:/some/path", None)


def test_threads_default_follows_where_the_server_is(monkeypatch):
    import argparse

    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    ns = argparse.Namespace
    assert cli._set_threads(ns(threads=None, policy="mock")) is None
    assert cli._set_threads(ns(threads=None, policy="http://127.0.0.1:8000,http://localhost:8001")) == 1
    assert cli._set_threads(ns(threads=None, policy="http://gpu-node:8000")) is None  # the server has its own cores
    assert cli._set_threads(ns(threads=3, policy="http://127.0.0.1:8000")) == 3
    assert calls == [1, 3]
    with pytest.raises(ValueError, match="--threads"):
        cli._set_threads(ns(threads=0, policy="mock"))


def test_option_vocabularies_have_one_source():
    """Strategy flags are the strategies' Config fields; every choice a flag lists is one its
    config accepts (and nothing else is listed); --vote/--agg list ets.answer's."""
    from dataclasses import fields

    from ets.answer import AGGREGATIONS, VOTES
    from ets.strategies import STRATEGIES

    parser = cli.build_parser()
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    actions = {a.dest: a for a in run_parser._actions}
    for cls in STRATEGIES.values():
        for f in fields(cls.Config):
            if f.name == "embedder":
                continue
            assert f.name in actions, f"{cls.name}'s {f.name} has no flag"
            choices = actions[f.name].choices
            if choices:
                for c in choices:  # help and validation agree both ways
                    cls.Config.for_width(4, **{f.name: c})
                with pytest.raises(ValueError, match=f.name):
                    cls.Config.for_width(4, **{f.name: "no-such-value"})
    assert tuple(actions["solver"].choices) == ("auto", "milp")  # "exact" was listed, then refused
    assert tuple(actions["vote"].choices) == VOTES and tuple(actions["agg"].choices) == AGGREGATIONS
    with pytest.raises(SystemExit) as e:
        cli.main(["run", *MOCK, "--solver", "exact"])
    assert e.value.code == 2


def test_admit_until_parses_clock_times():
    now = 1_800_000_000.0  # 2027-01-15 08:00 UTC
    assert cli.clock_time("08:30", now) == now + 1800
    assert cli.clock_time("07:30", now) == now + 86400 - 1800  # passed today: tomorrow's
    assert cli.clock_time("2027-01-15T07:00", now) == now - 3600
    with pytest.raises(Exception, match="HH:MM"):
        cli.clock_time("half past eight", now)


def test_admit_until_leaves_unstarted_problems_for_the_next_run(tmp_path, toy, monkeypatch, capsys):
    """Admission closes between problems: the one started finishes and is saved, the others are
    not started, and the same command without the limit computes only those."""
    import ets.runner
    from ets.engines.mock import MockPolicy

    clock = [1_000.0]
    monkeypatch.setattr(ets.runner, "time", types.SimpleNamespace(
        time=lambda: clock[0], perf_counter=ets.runner.time.perf_counter, strftime=ets.runner.time.strftime,
        gmtime=ets.runner.time.gmtime))
    real = MockPolicy.expand

    async def expand(self, requests, sampling):  # the clock passes the limit during the first problem
        clock[0] = 3_000.0
        return await real(self, requests, sampling)

    monkeypatch.setattr(MockPolicy, "expand", expand)
    monkeypatch.setattr(cli, "clock_time", lambda text: 2_000.0)
    assert cli.main(["run", *MOCK, *toy, "--concurrency", "1", "--admit-until", "00:00", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["problems"] == 1 and "admission closed" in err
    [d] = run_dirs(tmp_path)
    assert len(list((d / "problems").glob("*.json"))) == 1 and not list((d / "errors").glob("*"))
    assert cli.main(["run", *MOCK, *toy, "--concurrency", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["problems"] == 4 and "1 already done" in err


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGUSR1"), reason="no SIGUSR1 here")
def test_sigusr1_closes_admission_in_a_running_command(tmp_path, toy, monkeypatch, capsys):
    import os
    import signal

    from ets.engines.mock import MockPolicy

    real, sent = MockPolicy.expand, []

    async def expand(self, requests, sampling):  # `kill -USR1` arrives during the first problem
        if not sent:
            sent.append(os.getpid())
            os.kill(os.getpid(), signal.SIGUSR1)
        return await real(self, requests, sampling)

    monkeypatch.setattr(MockPolicy, "expand", expand)
    assert cli.main(["run", *MOCK, *toy, "--concurrency", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["problems"] == 1 and "SIGUSR1" in err
    monkeypatch.setattr(MockPolicy, "expand", real)
    assert cli.main(["run", *MOCK, *toy, "--concurrency", "1", "--json"]) == 0  # a new command: open again
    assert json.loads(capsys.readouterr().out)["problems"] == 4


def test_max_requests_reaches_the_server_policy(monkeypatch):
    import ets.factory

    seen = {}
    monkeypatch.setattr(ets.factory, "make_policy", lambda spec, **opts: seen.update(opts) or object())
    monkeypatch.setattr(ets.factory, "make_prm", lambda spec, policy, **opts: object())
    a = cli.build_parser().parse_args(["run", "--policy", "http://127.0.0.1:9", "--max-requests", "300"])
    cli._models(a, cli.run_config(a))
    assert seen["max_concurrency"] == 300
    a = cli.build_parser().parse_args(["run", "--policy", "http://127.0.0.1:9", "--max-requests", "0"])
    with pytest.raises(Exception, match="--max-requests 0"):
        cli._models(a, cli.run_config(a))
    from ets.engines.server import ServerPolicy
    import inspect
    assert inspect.signature(ServerPolicy).parameters["max_concurrency"].default == 256
