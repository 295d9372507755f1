"""Runs are named by the model a served policy samples from, not by where it is served; prompt
templates and system prompts name runs too."""

from __future__ import annotations

import json

import pytest

from ets.config import SamplingConfig, SearchConfig
from ets.runner import RunConfig

CFG = SearchConfig(strategy="best_of_n", width=2, sampling=SamplingConfig(max_step_tokens=8))
TASK = {"name": "gsm8k", "numeric": True, "instruction": "x"}


def tokenizer_folder(path, extra: str = ""):
    """A tiny tokenizer saved as a served model's folder would hold it (vocabulary of 512)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + [f"w{i}{extra}" for i in range(510)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
    return str(path)


def models_server(stand_in, model_id: str):
    return stand_in(lambda m, p, b: (200, {"data": [{"id": model_id, "root": model_id}]}) if p == "/v1/models"
                    else (404, {"error": p}))


def identity_of(url: str):
    from ets.engines.server import ServerPolicy

    return ServerPolicy(url).model_identity()


def test_the_same_model_on_another_port_names_the_same_run(stand_in, tmp_path):
    folder = tokenizer_folder(tmp_path / "qwen-0.5b")
    a, b = models_server(stand_in, folder), models_server(stand_in, folder)
    ia, ib = identity_of(a.url), identity_of(b.url)
    assert ia == ib and ia["served"] == "qwen-0.5b" and ia["root"] == "qwen-0.5b"
    ra = RunConfig(policy=a.url, policy_identity=ia, runs_dir=str(tmp_path / "runs")).run_dir(CFG, TASK)
    rb = RunConfig(policy=b.url, policy_identity=ib, runs_dir=str(tmp_path / "runs")).run_dir(CFG, TASK)
    assert ra.path == rb.path
    assert json.loads((ra.path / "config.json").read_text())["identity"]["policy"]["served"] == "qwen-0.5b"


def test_another_model_on_the_same_url_starts_a_new_run(stand_in, tmp_path):
    one = tokenizer_folder(tmp_path / "one" / "model")
    two = tokenizer_folder(tmp_path / "two" / "model", extra="x")  # same folder name, other vocabulary
    s = models_server(stand_in, one)
    first = RunConfig(policy=s.url, policy_identity=identity_of(s.url), runs_dir=str(tmp_path / "runs"))
    s.close()
    s2 = models_server(stand_in, two)
    second = RunConfig(policy=s2.url, policy_identity=identity_of(s2.url), runs_dir=str(tmp_path / "runs"))
    assert first.policy_identity["served"] == second.policy_identity["served"] == "model"
    assert first.run_dir(CFG, TASK).path != second.run_dir(CFG, TASK).path


def test_a_run_named_by_its_url_is_resumed_once_and_then_kept_to_its_model(stand_in, tmp_path, capsys):
    from ets.runs import NAMED_BY, RunMismatch

    url = "http://127.0.0.1:8000"
    old = RunConfig(policy=url, runs_dir=str(tmp_path)).run_dir(CFG, TASK)  # the older naming
    new = RunConfig(policy=url, policy_identity={"served": "m", "root": "m", "tokenizer": "t1"}, runs_dir=str(tmp_path))
    assert new.run_dir(CFG, TASK).path == old.path
    assert "named by its policy URL" in capsys.readouterr().err and (old.path / NAMED_BY).exists()
    assert new.run_dir(CFG, TASK).path == old.path  # the same model again
    other = RunConfig(policy=url, policy_identity={"served": "m2", "root": "m2", "tokenizer": "t2"}, runs_dir=str(tmp_path))
    with pytest.raises(RunMismatch, match="another model"):
        other.run_dir(CFG, TASK)


def test_prompt_templates_and_system_prompts_name_runs():
    from ets.tasks import gsm8k
    from ets.tasks.prompts import preset

    task = gsm8k.TASK
    assert preset("spec").apply(task) is task
    qm = preset("qwen-math").apply(task)
    assert qm.prompt(gsm8k.load()[0]) == gsm8k.load()[0].question.strip() and "template" in qm.to_dict()
    assert "template" not in task.to_dict()  # runs named before templates keep their names
    base = RunConfig(policy="mock")
    assert base.identity(CFG, task.to_dict()) != base.identity(CFG, qm.to_dict())
    assert "system_prompt" not in base.identity(CFG, TASK)
    assert RunConfig(policy="mock", system_prompt="Be brief.").identity(CFG, TASK)["system_prompt"] == "Be brief."
    with pytest.raises(ValueError, match="unknown prompt template"):
        preset("llama")
    assert preset("sal-llama3").system.startswith("Solve the following math problem efficiently and clearly")


def test_cli_prompt_flags(tmp_path, capsys):
    from ets.cli import main

    assert main(["run", "--policy", "mock", "--prm", "mock", "--embedder", "hash", "--prompt-template", "sal-llama3",
                 "--limit", "1", "--runs-dir", str(tmp_path), "--no-progress"]) == 0
    (run,) = list(tmp_path.iterdir())
    ident = json.loads((run / "config.json").read_text())["identity"]
    assert ident["system_prompt"].startswith("Solve the following") and ident["task"]["template"] == "{question}"
    assert main(["run", "--policy", "mock", "--tokenizer", str(tmp_path), "--runs-dir", str(tmp_path)]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["run", "--policy", "mock", "--prompt-template", "nope", "--runs-dir", str(tmp_path)]) == 2
    assert "unknown prompt template 'nope'" in capsys.readouterr().err
