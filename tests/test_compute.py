"""Compute accounting (issue 40 item 2): per-problem `compute` in the records, run figures in
summary.json and results.json, the compute columns and plots of `ets compare`, the best-of-n
curve, PRM token counts, parameter counts, and old records without any of it."""

from __future__ import annotations

import asyncio
import json
import math
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

import ets.cli as cli
from ets.measures import compute_of, compute_summary, folder_params, model_params, parse_count, percentile
from ets.prm.base import PROBLEM_COUNTERS, ScoreRequest
from ets.runs import RunDir, summarize
from conftest import toy_dataset

ROOT = Path(__file__).resolve().parent.parent
MOCK = ["--policy", "mock", "--prm", "mock", "--embedder", "hash", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"
OLD_RUN = ROOT / "benchmarks/results/prm-signal-bon16-gsm8k-200/rollouts-best_of_n-w16-9a152f1c.tar.xz"


@pytest.fixture
def toy(tmp_path):
    return toy_dataset(tmp_path, 3)


def compare(tmp_path, toy, *extra):
    out = tmp_path / "out"
    args = ["compare", *MOCK, *toy, "--methods", "ets,rebase,best_of_n", "--widths", "2,4", "--out", str(out), *extra]
    assert cli.main(args) == 0
    return out, json.loads((out / "results.json").read_text())


def runs(tmp_path):
    return sorted(p for p in (tmp_path / "runs").iterdir() if (p / "config.json").is_file())


def by_hand(rec: dict) -> dict:
    """The record's compute figures recomputed from its saved tree alone."""
    nodes = rec["tree"]["nodes"]
    parent = {n["id"]: n["parent"] for n in nodes}
    kids = {p for p in parent.values() if p is not None}

    def path(i):  # the node's steps, root excluded, in order
        out = []
        while parent[i] is not None:
            out.append(nodes[i])
            i = parent[i]
        return out[::-1]

    prompt_len = len(nodes[0]["token_ids"])
    return {
        "generated_tokens": sum(len(n["token_ids"]) for n in nodes if n["parent"] is not None),
        # each expanded node's request: the prompt and every step to it
        "prompt_tokens": sum(prompt_len + sum(len(s["token_ids"]) for s in path(n["id"])) for n in nodes
                             if n["id"] in kids),
        # the mock PRM reads the words of the question and of every step of each child it scores
        "prm_tokens": sum(len(" ".join([rec["prompt"], *(s["text"] for s in path(n["id"]))]).split())
                          for n in nodes if n["parent"] is not None),
    }


def hand_percentile(values, q):
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


@pytest.mark.slow  # several seconds (the fast selection keeps the best-of-n test's compare)
def test_compare_records_compute_equal_to_sums_from_the_trees(tmp_path, toy):
    out, res = compare(tmp_path, toy, "--policy-params", "0.5e9")
    dirs = runs(tmp_path)
    assert len(dirs) == 6
    for d in dirs:
        recs = list(RunDir(d).iter_problems())
        assert len(recs) == 3
        for r in recs:
            c, h = r["compute"], by_hand(r)
            assert c["generated_tokens"] == h["generated_tokens"] == r["counters"]["generated_tokens"] > 0
            assert c["prompt_tokens"] == h["prompt_tokens"] > 0
            assert c["prm_tokens"] == h["prm_tokens"] > 0
            assert c["prefilled_tokens"] is None  # the mock engine measures no prefill
            assert c["wall_s"] == r["counters"]["wall_s"]
            assert c["policy_params"] == 0.5e9 and c["prm_params"] is None
            assert c["policy_flops"] == 2 * 0.5e9 * (h["generated_tokens"] + h["prompt_tokens"])
            assert c["prm_flops"] is None and c["flops"] is None  # no PRM parameter count: unknown, not 0
        s = json.loads((d / "summary.json").read_text())
        walls = [r["counters"]["wall_s"] for r in recs]
        assert s["prompt_tokens"] == sum(by_hand(r)["prompt_tokens"] for r in recs)
        assert s["prm_tokens"] == sum(by_hand(r)["prm_tokens"] for r in recs)
        assert s["prm_tokens_mean"] == pytest.approx(s["prm_tokens"] / 3)
        assert s["policy_flops"] == pytest.approx(sum(r["compute"]["policy_flops"] for r in recs))
        assert s["flops"] is None and s["policy_params"] == 0.5e9
        for q in (50, 90, 99):
            assert s[f"latency_p{q}"] == pytest.approx(hand_percentile(walls, q))
        # the tokens charged per problem add up to the PRM's own counter over the sessions
        sessions = RunDir(d).sessions()
        assert sum(x["prm"]["prm_tokens"] for x in sessions) == s["prm_tokens"]

    rows = res["rows"]
    assert len(rows) == 6
    for row in rows:
        recs = {r["id"]: r for r in RunDir(row["run_dir"]).iter_problems()}
        assert row["prompt_tokens_mean"] == pytest.approx(sum(by_hand(r)["prompt_tokens"] for r in recs.values()) / 3)
        assert row["policy_flops_mean"] == pytest.approx(
            sum(2 * 0.5e9 * (r["compute"]["generated_tokens"] + r["compute"]["prompt_tokens"]) for r in recs.values()) / 3)
        assert row["latency_p90"] == pytest.approx(hand_percentile([r["counters"]["wall_s"] for r in recs.values()], 90))
        assert [p["prm_tokens"] for p in row["per_problem"]] == [recs[p["id"]]["compute"]["prm_tokens"]
                                                                 for p in row["per_problem"]]

    md = (out / "results.md").read_text()
    for col in ("gen tok/prob", "prompt tok/prob", "PRM tok/prob", "policy FLOPs/prob", "latency p50 / p90 s"):
        assert f"| {col} |" in md
    assert "| FLOPs/prob |" not in md  # policy + PRM: the PRM's parameters are unknown
    assert "## Compute" in md and "best_of_n W=4: best-of-n from one run" in md
    for png in ("accuracy_tokens.png", "accuracy_flops.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_best_of_n_curve_is_the_subsampled_accuracy_of_its_widest_row(tmp_path, toy):
    from ets.report.subsample import subsample_markdown, subsampled_accuracy

    out, res = compare(tmp_path, toy)
    for row in res["rows"]:  # (the fast selection's check of the records; the slow test has the rest)
        for r in RunDir(row["run_dir"]).iter_problems():
            assert {k: r["compute"][k] for k in ("generated_tokens", "prompt_tokens", "prm_tokens")} == by_hand(r)
    bon = {r["width"]: r for r in res["rows"] if r["strategy"] == "best_of_n"}
    assert "best_of_n_curve" not in bon[2]  # the widest best_of_n row only
    recs = list(RunDir(bon[4]["run_dir"]).iter_problems())
    want = subsampled_accuracy(recs)
    assert bon[4]["best_of_n_curve"] == want and want["n"] == [1, 2, 4]
    assert want["weighted"][-1] == bon[4]["accuracy"]  # n = W: the run's own (weighted) vote
    assert subsample_markdown(want) in (out / "results.md").read_text()
    assert not any("best_of_n_curve" in r for r in res["rows"] if r["strategy"] != "best_of_n")


@pytest.mark.slow  # several seconds (the fast selection keeps the best-of-n test's compare)
def test_flops_are_none_without_parameter_counts_and_the_flags_apply_at_report_time(tmp_path, toy):
    out, res = compare(tmp_path, toy)
    for d in runs(tmp_path):
        for r in RunDir(d).iter_problems():
            c = r["compute"]
            assert c["policy_params"] is None and c["policy_flops"] is None and c["flops"] is None
            assert c["prm_tokens"] == by_hand(r)["prm_tokens"]  # tokens are counted all the same
    assert all(r["policy_flops_mean"] is None and r["flops_mean"] is None for r in res["rows"])
    md = (out / "results.md").read_text()
    assert "FLOPs/prob" not in md and "| PRM tok/prob |" in md
    assert (out / "accuracy_tokens.png").read_bytes()[:8] == PNG
    assert not (out / "accuracy_flops.png").exists()  # nothing known to draw

    # the same compare with both counts: nothing recomputed, the FLOPs come from the flags
    stamps = {p: p.stat().st_mtime_ns for d in runs(tmp_path) for p in (d / "problems").glob("*.json")}
    out, res = compare(tmp_path, toy, "--policy-params", "135M", "--prm-params", "2e6")
    assert stamps == {p: p.stat().st_mtime_ns for d in runs(tmp_path) for p in (d / "problems").glob("*.json")}
    for row in res["rows"]:
        recs = list(RunDir(row["run_dir"]).iter_problems())
        gen_prompt = sum(r["compute"]["generated_tokens"] + r["compute"]["prompt_tokens"] for r in recs)
        prm = sum(r["compute"]["prm_tokens"] for r in recs)
        assert row["policy_params"] == 135e6 and row["prm_params"] == 2e6
        assert row["flops_mean"] == pytest.approx((2 * 135e6 * gen_prompt + 2 * 2e6 * prm) / 3)
    md = (out / "results.md").read_text()
    assert "| FLOPs/prob |" in md and "| policy FLOPs/prob |" in md
    assert (out / "accuracy_flops.png").read_bytes()[:8] == PNG


@pytest.mark.slow  # several seconds (the fast selection keeps the best-of-n test's compare)
def test_an_old_record_without_compute_still_reads(tmp_path):
    subprocess.run(["tar", "-xJf", str(OLD_RUN), "-C", str(tmp_path)], check=True)
    run = RunDir(tmp_path / "best_of_n-w16-9a152f1c")
    recs = list(run.iter_problems())[:20]
    assert recs and not any("compute" in r for r in recs)  # made before compute accounting
    s = summarize(recs, run.sessions())
    assert s["problems"] == 20
    assert s["prompt_tokens"] == sum(by_hand(r)["prompt_tokens"] for r in recs)  # derived from the trees
    assert s["prm_tokens"] is None and s["flops"] is None and s["policy_params"] is None
    assert s["prefilled_tokens"] is None  # 32 problems shared the server: not one problem's figure
    assert s["latency_p50"] == pytest.approx(hand_percentile([r["counters"]["wall_s"] for r in recs], 50))
    c = compute_of(recs[0], {"policy": 1e9})
    assert c["policy_flops"] == 2e9 * (c["generated_tokens"] + c["prompt_tokens"]) and c["flops"] is None

    from ets.experiment import parse_method
    from ets.report.record import rows, table

    ids = [r["id"] for r in recs]
    arm = SimpleNamespace(method=parse_method("best_of_n"), width=16, dataset="", run=run, prm="",
                          problems=[SimpleNamespace(id=i) for i in ids])
    [row] = rows([arm], ids)
    assert row["problems"] == 20 and row["prompt_tokens_mean"] == pytest.approx(s["prompt_tokens"] / 20)
    assert row["prm_tokens_mean"] is None and row["best_of_n_curve"]["n"] == [1, 2, 4, 8, 16]
    assert "| prompt tok/prob |" in table([row]) and "PRM tok/prob" not in table([row])


def test_percentile_and_parameter_counts():
    assert percentile([], 50) is None and percentile([3.0], 99) == 3.0
    assert percentile([4, 1, 3, 2], 50) == 2.5 and percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile(list(range(101)), 99) == 99
    assert parse_count("0.5e9") == 5e8 and parse_count("135M") == 135e6 and parse_count("7B") == 7e9
    assert parse_count("1_000") == 1000
    for bad in ("abc", "-1", "nan", ""):
        with pytest.raises(ValueError):
            parse_count(bad)
    with pytest.raises(SystemExit) as e:
        cli.main(["run", *MOCK, "--policy-params", "lots"])
    assert e.value.code == 2
    assert compute_summary([]) ["latency_p50"] is None and compute_summary([])["prm_tokens"] is None


def _safetensors(path: Path, shapes: dict) -> None:
    header = {k: {"dtype": "F32", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_folder_params_from_safetensors_headers_else_config(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    _safetensors(a / "model-00001-of-00002.safetensors", {"x": [3, 4], "y": [5]})
    _safetensors(a / "model-00002-of-00002.safetensors", {"z": [2, 2, 2]})
    assert folder_params(a) == 12 + 5 + 8
    b = tmp_path / "b"
    b.mkdir()
    cfg = {"hidden_size": 8, "num_hidden_layers": 2, "intermediate_size": 16, "vocab_size": 10,
           "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
    (b / "config.json").write_text(json.dumps(cfg))
    # embeddings 10*8; per layer q,o 8*8 each, k,v 8*4 each, MLP 3*8*16, two norms 2*8; final norm 8
    assert folder_params(b) == 80 + 2 * (64 * 2 + 32 * 2 + 384 + 16) + 8
    (b / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 8}))
    assert folder_params(b) is None  # mixture of experts: not counted
    assert folder_params(tmp_path / "nowhere") is None and folder_params(tmp_path) is None
    served = SimpleNamespace(servers=[SimpleNamespace(root=str(a), model="m")], model=None)
    assert model_params(served) == 25 and model_params(SimpleNamespace()) is None
    assert model_params(SimpleNamespace(servers=[SimpleNamespace(root="org/model", model="org/model")],
                                        model=None)) is None  # a hub name: unknown, never a guess


def test_model_prm_counts_the_tokens_it_encodes_per_problem():
    torch = pytest.importorskip("torch")
    from ets.engines.base import DELIMITER
    from ets.prm.math_shepherd import ModelPRM
    from ets.tree import Tree

    class WordPRM(ModelPRM):  # one token per word; each step scored at its last word
        name = "words"

        def encode_path(self, question, steps):
            ids, at = [1] * len(question.split()), []
            for s in steps:
                ids += [2] * len(s.split())
                at.append(len(ids) - 1)
            return ids, at

        def _good_prob(self, input_ids, attention_mask):
            return torch.full(input_ids.shape, 0.5)

    model = torch.nn.Linear(3, 2)
    prm = WordPRM(model, SimpleNamespace(pad_token_id=0), device="cpu")
    assert model_params(prm) == 8
    tree = Tree([1], "q")
    a = tree.add_child(tree.root, [2], "one two\n\n", DELIMITER)
    b = tree.add_child(a, [3], "three four five\n\n", DELIMITER)
    c = tree.add_child(tree.root, [4], "six\n\n", DELIMITER)

    async def problem(reqs):
        charged: dict = {}
        token = PROBLEM_COUNTERS.set(charged)
        try:
            await prm.score(reqs)
        finally:
            PROBLEM_COUNTERS.reset(token)
        return charged.get("prm_tokens", 0)

    async def go():  # two problems at once: each gets its own paths' tokens
        return await asyncio.gather(problem([ScoreRequest("a question", b)]), problem([ScoreRequest("q", c)]))

    assert asyncio.run(go()) == [2 + 5, 1 + 1]
    assert prm.stats()["prm_tokens"] == 9
    assert asyncio.run(problem([ScoreRequest("a question", a)])) == 0  # a prefix already scored: nothing read
    assert prm.stats()["prm_tokens"] == 9


def test_served_prm_counts_the_servers_prompt_tokens(stand_in):
    from ets.engines.base import DELIMITER
    from ets.prm.served import ServedPRM
    from ets.tree import Tree

    def pooling(method, path, body):
        data = [{"index": i, "data": [[0.0, 1.0]] * text.count("<extra_0>")} for i, text in enumerate(body["input"])]
        return 200, {"data": data, "usage": {"prompt_tokens": 17 * len(body["input"]), "total_tokens": 0}}

    srv = stand_in(pooling)
    tree = Tree([1], "q")
    a = tree.add_child(tree.root, [2], "First.\n\n", DELIMITER)
    b = tree.add_child(tree.root, [3], "Other.\n\n", DELIMITER)
    prm = ServedPRM(srv.url)

    async def go():
        charged: dict = {}
        token = PROBLEM_COUNTERS.set(charged)
        try:
            await prm.score([ScoreRequest("q", a), ScoreRequest("q", b)])
        finally:
            PROBLEM_COUNTERS.reset(token)
            await prm.aclose()
        return charged

    assert asyncio.run(go()) == {"prm_tokens": 34}
    assert prm.stats()["prm_tokens"] == 34
    assert math.isclose(compute_of({"compute": {"prm_tokens": 34, "generated_tokens": 1, "prompt_tokens": 1}},
                                   {"prm": 1e6})["prm_flops"], 2e6 * 34)
