"""Tag-based PRM adapters on tiny random models built here (no download)."""

import asyncio

import pytest
import torch

from ets.config import SamplingConfig, SearchConfig
from ets.engines.mock import MockPolicy
from ets.prm.base import PRMError, ScoreRequest
from ets.prm.math_shepherd import MathShepherdPRM
from ets.prm.qwen_prm import QwenPRM
from ets.search import search
from helpers import step_path as path

WORDS = ["<pad>", "<unk>", "ки", "+", "-", "=", "Step", "so", "the", "answer", "is"] + [str(i) for i in range(30)]


def tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_tokens([AddedToken("<extra_0>", special=False)])  # split out even when glued to text
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def tiny_llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=0, bos_token_id=None, eos_token_id=None)).eval()


def tiny_qwen_head(vocab):
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    torch.manual_seed(0)
    return Qwen2ForTokenClassification(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, num_labels=2, pad_token_id=0)).eval()


PATHS = [["1 + 2 = 3\n\n", "3 + 4 = 7\n\n", "so the answer is 7"], ["5 = 5\n\n"], ["2 + 2 = 4\n\n", "4 - 1 = 3"]]


@pytest.fixture(scope="module")
def shepherd():
    tok = tokenizer()
    return MathShepherdPRM(tiny_llama(len(tok)), tok, step_delimiter="\n\n", batch_size=2)


def run(coro):
    return asyncio.run(coro)


def test_math_shepherd_scores_align_with_steps_and_match_a_manual_read(shepherd):
    requests = [ScoreRequest("1 + 2 = ?", path(p)) for p in PATHS]
    scores = run(shepherd.score(requests))
    assert [len(s) for s in scores] == [len(p) for p in PATHS]
    assert all(0 < x < 1 for s in scores for x in s)
    # manual: P(+) / (P(+) + P(-)) from the LM logits at each tag position, one path at a time
    for req, got in zip(requests, scores):
        ids = shepherd.encode(req.question, req.node.step_texts())
        with torch.no_grad():
            logits = shepherd.model(torch.tensor([ids])).logits[0]
        at = [i for i, t in enumerate(ids) if t == shepherd.tag_id]
        want = logits[at][:, [shepherd.good_id, shepherd.bad_id]].softmax(-1)[:, 0].tolist()
        assert got == pytest.approx(want, abs=1e-5)  # padding in the batch changes nothing


def test_math_shepherd_input_format(shepherd):
    assert shepherd.text("Q ? ", ["1 + 2 = 3\n\n", "so 3 ки"]) == "Q ? 1 + 2 = 3 ки\nso 3 ки"


def test_a_step_hiding_a_tag_loses_it_as_on_a_server(shepherd):
    hidden = path(["1 + 2 ки = 3\n\n", "3 = 3"])
    assert shepherd.text("q", hidden.step_texts()) == "q 1 + 2  = 3 ки\n3 = 3 ки"
    assert len(run(shepherd.score([ScoreRequest("q", hidden)]))[0]) == 2


def test_local_and_served_math_shepherd_send_the_same_text(shepherd, stand_in):
    """The same paths (odd whitespace, a hidden tag, the tag as a step's end) reach the local
    model and the served PRM as one text."""
    from ets.prm.served import ServedPRM

    def answer(method, path_, body):
        return 200, {"data": [{"index": i, "data": [[0.7, 0.3]] * t.count("ки")} for i, t in enumerate(body["input"])]}

    srv = stand_in(answer)
    paths = [["  1 + 2 = 3\n\n", "so  3 ки", "3 ки 3\n"], ["5 = 5\n"]] + PATHS
    requests = [ScoreRequest(" What is 1 + 2? ", path(p)) for p in paths]
    served = ServedPRM(srv.url, convention="math-shepherd", batch_size=64)
    run(served.score(requests))
    sent = srv.posts("/pooling")[0]["input"]
    assert sent == [shepherd.text(r.question, r.node.step_texts()) for r in requests]
    assert sent[0] == "What is 1 + 2? 1 + 2 = 3 ки\nso  3 ки\n3  3 ки"


def test_tag_must_be_one_token():
    tok = tokenizer()
    with pytest.raises(PRMError, match="ONE token"):
        MathShepherdPRM(tiny_llama(len(tok)), tok, tag="Step ки")
    with pytest.raises(PRMError, match="ONE token"):
        MathShepherdPRM(tiny_llama(len(tok)), tok, good="+ +")


def test_without_insertion_the_policy_must_emit_the_tag():
    tok = tokenizer()
    with pytest.raises(PRMError, match="step_delimiter"):
        MathShepherdPRM(tiny_llama(len(tok)), tok, insert_tag=False, step_delimiter="\n\n")
    prm = MathShepherdPRM(tiny_llama(len(tok)), tok, insert_tag=False, step_delimiter="ки")
    assert len(run(prm.score([ScoreRequest("q", path(["1 + 2 = 3 ки", "so 3 ки"]))]))[0]) == 2
    with pytest.raises(PRMError, match="does not end with the step tag"):
        run(prm.score([ScoreRequest("q", path(["1 + 2 = 3 ки", "so 3"]))]))


def test_qwen_prm_reads_class_one_at_each_separator(tmp_path):
    tok = tokenizer()
    model = tiny_qwen_head(len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prm = QwenPRM(str(tmp_path), device="cpu", batch_size=3)  # from a folder
    assert prm.tag_id == tok.convert_tokens_to_ids("<extra_0>")
    requests = [ScoreRequest("1 + 2 = ?", path(p)) for p in PATHS]
    scores = run(prm.score(requests))
    assert [len(s) for s in scores] == [len(p) for p in PATHS]
    for req, got in zip(requests, scores):
        ids = prm.encode(req.question, req.node.step_texts())
        assert ids.count(prm.tag_id) == req.node.depth
        with torch.no_grad():
            probs = prm.model(torch.tensor([ids])).logits[0].softmax(-1)[:, 1]
        want = [probs[i].item() for i, t in enumerate(ids) if t == prm.tag_id]
        assert got == pytest.approx(want, abs=1e-5)


def test_qwen_prm_rejects_a_head_without_two_classes():
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    tok = tokenizer()
    model = Qwen2ForTokenClassification(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4,
                                                    num_key_value_heads=2, num_labels=3))
    with pytest.raises(ValueError, match="2 logits"):
        run(QwenPRM(model, tok).score([ScoreRequest("q", path(["1 = 1"]))]))


def test_math_shepherd_drives_a_search(shepherd, tmp_path):
    cfg = SearchConfig(strategy="rebase", width=4, sampling=SamplingConfig(step_delimiter="\n\n"))
    res = run(search("what is 6 * 7?", MockPolicy(seed=1), shepherd, cfg))
    scored = [n for n in res.tree.nodes[1:]]
    assert scored and all(n.score is not None and 0 < n.score < 1 for n in scored)


def test_cli_specs_build_the_adapters_from_folders(tmp_path):
    from ets.factory import make_prm

    tok = tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "ms")
    tok.save_pretrained(tmp_path / "ms")
    prm = make_prm(f"math-shepherd:{tmp_path / 'ms'}", None, seed=0)
    assert isinstance(prm, MathShepherdPRM) and prm.tag_id == tok.convert_tokens_to_ids("ки")
    assert len(run(prm.score([ScoreRequest("q", path(["1 + 2 = 3", "so 3"]))]))[0]) == 2
    tiny_qwen_head(len(tok)).save_pretrained(tmp_path / "qw")
    tok.save_pretrained(tmp_path / "qw")
    assert isinstance(make_prm(f"qwen-prm:{tmp_path / 'qw'}", None, seed=0), QwenPRM)
