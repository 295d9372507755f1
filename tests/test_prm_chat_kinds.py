"""The chat-model PRM kinds (rlhflow, judge, orm) on tiny checkpoints built here (no download):
in-process scores equal a hand computation from the logits; served clients, talking to loopback
stand-ins that answer as vLLM 0.32 does, send the in-process prompt and give the in-process
scores; one `server` test checks both against a real vLLM server on the same checkpoint."""

import asyncio
import json
import math
import subprocess
import sys

import pytest
import torch

from ets.prm import registry
from ets.prm.base import PRMError, ScoreRequest
from ets.prm.chat_prms import two_class, unlisted_bound
from ets.prm.judge import JudgePRM, ServedJudge, judge_messages, yes_no_score
from ets.prm.orm import ORMPRM, ServedORM, orm_messages
from ets.prm.rlhflow import RLHFlowPRM, ServedRLHFlow, conversation
from helpers import step_path as path

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = (["<pad>", "<unk>", "system", "user", "assistant", "+", "-", "Yes", "No", "yes", "no", "Question:",
          "Previous", "steps:", "Step", "to", "judge:", "Is", "this", "step", "correct?", "Answer", "or", "No.",
          "(none)", "=", "so", "the", "answer", "is", "What", "?", "ки", "Be", "strict."]
         + [str(i) for i in range(20)] + [f"{i}:" for i in range(1, 6)])


def tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    out.chat_template = CHATML
    return out


def tiny_llama(vocab, eos=None, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                        initializer_range=0.5, pad_token_id=0, bos_token_id=None,
                                        eos_token_id=eos, tie_word_embeddings=False)).eval()


def tiny_orm(vocab):
    """A one-label Llama classifier (a Qwen2 folder would load our tokenizer as Qwen2Tokenizer,
    which re-tokenizes our word-level vocabulary)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, num_labels=1, pad_token_id=0,
                                                      initializer_range=0.5)).eval()


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_llama(len(tok), eos=tok.eos_token_id)


def run(coro):
    return asyncio.run(coro)


Q = " What is 1 + 2 ? "
PATHS = [["1 + 2 = 3\n\n", "so the answer is 3"], ["  2 + 1 = 3 ки\n\n"], ["1 + 2 = 3\n\n", "3 = 3\n\n", "so 3"]]


def requests(paths=PATHS, q=Q):
    return [ScoreRequest(q, path(p)) for p in paths]


def same(got, want, tol=1e-5):
    """Step scores per path: the same shape, and each score within tol."""
    return [len(g) for g in got] == [len(w) for w in want] and all(
        g == pytest.approx(w, abs=tol) for g, w in zip(got, want))


def log_softmax_rows(model, ids):
    """[T, V] log-probs of the next token at every position of one sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


# -- rules -----------------------------------------------------------------------------------------

def test_two_class_rule_for_a_class_missing_from_the_top_k():
    assert two_class(0.6, 0.2, 0.1) == pytest.approx(0.75)
    # `-` unlisted: taken at the largest probability an unlisted token can have (the lowest score)
    assert unlisted_bound([0.6, 0.3]) == pytest.approx(0.1)  # 1 - sum is below the smallest listed
    assert unlisted_bound([0.5, 0.05]) == pytest.approx(0.05)  # the smallest listed bounds it
    assert unlisted_bound([0.5], others=[0.45]) == pytest.approx(0.05)  # the prompt's own token counts
    assert two_class(0.6, None, unlisted_bound([0.6, 0.3])) == pytest.approx(0.6 / 0.7)
    assert two_class(None, None, 0.0) == 0.5 and two_class(None, None, 0.2) == 0.5


def test_yes_no_variants_are_summed_and_anything_else_ignored():
    top = [(" Yes", 0.5), ("yes", 0.1), ("\nYES", 0.05), (" No", 0.2), ("Yes.", 0.1), ("Maybe", 0.05)]
    assert yes_no_score(top) == pytest.approx(0.65 / 0.85)
    assert yes_no_score([(" No", 0.9), ("So", 0.05)]) == pytest.approx(0.05 / 0.95)  # Yes taken at 1 - 0.95


# -- rlhflow ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rlhflow(tok, lm):
    return RLHFlowPRM(lm, tok, device="cpu", batch_size=2)


def test_rlhflow_conversation_is_the_cards(rlhflow):
    assert conversation(" Q? ", ["  a\n\n", "b ки\n"]) == [
        {"role": "user", "content": "Q? a"}, {"role": "assistant", "content": "+"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "+"}]
    assert rlhflow.text("Q?", ["1 = 1\n\n", "so 1"]) == (
        "<|im_start|>user\nQ? 1 = 1<|im_end|>\n<|im_start|>assistant\n+<|im_end|>\n"
        "<|im_start|>user\nso 1<|im_end|>\n<|im_start|>assistant\n+<|im_end|>\n")


def test_rlhflow_scores_equal_p_plus_over_plus_minus_at_each_answer(rlhflow, tok, lm):
    reqs = requests()
    got = run(rlhflow.score(reqs))
    plus, minus, assistant = (tok.convert_tokens_to_ids(t) for t in ("+", "-", "assistant"))
    for req, scores in zip(reqs, got):
        ids = tok.encode(rlhflow.text(req.question, req.node.step_texts()), add_special_tokens=False)
        answers = [j for j in range(1, len(ids)) if ids[j] == plus and ids[j - 1] == assistant]  # not a step's "+"
        lp = log_softmax_rows(lm, ids)
        want = [1 / (1 + math.exp(lp[j - 1, minus] - lp[j - 1, plus])) for j in answers]
        assert len(scores) == req.node.depth == len(answers)
        assert scores == pytest.approx(want, abs=1e-5)
    # a step's score depends on steps 1..k only: the 2-step prefix of path 3 scores as path 1's first step
    assert got[2][0] == pytest.approx(got[0][0], abs=1e-6)


def vllm_prompt_logprobs(tok, model, text, k):
    """What vLLM 0.32 answers for prompt_logprobs=k: per prompt token (None first) the top-k of
    its position and the prompt's own token, keyed by the id as a JSON string."""
    ids = tok.encode(text, add_special_tokens=False)
    lp = log_softmax_rows(model, ids)
    out = [None]
    for j in range(1, len(ids)):
        order = lp[j - 1].argsort(descending=True).tolist()
        keep = order[:k] + ([ids[j]] if ids[j] not in order[:k] else [])
        out.append({str(t): {"logprob": lp[j - 1, t].item(), "rank": order.index(t) + 1,
                             "decoded_token": tok.decode([t])} for t in keep})
    return ids, out


def test_served_rlhflow_sends_the_in_process_text_and_gets_its_scores(rlhflow, tok, lm, stand_in):
    def answer(method, path_, body):
        ids, lps = vllm_prompt_logprobs(tok, lm, body["prompt"], body["prompt_logprobs"])
        return 200, {"choices": [{"index": 0, "text": "+", "prompt_logprobs": lps, "prompt_token_ids": ids}]}

    srv = stand_in(answer)
    served = ServedRLHFlow(srv.url, tok, top_k=len(tok))
    reqs = requests()
    got = run(served.score(reqs))
    assert same(got, run(rlhflow.score(reqs)))
    sent = srv.posts("/v1/completions")
    # the requests go out concurrently: the same texts, in any order
    assert sorted(b["prompt"] for b in sent) == sorted(rlhflow.text(r.question, r.node.step_texts()) for r in reqs)
    assert all(b["add_special_tokens"] is False and b["max_tokens"] == 1 and b["return_token_ids"] for b in sent)
    # every prefix is cached: the same paths again send nothing, a one-step extension one request
    run(served.score(reqs))
    assert len(srv.posts("/v1/completions")) == 3
    run(served.score(requests([PATHS[2] + ["so the answer is 3"]])))
    assert len(srv.posts("/v1/completions")) == 4
    run(served.aclose())


def test_served_rlhflow_without_minus_in_the_top_k_takes_the_lowest_score(tok, lm, stand_in):
    def answer(method, path_, body):
        ids, lps = vllm_prompt_logprobs(tok, lm, body["prompt"], 1)
        return 200, {"choices": [{"prompt_logprobs": lps, "prompt_token_ids": ids}]}

    srv = stand_in(answer)
    served = ServedRLHFlow(srv.url, tok, top_k=1)
    got = run(served.score(requests(PATHS[:1])))[0]
    text = srv.posts("/v1/completions")[0]["prompt"]
    ids = tok.encode(text, add_special_tokens=False)
    lp = log_softmax_rows(lm, ids).exp()
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    want = []
    assistant = tok.convert_tokens_to_ids("assistant")
    for j in [j for j in range(1, len(ids)) if ids[j] == plus and ids[j - 1] == assistant]:
        p, first = lp[j - 1].tolist(), lp[j - 1].argmax().item()
        if first == minus:  # `-` is the top-1: exact
            want.append(p[plus] / (p[plus] + p[minus]))
        else:  # `-` unlisted: at most the top-1's probability and what the listed ones leave
            bound = min(p[first], 1 - p[first] - (p[plus] if first != plus else 0))
            want.append(p[plus] / (p[plus] + bound))
    assert got == pytest.approx(want, abs=1e-5) and served.minus_unlisted >= 1


def test_served_rlhflow_refuses_a_server_that_tokenizes_otherwise(tok, lm, stand_in):
    def answer(method, path_, body):
        ids, lps = vllm_prompt_logprobs(tok, lm, body["prompt"], 2)
        return 200, {"choices": [{"prompt_logprobs": lps, "prompt_token_ids": ids[:-1] + [1]}]}

    served = ServedRLHFlow(stand_in(answer).url, tok)
    with pytest.raises(PRMError, match="tokenizes the prompt differently"):
        run(served.score(requests(PATHS[:1])))


def test_rlhflow_refuses_a_template_that_does_not_fit(lm):
    tok = tokenizer()
    # the assistant's turn opens with a word its generation prompt does not write
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'so ' }}{% endif %}"
                         "{{ m['content'] + ' ' }}{% endfor %}")
    with pytest.raises(PRMError, match="template"):
        run(RLHFlowPRM(lm, tok, device="cpu").score(requests(PATHS[:1])))


# -- judge -----------------------------------------------------------------------------------------

def test_judge_prompt_is_fixed():
    assert judge_messages(" Q? ", ["a\n\n", " b\n"], system="Be strict.") == [
        {"role": "system", "content": "Be strict."},
        {"role": "user", "content": "Question:\nQ?\n\nPrevious steps:\nStep 1: a\n\nStep to judge:\nStep 2: b\n\n"
                                    "Is this step correct? Answer Yes or No."}]
    assert "Previous steps:\n(none)\n" in judge_messages("Q", ["a"])[0]["content"]


def test_judge_scores_equal_yes_over_yes_plus_no_of_the_first_token(tok, lm):
    judge = JudgePRM(lm, tok, top_k=len(tok), device="cpu", batch_size=2)
    reqs = requests()
    got = run(judge.score(reqs))
    ids_of = tok.convert_tokens_to_ids
    for req, scores in zip(reqs, got):
        steps = req.node.step_texts()
        assert len(scores) == len(steps)
        for k in range(len(steps)):
            ids = tok.encode(judge.prompt(req.question, steps[: k + 1]), add_special_tokens=False)
            p = log_softmax_rows(lm, ids)[-1].exp()
            y, n = p[ids_of("Yes")] + p[ids_of("yes")], p[ids_of("No")] + p[ids_of("no")]
            assert scores[k] == pytest.approx((y / (y + n)).item(), abs=1e-5)
    # each distinct prefix judged once: paths 1 and 3 share their first step
    assert judge.judged == 2 + 1 + 2


def chat_completion_answer(tok, model, messages, k):
    """What vLLM 0.32 answers for max_tokens 1, logprobs, top_logprobs k."""
    ids = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(ids, add_special_tokens=False)
    lp = log_softmax_rows(model, ids)[-1]
    order = lp.argsort(descending=True).tolist()[:k]
    top = [{"token": tok.decode([t]), "logprob": lp[t].item(), "bytes": list(tok.decode([t]).encode())} for t in order]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0]["token"]},
                         "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}]}


def test_served_judge_sends_the_in_process_chat_and_judges_each_new_step_once(tok, lm, stand_in):
    srv = stand_in(lambda m, p, body: (200, chat_completion_answer(tok, lm, body["messages"], body["top_logprobs"])))
    for k in (len(tok), 3):  # all tokens listed, and a top-3 where Yes or No may be missing
        local = JudgePRM(lm, tok, system="Be strict.", top_k=k, device="cpu")
        served = ServedJudge(srv.url, system="Be strict.", top_k=k, model="tiny")
        reqs = requests()
        assert same(run(served.score(reqs)), run(local.score(reqs)))
        run(served.aclose())
    sent = srv.posts("/v1/chat/completions")
    # the requests go out concurrently: find the one that judged the first step of the first path
    [first] = [b for b in sent[:len(sent) // 2] if b["messages"] == local.messages(Q, PATHS[0][:1])]
    assert first["model"] == "tiny" and first["max_tokens"] == 1 and first["logprobs"] is True
    # the in-process judge reads the text the server renders from these messages
    assert tok.apply_chat_template(first["messages"], tokenize=False, add_generation_prompt=True) == \
        local.prompt(Q, PATHS[0][:1])
    # a path of k steps whose first k-1 were scored costs one request
    n = len(srv.posts("/v1/chat/completions"))
    run(served.score(requests([PATHS[2] + ["so the answer is 3"]])))
    assert len(srv.posts("/v1/chat/completions")) == n + 1


def test_served_judge_names_a_server_without_logprobs(stand_in):
    served = ServedJudge(stand_in(lambda m, p, b: (200, {"choices": [{"message": {"content": "Yes"}}]})).url)
    with pytest.raises(PRMError, match="top_logprobs") as e:
        run(served.score(requests(PATHS[:1])))
    assert "PRM server" in e.value.hint


def test_worth_measures_the_served_judge_on_saved_trees(tmp_path, stand_in, capsys):
    from ets.cli import main

    def answer(method, path_, body):
        yes = -0.2 if "3" in body["messages"][-1]["content"].split("Step to judge:")[1] else -2.0
        top = [{"token": " Yes", "logprob": yes}, {"token": " No", "logprob": math.log(1 - math.exp(yes))}]
        return 200, {"choices": [{"logprobs": {"content": [{"token": " Yes", "logprob": yes, "top_logprobs": top}]}}]}

    srv = stand_in(answer)
    assert main(["run", "--policy", "mock", "--prm", "mock", "--strategy", "best_of_n", "--width", "4",
                 "--limit", "3", "--runs-dir", str(tmp_path), "--no-progress"]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("best_of_n-")]
    capsys.readouterr()
    assert main(["worth", str(run_dir), "--prm", f"judge:{srv.url}", "--limit", "2", "--out",
                 str(tmp_path / "w.md")]) == 0
    rows = json.loads((tmp_path / "w.json").read_text())
    assert rows[0]["prm"] == "served-prm:judge" and rows[0]["problems"] == 2
    assert srv.posts("/v1/chat/completions")


# -- orm -------------------------------------------------------------------------------------------

def test_orm_scores_the_whole_path_and_every_step_carries_it(tok, tmp_path, stand_in):
    model = tiny_orm(len(tok))
    model.save_pretrained(tmp_path / "orm")
    tok.save_pretrained(tmp_path / "orm")
    orm = registry.build(f"orm:{tmp_path / 'orm'}?device=cpu")
    assert isinstance(orm, ORMPRM)
    reqs = requests()
    got = run(orm.score(reqs))
    for req, scores in zip(reqs, got):
        text = tok.apply_chat_template(orm_messages(req.question, req.node.step_texts()), tokenize=False)
        assert text.endswith("<|im_start|>assistant\n" + "".join(req.node.step_texts()).strip() + "<|im_end|>\n")
        with torch.no_grad():
            logit = orm.model(torch.tensor([tok.encode(text, add_special_tokens=False)])).logits[0, 0].item()
        assert scores == pytest.approx([1 / (1 + math.exp(-logit))] * req.node.depth, abs=1e-5)

    def answer(method, path_, body):
        text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=False)
        with torch.no_grad():
            logit = orm.model(torch.tensor([tok.encode(text, add_special_tokens=False)])).logits[0, 0].item()
        return 200, {"data": [{"index": 0, "label": "LABEL_0", "probs": [1 / (1 + math.exp(-logit))],
                               "num_classes": 1}]}

    srv = stand_in(answer)
    served = registry.build(f"orm:{srv.url}")
    assert isinstance(served, ServedORM)
    assert same(run(served.score(reqs + reqs)), got + got)
    assert len(srv.posts("/classify")) == len(PATHS)  # identical paths of a call are sent once


def test_orm_refuses_a_head_with_more_labels(tok):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    model = Qwen2ForSequenceClassification(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=2))
    with pytest.raises(registry.SpecError, match="ONE"):
        ORMPRM(model, tok, device="cpu")


# -- registry --------------------------------------------------------------------------------------

def test_specs_of_the_chat_kinds_are_checked_without_a_model(tmp_path):
    for text in ("rlhflow:http://127.0.0.1:1?tokenizer=/nowhere", "rlhflow:http://127.0.0.1:1", "judge:/nowhere",
                 "orm:/nowhere", "judge:http://127.0.0.1:1?top_k=x", "judge:http://127.0.0.1:1?top_k=0"):
        with pytest.raises(registry.SpecError):
            registry.check(registry.parse(text))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    registry.check(registry.parse(f"rlhflow:http://127.0.0.1:1?tokenizer={tmp_path}"))
    registry.check(registry.parse("judge:http://127.0.0.1:8000?system=Be%20strict.&top_k=5"))
    assert registry.identity("judge:http://127.0.0.1:8000?top_k=20") == "judge:http://127.0.0.1:8000"
    assert "judge" in registry.markdown_table() and "rlhflow" in registry.markdown_table()


def test_importing_the_kinds_imports_no_torch():
    code = ("import sys; from ets.prm import registry; registry.kinds(); "
            "import ets.prm.rlhflow, ets.prm.judge, ets.prm.orm; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_folders_build_the_in_process_kinds(tok, lm, tmp_path):
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    prm = registry.build(f"rlhflow:{tmp_path / 'lm'}?device=cpu")
    assert isinstance(prm, RLHFlowPRM) and len(run(prm.score(requests(PATHS[:1])))[0]) == 2
    judge = registry.build(f"judge:{tmp_path / 'lm'}?device=cpu&top_k=5")
    assert isinstance(judge, JudgePRM) and judge.top_k == 5
    served = registry.build(f"rlhflow:http://127.0.0.1:1?tokenizer={tmp_path / 'lm'}")
    assert isinstance(served, ServedRLHFlow) and served.format.good == tok.convert_tokens_to_ids("+")


# -- a real vLLM server ----------------------------------------------------------------------------

@pytest.mark.server
def test_vllm_serves_rlhflow_and_judge_as_the_in_process_adapters_score(tok, lm, tmp_path):
    """vLLM (CPU build) serving the tiny chat Llama gives the in-process rlhflow and judge scores."""
    from conftest import free_port, vllm_python

    from ets.serve import has_vllm, start_vllm_server

    python = vllm_python()
    if python is None or not has_vllm(python):
        pytest.skip("no vLLM venv: set ETS_VLLM_PYTHON (or run .ci/vllm-setup.sh)")
    folder = tmp_path / "tiny-chat"
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    V = len(tok)
    reqs = requests()
    want_rlhflow = run(RLHFlowPRM(str(folder), device="cpu").score(reqs))
    want_judge = run(JudgePRM(str(folder), top_k=V, device="cpu").score(reqs))
    with start_vllm_server(folder, free_port(), python, kv_cache_gb=1, log_path=tmp_path / "vllm.log",
                           dtype="float32", max_model_len=512, extra_args=("--max-logprobs", str(V))) as server:
        rl = registry.build(f"rlhflow:{server.url}?tokenizer={folder}&top_k={V}")
        got_rlhflow = run(rl.score(reqs))
        judge = registry.build(f"judge:{server.url}?top_k={V}")
        got_judge = run(judge.score(reqs))
    assert same(got_rlhflow, want_rlhflow, 1e-4)
    assert same(got_judge, want_judge, 1e-4)
    assert rl.minus_unlisted == 0


def _without(folder, out, drop=None, rename=None):
    """A copy of a saved folder whose safetensors lack the `drop` key or have `rename` = (old, new)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    tensors = load_file(str(out / "model.safetensors"))
    if drop:
        del tensors[drop]
    if rename:
        tensors[rename[1]] = tensors.pop(rename[0])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_head_missing_or_renamed_fails_naming_the_keys(tok, lm, tmp_path):
    from ets.prm.loading import CheckpointError

    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    no_head = _without(tmp_path / "lm", tmp_path / "no-head", drop="lm_head.weight")
    for kind in ("rlhflow", "judge"):
        with pytest.raises(CheckpointError, match="lm_head.weight"):
            registry.build(f"{kind}:{no_head}?device=cpu")
    orm = tiny_orm(len(tok))
    orm.save_pretrained(tmp_path / "orm")
    tok.save_pretrained(tmp_path / "orm")
    renamed = _without(tmp_path / "orm", tmp_path / "orm-renamed", rename=("score.weight", "reward.weight"))
    with pytest.raises(CheckpointError, match=r"missing \(would be random\) score.weight.*unexpected reward.weight"):
        registry.build(f"orm:{renamed}?device=cpu")
