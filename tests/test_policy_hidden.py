"""benchmarks/policy_hidden.py (the policy's hidden state at each step's end, read from a run's
saved trees) and benchmarks/hidden_probe_cv.py (value heads on those states), on a planted toy run
and the real default model (slow: loads it)."""

import runpy

import numpy as np
import pytest

from ets.runs import RunDir
from ets.treeio import tree_from_dict

from test_learned_prm import BENCH, _script, _train, planted, toy  # noqa: F401 (fixtures)


@pytest.mark.slow
def test_each_node_gets_its_own_prefix_state_and_the_probe_judges_them(toy, tmp_path, planted, capsys, monkeypatch):  # noqa: F811
    import torch

    assert _train(toy, tmp_path, "--features", "stats")[0] == 0
    [run] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    hidden = tmp_path / "hidden"
    assert _script("policy_hidden.py", [str(run), str(hidden), "--layers", "4,30", "--dtype", "float32"], monkeypatch) == 0
    recs = list(RunDir(run).iter_problems())
    assert sorted(p.name for p in hidden.glob("*.npz")) == sorted(f"{r['id']}.npz" for r in recs)

    # a node's state is the one a forward pass over its own prefix alone gives at its last token
    model = runpy.run_path(str(BENCH / "policy_hidden.py"))["load_model"](None, "float32")
    tree = tree_from_dict(recs[0]["tree"])
    z = np.load(hidden / f"{recs[0]['id']}.npz")
    assert list(z["layers"]) == [4, 30]
    assert sorted(z["node"]) == sorted(n.id for n in tree.nodes[1:] if n.token_ids)
    assert z["h"].shape == (len(z["node"]), 2, model.config.hidden_size)
    node = max(tree.nodes[1:], key=lambda n: n.depth)  # a deep one: its state must not see its siblings
    ids = tree.nodes[0].token_ids + [t for n in node.path() for t in n.token_ids]
    with torch.inference_mode():
        want = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    got = z["h"][list(z["node"]).index(node.id)].astype(np.float32)
    for j, layer in enumerate((4, 30)):
        np.testing.assert_allclose(got[j], want[layer][0, -1].numpy(), rtol=2e-2, atol=2e-2)
    # resumable: a second run skips every problem with a file
    before = {p: p.stat().st_mtime_ns for p in hidden.glob("*.npz")}
    capsys.readouterr()
    assert _script("policy_hidden.py", [str(run), str(hidden), "--layers", "4,30", "--dtype", "float32"], monkeypatch) == 0
    assert {p: p.stat().st_mtime_ns for p in hidden.glob("*.npz")} == before

    capsys.readouterr()
    assert _script("hidden_probe_cv.py", [str(run), str(hidden), "--test", str(run), "--test-hidden", str(hidden),
                                          "--sets", "stats,L30,L4+stats,L30-within", "--l2", "0.01", "--folds", "3"],
                   monkeypatch) == 0
    out = capsys.readouterr().out
    cv = {line.split()[1]: line for line in out.splitlines() if line.strip().startswith("cv ")}
    assert set(cv) == {"stats", "L30", "L4+stats", "L30-within"}
    assert sum(line.strip().startswith("test ") for line in out.splitlines()) == 4
    # the planted plan ("careful" -> mostly right) is in the statistics and in the policy's context
    for name in ("stats", "L4+stats"):
        assert float(cv[name].split("final AUROC ")[1].split()[0]) > 0.85, cv[name]
