"""ets.experiment (method specs, the chunk schedule), ets.report.record (the paired interval,
the record) and the engine measures in every run (ets.measures via runner and summary.json)."""

import json
import math
import types

import pytest

import ets.cli as cli
from ets.experiment import parse_method, schedule
from ets.measures import counter_delta, trace_measures
from ets.report.record import paired_interval, wilson
from conftest import toy_dataset

MOCK = ["--policy", "mock", "--prm", "mock", "--embedder", "hash", "--no-progress", "--max-tokens", "200"]


@pytest.fixture
def toy(tmp_path):
    return toy_dataset(tmp_path, 5, all_problems=False)


def test_parse_method_types_params_as_the_strategy_config():
    m = parse_method("ets:lambda_c=2/node_cost=tokens/kv_budget=800/lambda_s=0")
    assert (m.label, m.strategy) == ("ets:lambda_c=2/node_cost=tokens/kv_budget=800/lambda_s=0", "ets")
    # floats as the flags give them (--lambda-c 2 -> 2.0), so both name the same run directory
    assert m.params == {"lambda_c": 2.0, "node_cost": "tokens", "kv_budget": 800, "lambda_s": 0.0}
    assert type(m.params["lambda_c"]) is float and type(m.params["kv_budget"]) is int
    assert parse_method("beam:overshoot=true").params == {"overshoot": True}
    assert parse_method(" rebase ") .params == {} and parse_method("rebase").label == "rebase"
    with pytest.raises(ValueError, match="not key=value"):
        parse_method("ets:lambda_c")
    with pytest.raises(ValueError, match="unknown parameter 'lambda_x'"):
        parse_method("ets:lambda_x=1")
    with pytest.raises(ValueError, match="unknown strategy"):
        parse_method("nope")


def test_schedule_rotates_the_config_order_per_chunk():
    problems = [types.SimpleNamespace(id=f"p{i}") for i in range(5)]
    arms = [types.SimpleNamespace(name=n, problems=problems) for n in "ABC"]
    plan = schedule(arms, concurrency=2)
    chunks = {}
    for ci, arm, chunk in plan:
        chunks.setdefault(ci, []).append((arm.name, [p.id for p in chunk]))
    assert [[a for a, _ in chunks[ci]] for ci in sorted(chunks)] == [list("ABC"), list("BCA"), list("CAB")]
    assert [c for _, c in chunks[0]] == [["p0", "p1"]] * 3 and chunks[2][0][1] == ["p4"]


def test_compare_logs_one_line_per_chunk_and_config_in_rotating_order(tmp_path, toy, capsys):
    args = ["compare", *MOCK, *toy, "--limit", "4", "--methods", "rebase,ets,beam", "--widths", "2",
            "--concurrency", "2", "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    lines = []
    for d in (tmp_path / "runs").iterdir():
        if (d / "config.json").exists():
            for s in map(json.loads, (d / "sessions.jsonl").read_text().splitlines()):
                lines.append((s["time"], d.name.split("-")[0], tuple(sorted(s["ids"])), s))
    lines.sort()
    assert [(m, ids) for _, m, ids, _ in lines] == [
        ("rebase", ("t0", "t1")), ("ets", ("t0", "t1")), ("beam", ("t0", "t1")),
        ("ets", ("t2", "t3")), ("beam", ("t2", "t3")), ("rebase", ("t2", "t3"))]
    for *_, s in lines:  # the chunk's own record: wall, tokens, in flight, engine counter delta
        assert s["wall_s"] > 0 and s["generated_tokens"] > 0 and s["concurrency"] == 2
        assert s["engine"]["policy_calls"] > 0 and s["interleaved_runs"] == 1


def test_pooled_schedule_gives_the_chunked_results_and_times_no_method(tmp_path, toy, capsys):
    common = [*MOCK, "--limit", "4", "--methods", "rebase,ets", "--widths", "2", "--concurrency", "2"]
    chunked_runs, pooled_runs = tmp_path / "chunked", tmp_path / "pooled"
    toy_c = [x if x != str(tmp_path / "runs") else str(chunked_runs) for x in toy]
    toy_p = [x if x != str(tmp_path / "runs") else str(pooled_runs) for x in toy]
    assert cli.main(["compare", *common, *toy_c, "--out", str(tmp_path / "c")]) == 0
    assert cli.main(["compare", *common, *toy_p, "--schedule", "pooled", "--out", str(tmp_path / "p")]) == 0

    def saved(root):
        out = {}
        for f in root.glob("*/problems/*.json"):
            r = json.loads(f.read_text())
            out[f.parent.parent.name, f.name] = (r["answer"], r["kv"], r["tree"])
        return out

    # the same run directories, the same trees: samples depend only on (seed, path), not on the schedule
    assert saved(chunked_runs) == saved(pooled_runs) and len(saved(pooled_runs)) == 8
    for d in pooled_runs.iterdir():
        if (d / "config.json").exists():
            (s,) = map(json.loads, (d / "sessions.jsonl").read_text().splitlines())
            assert s["interleaved_runs"] == 2 and len(s["ids"]) == 4
    rows = json.loads((tmp_path / "p" / "results.json").read_text())["rows"]
    assert [r["problems"] for r in rows] == [4, 4]
    assert all(not r.get("tokens_per_s") for r in rows)  # a pooled call times no single method
    with pytest.raises(SystemExit):
        cli.main(["compare", *common, *toy_p, "--schedule", "nope"])


def test_pooled_admission_closes_between_the_configs_of_one_problem(tmp_path, toy, monkeypatch, capsys):
    """A pooled group runs its problem's configs one after another; admission is checked before
    each, so after `kill -USR1` (or --admit-until) the config running finishes and is saved and
    the group's next config is not started; the same command later computes only what is left."""
    from ets import admission
    from ets.engines.mock import MockPolicy

    real = MockPolicy.expand

    async def expand(self, requests, sampling):  # closes during the first config of the first problem
        admission.close()
        return await real(self, requests, sampling)

    monkeypatch.setattr(MockPolicy, "expand", expand)
    common = ["compare", *MOCK, *toy, "--limit", "2", "--methods", "rebase,ets", "--widths", "2",
              "--concurrency", "1", "--schedule", "pooled", "--out", str(tmp_path / "out")]
    assert cli.main(common) == 0
    done = sorted((f.parent.parent.name.split("-")[0], f.stem) for f in (tmp_path / "runs").glob("*/problems/*.json"))
    assert done == [("rebase", "t0")]
    assert "admission closed" in capsys.readouterr().err
    monkeypatch.setattr(MockPolicy, "expand", real)
    assert cli.main(common) == 0  # a new command: admission open again
    done = sorted((f.parent.parent.name.split("-")[0], f.stem) for f in (tmp_path / "runs").glob("*/problems/*.json"))
    assert done == [("ets", "t0"), ("ets", "t1"), ("rebase", "t0"), ("rebase", "t1")]


def test_compare_reuses_runs_made_by_ets_run_and_reports_them(tmp_path, toy, capsys):
    # rebase on 2 problems, and ets with lambda_c 2 on all 3: both made by `ets run`
    assert cli.main(["run", *MOCK, *toy, "--limit", "2", "--strategy", "rebase", "--width", "2"]) == 0
    assert cli.main(["run", *MOCK, *toy, "--limit", "3", "--strategy", "ets", "--lambda-c", "2", "--width", "2"]) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/problems/*.json")}
    assert len(before) == 5
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli.main(["compare", *MOCK, *toy, "--limit", "3", "--methods", "rebase,ets:lambda_c=2",
                     "--widths", "2", "--out", str(out)]) == 0
    dirs = sorted(d.name for d in (tmp_path / "runs").iterdir() if (d / "config.json").exists())
    assert len(dirs) == 2  # the same two run directories: nothing new
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/problems/*.json")}
    assert {p: after[p] for p in before} == before and len(after) == 6  # only rebase's t2 was computed
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["rebase"]["problems"] == rows["ets:lambda_c=2"]["problems"] == 3
    # ets's problems were all done by `ets run`: its throughput comes from that run's session
    assert rows["ets:lambda_c=2"]["tokens_per_s"] > 0 and rows["rebase"]["tokens_per_s"] > 0
    assert rows["ets:lambda_c=2"]["paired_diff"] is not None and rows["rebase"]["paired_diff"] is None
    assert res["ratios"][0]["ets"] == "ets:lambda_c=2"
    md = (out / "results.md").read_text()
    assert "vs REBASE [95% CI]" in md and "ets:lambda_c=2" in md
    # each row says what its prob/s and tok/s were timed on: rebase's two sessions, ets's one
    assert (rows["rebase"]["timed_problems"], len(rows["rebase"]["timed"])) == (3, 2)
    assert "| timed on |" in md and "| 3 (2 ch) |" in md and "| 3 (1 ch) |" in md
    for png in ("accuracy.png", "kv.png", "throughput.png", "selection.png", "widths.png", "accuracy_kv.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| method" in capsys.readouterr().out  # the table is printed too


def test_paired_interval():
    # no discordant problem: the difference is 0, and the interval still has width (Wald's would not)
    d, lo, hi = paired_interval([True] * 3 + [False] * 7, [True] * 3 + [False] * 7)
    assert d == 0 and -0.4 < lo < -0.05 and 0.05 < hi < 0.4
    # uncorrelated table (phi = 0): reduces to Newcombe's independent hybrid interval
    x = [True, True, False, False] * 5
    y = [True, False, True, False] * 5
    d, lo, hi = paired_interval(x, y)
    l1, u1 = wilson(10, 20)
    assert d == 0 and math.isclose(hi, math.sqrt((u1 - 0.5) ** 2 + (0.5 - l1) ** 2)) and math.isclose(lo, -hi)
    # large n: close to the Wald interval of the per-problem differences
    x = [True] * 800 + [True] * 300 + [False] * 200 + [False] * 700
    y = [True] * 800 + [False] * 300 + [True] * 200 + [False] * 700
    diffs = [int(a) - int(b) for a, b in zip(x, y)]
    n, m = len(diffs), sum(diffs) / len(diffs)
    half = 1.96 * math.sqrt(sum((v - m) ** 2 for v in diffs) / (n - 1) / n)
    d, lo, hi = paired_interval(x, y)
    assert math.isclose(d, 0.05) and abs(lo - (m - half)) < 0.003 and abs(hi - (m + half)) < 0.003
    # all discordant one way: inside [-1, 1], excludes 0
    d, lo, hi = paired_interval([True] * 6, [False] * 6)
    assert d == 1 and 0 < lo < 1 and hi == 1
    with pytest.raises(ValueError):
        paired_interval([True], [])


def test_counter_delta_and_trace_measures():
    assert counter_delta({"waves": 5, "peak_kv_tokens": 9, "device": "cpu", "expand_s": 2.5, "mean_batch_rows": 3},
                         {"waves": 2, "peak_kv_tokens": 4, "expand_s": 1.0}) == {"waves": 3, "expand_s": 1.5}
    m = trace_measures([{"engine": {"kv_tokens_peak": 100, "prefix_hits": 0, "prefix_queries": 10}},
                        {"engine": {"kv_tokens_peak": 300, "prefix_hits": 15, "prefix_queries": 20}}, {"engine": {}}])
    assert m == {"measured_kv_mean": 200, "measured_kv_peak": 300, "prefix_hits": 15, "prefix_queries": 30,
                 "prefix_hit_rate": 0.5}
    assert trace_measures([{"engine": {"kv_tokens": 7}}]) == {"measured_kv_mean": 7, "measured_kv_peak": 7}


def test_run_against_a_server_records_hit_rate_and_measured_kv(tmp_path, toy, stand_in, monkeypatch, capsys):
    import ets.factory as f
    from ets.engines.server import ServerPolicy
    from test_server_policy import FakeVLLM

    fake = FakeVLLM(delimiter_only=True)
    srv = stand_in(fake)

    def make_policy(spec, **opts):
        policy = ServerPolicy(spec, model="m", metrics_interval_s=0.01)
        policy.format_prompt = lambda q: (list(range(40)), q)  # no tokenizer behind the stand-in
        return policy

    monkeypatch.setattr(f, "make_policy", make_policy)
    args = ["run", "--policy", srv.url, "--prm", "mock", "--embedder", "hash", "--no-progress", *toy,
            "--limit", "2", "--width", "3", "--max-tokens", "24", "--max-step-tokens", "8"]
    assert cli.main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prefix_cache_queries"] == fake.queries and summary["prefix_cache_hits"] == fake.hits > 0
    assert math.isclose(summary["prefix_cache_hit_rate"], fake.hits / fake.queries)
    assert summary["measured_kv_peak"] == 400 and summary["measured_kv_mean"] == 400  # 0.25 x 1600 tokens
    assert summary["requests"] == len(srv.posts("/v1/completions")) and summary["retries"] == 0
    [run] = [d for d in (tmp_path / "runs").iterdir() if (d / "config.json").exists()]
    rec = json.loads(next((run / "problems").glob("*.json")).read_text())
    assert rec["engine"]["measured_kv_peak"] == 400 and rec["engine"]["prefix_queries"] > 0
    # the human-readable line says it too
    assert cli.main([*args, "--limit", "3"]) == 0
    line = capsys.readouterr().out
    assert "prefix-cache hit rate" in line and "measured KV mean 400" in line


def test_compare_against_a_server_reports_its_load_and_preemptions(tmp_path, toy, stand_in, monkeypatch):
    """The record's server columns: mean running / waiting sequences while requests were out and
    the preemptions counted over the timed chunks (the stand-in preempts once per request)."""
    import ets.factory as f
    from ets.engines.server import ServerPolicy
    from test_server_policy import FakeVLLM

    fake = FakeVLLM(delimiter_only=True)
    srv = stand_in(fake)

    def make_policy(spec, **opts):
        policy = ServerPolicy(spec, model="m", metrics_interval_s=0.01)
        policy.format_prompt = lambda q: (list(range(40)), q)
        return policy

    monkeypatch.setattr(f, "make_policy", make_policy)
    out = tmp_path / "rec"
    assert cli.main(["compare", "--policy", srv.url, "--prm", "mock", "--embedder", "hash", "--no-progress", *toy,
                     "--limit", "2", "--methods", "rebase,ets", "--widths", "2", "--max-tokens", "24",
                     "--max-step-tokens", "8", "--concurrency", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sum(r["preemptions"] for r in rows) == fake.preemptions == len(srv.posts("/v1/completions"))
    assert all(r["preemptions"] > 0 and r["server_running"] == 6 and r["server_waiting"] == 2 for r in rows)
    md = (out / "results.md").read_text()
    assert "| running / waiting | preempted |" in md and "| 6 / 2 |" in md


def test_throughput_ratio_uses_only_chunks_timed_on_the_same_problems():
    """ETS/REBASE tok/s and problems/s come from chunks both runs timed on the same problem set;
    a chunk only one side has (other problems, other in-flight count, another session) is out."""
    from ets.report.record import paired_throughput, ratios

    chunk = lambda ids, wall, tok: {"ids": ids, "wall_s": wall, "generated_tokens": tok, "done": len(ids)}  # noqa: E731
    rebase = [chunk(["a", "b"], 100.0, 1000), chunk(["c"], 400.0, 100)]  # the slow lone chunk is unmatched
    ets = [chunk(["a", "b"], 50.0, 800), chunk(["c", "d"], 10.0, 10)]
    tok, prob, n_chunks, n_problems = paired_throughput(ets, rebase)
    assert (n_chunks, n_problems) == (1, 2)
    assert tok == pytest.approx((800 / 50) / (1000 / 100)) and prob == pytest.approx(2.0)
    assert paired_throughput(ets[1:], rebase) == (None, None, 0, 0)
    row = dict(width=16, kv_mean=10.0, kv_peak=20.0, meas_kv_mean=None, accuracy=0.5, acc_lo=0.1, acc_hi=0.9,
               problems=3, paired_diff=None, paired_lo=None, paired_hi=None)
    (q,) = ratios([row | {"strategy": "rebase", "method": "rebase", "timed": rebase},
                   row | {"strategy": "ets", "method": "ets", "timed": ets}])
    assert q["throughput_ratio"] == pytest.approx(1.6) and q["timed_chunks"] == 1 and q["timed_problems"] == 2


def test_measured_kv_comes_from_timed_problems_and_pairs_like_throughput():
    """The engine's KV figure is the whole engine's: the ETS/REBASE ratio of it uses the chunks
    both timed on the same problems (a lone chunk's figure had other company on the engine)."""
    from ets.report.record import paired_measured_kv

    chunk = lambda ids, kv: {"ids": ids, "wall_s": 1.0, "generated_tokens": 1, "done": len(ids), "meas_kv": kv}  # noqa: E731
    rebase = [chunk(["a", "b"], [300, 500]), chunk(["c"], [9_999])]
    ets = [chunk(["a", "b"], [200, 200]), chunk(["c", "d"], [1, 1])]
    assert paired_measured_kv(ets, rebase) == pytest.approx(400 / 200)
    assert paired_measured_kv(ets[1:], rebase) is None


def test_pooled_problems_leave_the_measured_kv_to_the_timed_ones(tmp_path, toy, stand_in, monkeypatch):
    """Problems a pooled call computed shared the server with other configs' problems: their
    measured KV is left out of the row, as their wall time is; a chunked rerun's problems count."""
    import ets.factory as f
    from ets.engines.server import ServerPolicy
    from test_server_policy import FakeVLLM

    srv = stand_in(FakeVLLM(delimiter_only=True))

    def make_policy(spec, **opts):
        policy = ServerPolicy(spec, model="m", metrics_interval_s=0.01)
        policy.format_prompt = lambda q: (list(range(40)), q)
        return policy

    monkeypatch.setattr(f, "make_policy", make_policy)
    base = ["compare", "--policy", srv.url, "--prm", "mock", "--embedder", "hash", "--no-progress", *toy,
            "--methods", "rebase,ets", "--widths", "2", "--max-tokens", "24", "--max-step-tokens", "8",
            "--concurrency", "2", "--out", str(tmp_path / "rec")]
    assert cli.main([*base, "--limit", "2", "--schedule", "pooled"]) == 0
    assert cli.main([*base, "--limit", "3"]) == 0  # chunks [t0 t1] (done: skipped) and [t2]: timed
    rows = json.loads((tmp_path / "rec" / "results.json").read_text())["rows"]
    assert [r["problems"] for r in rows] == [3, 3]
    assert all(r["meas_kv_problems"] == 1 and r["meas_kv_mean"] == 400 for r in rows)
    assert all([c["ids"] for c in r["timed"]] == [["t2"]] for r in rows)


def test_compare_over_prms_runs_each_config_under_its_own_prm_and_pairs_them(tmp_path, toy, capsys):
    """`--prm mock,default`: every method under each PRM on the same problems. Each config's trees
    are exactly those of a compare with that PRM alone (chunked and pooled alike: each job scores
    with its own PRM), each ETS row pairs with REBASE under its own PRM, and each row under the
    second PRM pairs with the same method under the first."""
    common = [*MOCK, "--limit", "3", "--methods", "rebase,ets", "--widths", "2", "--concurrency", "2"]

    def runs(name):
        return [x if x != str(tmp_path / "runs") else str(tmp_path / name) for x in toy]

    def saved(name):
        out = {}
        for f in (tmp_path / name).glob("*/problems/*.json"):
            r = json.loads(f.read_text())
            out[f.parent.parent.name, f.name] = (r["prm"], r["answer"], r["kv"], r["tree"])
        return out

    for spec in ("mock", "default"):
        assert cli.main(["compare", *common, "--prm", spec, *runs(spec), "--out", str(tmp_path / f"o-{spec}")]) == 0
    alone = {**saved("mock"), **saved("default")}
    assert len(alone) == 12 and len({v[0] for v in alone.values()}) == 2  # two PRMs, named in the records
    for schedule in ("chunked", "pooled"):
        out = tmp_path / f"o-{schedule}"
        assert cli.main(["compare", *common, "--prm", "mock,default", *runs(schedule), "--schedule", schedule,
                         "--out", str(out)]) == 0
        assert saved(schedule) == alone  # same run directory names, same trees, scored by the same PRM
        rows = json.loads((out / "results.json").read_text())["rows"]
        assert [(r["method"], r["prm"]) for r in rows] == [
            ("rebase", "mock"), ("ets", "mock"), ("rebase", "default"), ("ets", "default")]
        by = {(r["method"], r["prm"]): r for r in rows}

        def diff(a, b):
            x = {p["id"]: p["correct"] for p in a["per_problem"]}
            y = {p["id"]: p["correct"] for p in b["per_problem"]}
            return sum(x[i] - y[i] for i in x) / len(x)

        for prm in ("mock", "default"):  # ETS against REBASE under the same PRM
            assert by["ets", prm]["paired_diff"] == pytest.approx(diff(by["ets", prm], by["rebase", prm]))
        for m in ("rebase", "ets"):  # the second PRM against the first, per method
            assert by[m, "default"]["prm_base"] == "mock"
            assert by[m, "default"]["prm_diff"] == pytest.approx(diff(by[m, "default"], by[m, "mock"]))
            assert by[m, "mock"].get("prm_diff") is None
        assert [q["prm"] for q in json.loads((out / "results.json").read_text())["ratios"]] == ["mock", "default"]
        md = (out / "results.md").read_text()
        assert "| PRM |" in md and "vs PRM mock [95% CI]" in md and "ets vs rebase, W=2**, PRM default" in md


def test_every_campaign_stage_is_a_valid_compare_command():
    """benchmarks/campaign.sh --list prints each stage's `ets compare` (or `ets train-prm`): each
    parses with the CLI's own parser and its methods as specs, so a typo in a stage fails here, not
    hours into a session."""
    import shlex
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", str(root / "benchmarks" / "campaign.sh"), "--list"], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin", "ETS": "ets"}).stdout
    stages = dict(line.split(": ", 1) for line in out.splitlines())
    assert {"bon16", "gsm8k-w16", "frontier-w16", "gsm8k-w16-lc2", "learned-prm-w16", "memory-bound",
            "math500-w16-baselines", "learned-prm-train"} <= set(stages)
    for name, command in stages.items():
        argv = shlex.split(command)
        a = cli.build_parser().parse_args(argv[1:])
        assert a.limit and a.out and a.temperature == 0.8 and a.max_tokens == 512, name
        if argv[1] == "train-prm":  # sampling like every compare stage, on training problems only
            assert a.dataset == "gsm8k-train" and a.features == "stats" and a.out.endswith(".npz"), name
            assert "--schedule" not in argv, name
            continue
        assert argv[:2] == ["ets", "compare"], name
        for spec in a.methods:
            parse_method(spec)
        from ets.prm import registry

        for prm in a.prm.split(","):
            spec = registry.parse(prm)  # a spec the registry takes, its options typed
            assert spec.kind in ("default", "learned", "reference"), name
            assert spec.target is None or (root / spec.target).is_file(), f"{name}: {spec.target} is not in the repository"
