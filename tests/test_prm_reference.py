"""The reference PRM (a benchmarking instrument that knows the answers) and the PRM registry."""

import asyncio
import math

import pytest

from ets.prm import registry
from ets.prm.base import PRMError, Reference, ScoreRequest
from ets.prm.reference import ReferencePRM, gold_values, numbers, results
from helpers import step_path as node

# GSM8K test problem 0 and its gold solution, as in the data set
QUESTION = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
            "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
            "per fresh duck egg. How much in dollars does she make every day at the farmers' market?")
SOLUTION = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
            "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18")
REF = Reference("18", SOLUTION, numeric=True)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def scores(prm, steps, ref=REF):
    return asyncio.run(prm.score([ScoreRequest(QUESTION, node(steps), ref)]))[0]


def test_values_are_read_from_the_annotations_and_the_steps():
    assert gold_values(SOLUTION) == {9.0, 18.0}
    assert numbers("She sells 1,200 eggs for $2.50 each") == {1200.0, 2.5}
    assert results("16 - 3 = 13 and 13 - 4 = 9, so 9 * $2 = $18") == [13.0, 9.0, 18.0]


def test_clean_scores_follow_the_formula_by_hand():
    prm = ReferencePRM()
    steps = ["She has 16 - 3 - 4 = 9 eggs left.\n\n",       # reaches 9 of the targets {9, 18}
             "She sells them: 9 * 3 = 27 dollars.\n\n",     # a stray result (27)
             "The answer is \\boxed{27}."]                  # wrong final answer
    got = scores(prm, steps)
    want = [sigmoid(4 * 0.5 - 0 - 1), sigmoid(4 * 0.5 - 3 * 0.5 - 1), sigmoid(-3 - 0.5)]
    assert got == pytest.approx(want)
    right = scores(prm, ["16 - 3 - 4 = 9 eggs.\n\n", "9 * 2 = 18.\n\n", "\\boxed{18}"])
    assert right == pytest.approx([sigmoid(1.0), sigmoid(3.0), sigmoid(4.0)])
    # restating the question's numbers proves nothing: no progress, no stray
    assert scores(prm, ["Janet has 16 eggs and eats 3.\n\n"]) == pytest.approx([sigmoid(-1.0)])


def test_noise_is_seeded_by_run_and_path_and_lowers_quality():
    steps = ["16 - 3 - 4 = 9 eggs.\n\n", "9 * 2 = 18.\n\n"]
    a, b = ReferencePRM(noise=1.0, seed=0), ReferencePRM(noise=1.0, seed=0)
    assert scores(a, steps) == scores(b, steps)  # deterministic
    assert scores(a, steps) != scores(ReferencePRM(noise=1.0, seed=1), steps)  # the run's seed matters
    # a step's score depends only on the path up to it (a causal PRM)
    assert scores(a, steps)[0] == scores(a, steps[:1])[0]
    assert scores(a, steps) != scores(ReferencePRM(), steps)


def test_the_reference_prm_needs_the_answer_key():
    with pytest.raises(PRMError, match="answer key"):
        asyncio.run(ReferencePRM().score([ScoreRequest(QUESTION, node(["x\n\n"]))]))


def test_without_annotations_only_final_answers_count():
    ref = Reference("18", "Add them up. The answer is 18.", numeric=True)
    assert scores(ReferencePRM(), ["9 * 2 = 18\n\n", "\\boxed{18}"], ref) == pytest.approx([sigmoid(-1.0), sigmoid(3.0)])


def test_registry_parses_checks_and_names_runs():
    spec = registry.parse("reference?noise=0.5")
    assert (spec.kind, spec.target, spec.get("noise")) == ("reference", None, 0.5)
    assert registry.identity("reference") == registry.identity("reference?noise=0") == "reference"
    assert registry.identity("reference?noise=0.5") == "reference?noise=0.5"
    # options that change no score do not name the run
    assert registry.identity("qwen-prm:/m?device=cuda&batch_size=4") == "qwen-prm:/m"
    assert registry.identity("qwen-prm:/m?dtype=bfloat16") == "qwen-prm:/m?dtype=bfloat16"
    assert registry.identity("http://h:1") == "http://h:1"  # as runs named before the registry
    with pytest.raises(registry.SpecError, match="noise must be >= 0"):
        registry.check(registry.parse("reference?noise=-1"))
    with pytest.raises(registry.SpecError, match="given twice"):
        registry.parse("reference?noise=1&noise=2")
    with pytest.raises(registry.SpecError, match="takes qwen-prm:PATH or qwen-prm:http"):
        registry.parse("qwen-prm")
    assert registry.kind_of("reference").uses_answer_key and not registry.kind_of("default").uses_answer_key


def test_flag_options_fold_into_the_spec_and_never_silently_win():
    spec = registry.parse("math-shepherd:/m")
    assert str(registry.with_flag_options(spec, {"device": "cuda", "noise": None})) == "math-shepherd:/m?device=cuda"
    with pytest.raises(registry.SpecError, match="does not apply to PRM kind math-shepherd"):
        registry.with_flag_options(spec, {"noise": 1.0})
    assert registry.with_flag_options(spec, {"noise": 1.0}, strict=False) == spec  # compare: where it applies
    with pytest.raises(registry.SpecError, match="disagrees with batch_size=4"):
        registry.with_flag_options(registry.parse("math-shepherd:/m?batch_size=4"), {"batch_size": 8})


def test_a_kind_registered_elsewhere_is_found(monkeypatch):
    made = []
    kind = registry.PRMKind("planted", "a test kind", ("none",), lambda spec, ctx: made.append(ctx.seed) or "prm")
    monkeypatch.setitem(registry.KINDS, "planted", kind)
    assert registry.build("planted", registry.BuildContext(seed=3)) == "prm" and made == [3]
    assert "planted" in registry.spec_forms()


def test_compare_runs_under_the_reference_prm_and_names_it(tmp_path):
    from ets.cli import main

    assert main(["compare", "--policy", "mock", "--prm", "reference?noise=1", "--embedder", "hash",
                 "--methods", "rebase", "--widths", "4", "--limit", "2", "--runs-dir", str(tmp_path),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    import json

    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("rebase-")]
    rec = json.loads(next((run / "problems").glob("*.json")).read_text())
    assert rec["prm"] == "reference(noise=1)"
    assert json.loads((run / "config.json").read_text())["identity"]["prm"] == "reference?noise=1"
    assert "reference?noise=1" in (tmp_path / "out" / "results.md").read_text()


def test_worth_rescores_saved_trees_with_any_prm(tmp_path, capsys):
    from ets.cli import main

    assert main(["run", "--policy", "mock", "--prm", "mock", "--strategy", "best_of_n", "--width", "4",
                 "--limit", "3", "--runs-dir", str(tmp_path), "--no-progress"]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("best_of_n-")]
    capsys.readouterr()
    assert main(["worth", str(run), "--prm", "mock,reference", "--out", str(tmp_path / "w.md")]) == 0
    out = capsys.readouterr().out
    assert "| mock-prm | 3 |" in out and "| reference(noise=0) | 3 |" in out
    import json

    rows = json.loads((tmp_path / "w.json").read_text())
    assert [r["prm"] for r in rows] == ["mock-prm", "reference(noise=0)"] and rows[0]["problems"] == 3
    # without --prm: the run's own saved scores
    assert main(["worth", str(run)]) == 0
    assert "PRM-weighted vote" in capsys.readouterr().out
    assert main(["worth", str(run), "--prm", "nonsense"]) == 2
