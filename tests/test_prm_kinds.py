"""The in-process PRM kinds on tiny random checkpoints built here in the released layouts (no
download): Qwen2.5-Math-PRM (Qwen2ForProcessRewardModel: model.* + score.0/score.2), Skywork-o1-Open-PRM
(Qwen2ForPrmModel: model.* + v_head.summary), Math-Shepherd (a causal LM); strict loading
(ets.prm.loading); the registry; the worker thread and prefix cache; and (marked `server`) the
same Qwen checkpoint served by vLLM's CPU build scoring as in-process."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from ets.prm.base import ScoreRequest
from helpers import step_path as path

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PATHS = [["1 + 2 = 3\n\n", "3 + 4 = 7\n\n", "so the answer is 7"], ["5 = 5\n\n"], ["2 + 2 = 4\n\n", "4 - 1 = 3"]]
QUESTION = "What is 1 + 2 ?"
H = 32  # hidden size; one attention head (head_dim 32: the smallest vLLM's CPU attention takes)


def byte_chars() -> list[str]:
    """GPT-2 / Qwen2 byte-level BPE's character for each byte value (printable bytes stand for
    themselves, the others are shifted past 255)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = [], 0
    for b in range(256):
        out.append(chr(b) if b in keep else chr(256 + n))
        n += b not in keep
    return out


def tokenizer(special=QWEN_SPECIAL, added=(), bos=None, chat_template=None):
    """A Qwen2 tokenizer (byte-level BPE, Qwen2's pre-tokenizer) with one token per byte and no
    merges, then `special` (special tokens) and `added` (split out even when glued to text, as
    <extra_0> is). Real Qwen2Tokenizer class: transformers rebuilds a qwen2 folder's tokenizer as
    one, so a word-level tokenizer would not survive save and load."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(byte_chars())}, merges=[], unk_token=None,
                         bos_token=bos, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True) for t in special], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False) for t in added])
    if chat_template:
        tok.chat_template = chat_template
    return tok


def qwen_tokenizer():
    return tokenizer(added=["<extra_0>"], chat_template=CHATML)


def skywork_tokenizer():
    return tokenizer(bos="<|endoftext|>")


def qwen2(vocab):
    """A tiny random Qwen2 backbone (2 layers, hidden 32) and its config."""
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False,
                      dtype="float32")
    return Qwen2Model(cfg).eval(), cfg


def save_checkpoint(folder, backbone, cfg, arch, head: dict, tok, extra: dict | None = None):
    """The released layout, written out: config.json (architectures = [arch]), model.safetensors
    with the backbone under `model.` plus the `head` tensors, and the tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg.architectures = [arch]
    cfg.save_pretrained(folder)
    tensors = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    tensors.update({k: v.contiguous() for k, v in {**head, **(extra or {})}.items()})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)
    return folder


def random(*shape, scale=1.0):
    return torch.randn(*shape) * scale


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    """A tiny Qwen2ForProcessRewardModel folder, its backbone and head tensors (score.0: Linear(H, H),
    ReLU, score.2: Linear(H, 2))."""
    tok = qwen_tokenizer()
    backbone, cfg = qwen2(len(tok))
    torch.manual_seed(1)
    head = {"score.0.weight": random(H, H, scale=0.5), "score.0.bias": random(H, scale=0.5),
            "score.2.weight": random(2, H, scale=0.5), "score.2.bias": random(2, scale=0.5)}
    folder = save_checkpoint(tmp_path_factory.mktemp("qwen") / "prm", backbone, cfg, "Qwen2ForProcessRewardModel",
                             head, tok)
    return folder, backbone, head, tok


@pytest.fixture(scope="module")
def skywork_ckpt(tmp_path_factory):
    """A tiny Qwen2ForPrmModel folder (model.*, an unused lm_head.weight, v_head.summary: Linear(H, 1))."""
    tok = skywork_tokenizer()
    backbone, cfg = qwen2(len(tok))
    torch.manual_seed(2)
    head = {"v_head.summary.weight": random(1, H), "v_head.summary.bias": random(1)}
    folder = save_checkpoint(tmp_path_factory.mktemp("skywork") / "prm", backbone, cfg, "Qwen2ForPrmModel", head,
                             tok, extra={"lm_head.weight": random(len(tok), H)})
    return folder, backbone, head, tok


def run(coro):
    return asyncio.run(coro)


def hidden(backbone, ids):
    with torch.no_grad():
        return backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [T, H]


# -- qwen-prm -------------------------------------------------------------------------------------

def test_qwen_prm_released_layout_scores_equal_the_head_by_hand(qwen_ckpt):
    """Loaded natively from model.* + score.0/score.2: each step's score is softmax(score(h))[1]
    at its <extra_0>, computed here from the saved tensors (batched, padded: the same)."""
    from ets.prm.qwen_prm import QwenPRM
    from ets.prm.served import CONVENTIONS

    folder, backbone, W, tok = qwen_ckpt
    prm = QwenPRM(str(folder), device="cpu", batch_size=2)
    assert prm.tag_id == tok.convert_tokens_to_ids("<extra_0>")
    requests = [ScoreRequest(QUESTION, path(p)) for p in PATHS]
    scores = run(prm.score(requests))
    for req, got in zip(requests, scores):
        text = prm.text(req.question, req.node.step_texts())
        assert text == CONVENTIONS["qwen-prm"].render(req.question, req.node.step_texts())  # served sends the same
        ids = tok.encode(text, add_special_tokens=False)
        h = hidden(backbone, ids)
        logits = torch.relu(h @ W["score.0.weight"].T + W["score.0.bias"]) @ W["score.2.weight"].T + W["score.2.bias"]
        at = [i for i, t in enumerate(ids) if t == prm.tag_id]
        assert len(at) == req.node.depth
        want = logits[at].softmax(-1)[:, 1].tolist()
        assert got == pytest.approx(want, abs=1e-5)
    assert len({round(s, 4) for ss in scores for s in ss}) > 3  # a real head: the scores differ


def _variant(qwen_ckpt, tmp_path, head):
    folder, backbone, _, tok = qwen_ckpt
    from transformers import Qwen2Config

    return save_checkpoint(tmp_path / "bad", backbone, Qwen2Config.from_pretrained(folder),
                           "Qwen2ForProcessRewardModel", head, tok)


def test_qwen_prm_with_its_head_missing_renamed_or_misshapen_fails_naming_the_keys(qwen_ckpt, tmp_path):
    from ets.prm.loading import CheckpointError
    from ets.prm.qwen_prm import QwenPRM
    from ets.prm.registry import SpecError

    W = qwen_ckpt[2]
    missing = _variant(qwen_ckpt, tmp_path / "missing", {})
    with pytest.raises(CheckpointError, match=r"missing \(would be random\) score\.0\.bias, score\.0\.weight, "
                                              r"score\.2\.bias, score\.2\.weight.*Fix: give a Qwen2ForProcessRewardModel"):
        QwenPRM(str(missing), device="cpu")
    renamed = _variant(qwen_ckpt, tmp_path / "renamed", {k.replace("score.", "reward."): v for k, v in W.items()})
    with pytest.raises(CheckpointError, match=r"missing .*score\.0\.weight.*; unexpected reward\.0\.bias, "
                                              r"reward\.0\.weight"):
        QwenPRM(str(renamed), device="cpu")
    wide = _variant(qwen_ckpt, tmp_path / "wide", {**W, "score.2.weight": random(3, H), "score.2.bias": random(3)})
    with pytest.raises(CheckpointError, match=r"wrong shape score\.2\.bias \(3,\) \(model \(2,\)\)"):
        QwenPRM(str(wide), device="cpu")
    assert issubclass(CheckpointError, SpecError)  # the CLI prints it as `error: ...`, exit 2


def test_qwen_prm_backbone_tensors_are_checked_too(qwen_ckpt, tmp_path):
    """A backbone tensor missing is an error (transformers would initialise it at random)."""
    from safetensors.torch import load_file, save_file

    from ets.prm.loading import CheckpointError
    from ets.prm.qwen_prm import QwenPRM

    bad = _variant(qwen_ckpt, tmp_path / "nolayer", qwen_ckpt[2])
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing \(would be random\) layers\.1\.mlp\.down_proj\.weight"):
        QwenPRM(str(bad), device="cpu")


def test_qwen_prm_token_classification_folder_with_three_labels_is_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    from ets.prm.loading import CheckpointError
    from ets.prm.qwen_prm import QwenPRM

    tok = qwen_tokenizer()
    Qwen2ForTokenClassification(Qwen2Config(vocab_size=len(tok), hidden_size=H, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                            num_labels=3)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="3 labels"):
        QwenPRM(str(tmp_path), device="cpu")


def test_registry_builds_qwen_prm_from_a_folder_with_its_options(qwen_ckpt):
    from ets.prm import registry
    from ets.prm.qwen_prm import QwenPRM

    folder = qwen_ckpt[0]
    prm = registry.build(f"qwen-prm:{folder}?device=cpu&batch_size=3&batch_tokens=500&system=Be brief.")
    assert isinstance(prm, QwenPRM) and (prm.batch_size, prm.batch_tokens, prm.system) == (3, 500, "Be brief.")
    assert prm.text("q", ["1 = 1"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert len(run(prm.score([ScoreRequest("q", path(["1 = 1", "so 1"]))]))[0]) == 2
    with pytest.raises(registry.SpecError, match="system= applies to an in-process PRM"):
        registry.check(registry.parse("qwen-prm:http://127.0.0.1:9?system=x"))


# -- skywork --------------------------------------------------------------------------------------

def test_skywork_scores_equal_the_value_head_by_hand(skywork_ckpt):
    """Input ids as Skywork's prepare_input builds them (bos + question + "\\n", then each step's
    own ids and a "\\n"); score = sigmoid(v_head.summary(h)) at each step's "\\n"."""
    from ets.prm.skywork import SkyworkPRM

    folder, backbone, W, tok = skywork_ckpt
    prm = SkyworkPRM(str(folder), device="cpu", batch_size=2)
    requests = [ScoreRequest(QUESTION + " ", path(p)) for p in PATHS]
    scores = run(prm.score(requests))
    nl = tok.encode("\n", add_special_tokens=False)[-1]
    for req, got in zip(requests, scores):
        ids = tok.encode("<|endoftext|>" + QUESTION + "\n", add_special_tokens=False)
        at = []
        for s in req.node.step_texts():
            ids += tok.encode(s.strip(), add_special_tokens=False) + [nl]
            at.append(len(ids) - 1)
        assert prm.encode_path(req.question, req.node.step_texts()) == (ids, at)
        assert ids[0] == tok.convert_tokens_to_ids("<|endoftext|>")
        h = hidden(backbone, ids)
        want = torch.sigmoid(h[at] @ W["v_head.summary.weight"][0] + W["v_head.summary.bias"][0]).tolist()
        assert got == pytest.approx(want, abs=1e-5)


def test_skywork_with_its_head_missing_or_renamed_fails_naming_the_keys(skywork_ckpt, tmp_path):
    from transformers import Qwen2Config

    from ets.prm.loading import CheckpointError
    from ets.prm.skywork import SkyworkPRM

    folder, backbone, W, tok = skywork_ckpt
    cfg = Qwen2Config.from_pretrained(folder)
    gone = save_checkpoint(tmp_path / "gone", backbone, cfg, "Qwen2ForPrmModel", {}, tok)
    with pytest.raises(CheckpointError, match=r"missing \(would be random\) v_head\.summary\.bias, v_head\.summary\.weight"):
        SkyworkPRM(str(gone), device="cpu")
    renamed = save_checkpoint(tmp_path / "renamed", backbone, cfg, "Qwen2ForPrmModel",
                              {k.replace("v_head.", "value_head."): v for k, v in W.items()}, tok)
    with pytest.raises(CheckpointError, match=r"unexpected value_head\.summary\.bias, value_head\.summary\.weight"):
        SkyworkPRM(str(renamed), device="cpu")


def test_registry_builds_skywork_in_process_only(skywork_ckpt):
    from ets.prm import registry
    from ets.prm.skywork import SkyworkPRM

    assert isinstance(registry.build(f"skywork:{skywork_ckpt[0]}?device=cpu"), SkyworkPRM)
    with pytest.raises(registry.SpecError, match="takes skywork:PATH"):
        registry.parse("skywork:http://127.0.0.1:9")


# -- math-shepherd and the policy: strict loads ---------------------------------------------------

def test_a_causal_lm_folder_without_its_lm_head_fails_for_math_shepherd_and_the_policy(tmp_path):
    """A base model (no lm_head) is not silently given a random LM head."""
    from transformers import LlamaConfig, LlamaModel

    from ets.engines.hf import load_policy
    from ets.prm.loading import CheckpointError
    from ets.prm.math_shepherd import MathShepherdPRM

    tok = tokenizer(added=["ки"])  # the tag of Math-Shepherd
    LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing \(would be random\) lm_head\.weight"):
        MathShepherdPRM(str(tmp_path), device="cpu")
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        load_policy(str(tmp_path), device="cpu", dtype="float32")


# -- the worker thread, the prefix cache, batching ------------------------------------------------

def test_model_prm_forwards_run_in_the_worker_thread_and_a_scored_path_is_never_reencoded(qwen_ckpt):
    from ets.prm.qwen_prm import QwenPRM

    prm = QwenPRM(str(qwen_ckpt[0]), device="cpu", batch_size=8)
    threads, encoded = [], []
    forward, encode = prm._good_prob, prm.encode_path

    def spy_forward(ids, mask):
        threads.append(threading.current_thread().name)
        return forward(ids, mask)

    def spy_encode(q, steps):
        encoded.append(tuple(steps))
        return encode(q, steps)

    prm._good_prob, prm.encode_path = spy_forward, spy_encode
    full = path(PATHS[0])
    first = run(prm.score([ScoreRequest(QUESTION, full), ScoreRequest(QUESTION, full)]))
    assert threads and all(t.startswith("ets-prm") for t in threads) and threading.current_thread().name not in threads
    assert encoded == [tuple(PATHS[0])]  # the same path twice in one call: encoded once
    parent = full.parent
    again = run(prm.score([ScoreRequest(QUESTION, full), ScoreRequest(QUESTION, parent)]))
    assert encoded == [tuple(PATHS[0])]  # the path and its prefix were scored: nothing re-encoded
    assert again == [first[0], first[0][:2]]
    assert prm.stats()["prm_paths_encoded"] == 1


def test_batch_tokens_caps_each_forward_and_changes_no_score(qwen_ckpt):
    from ets.prm.qwen_prm import QwenPRM

    requests = [ScoreRequest(QUESTION, path(p)) for p in PATHS]
    whole = run(QwenPRM(str(qwen_ckpt[0]), device="cpu", batch_size=8).score(requests))
    capped = QwenPRM(str(qwen_ckpt[0]), device="cpu", batch_size=8)
    lengths = sorted(len(capped.encode(r.question, r.node.step_texts())) for r in requests)
    capped.batch_tokens = cap = 2 * lengths[-1]  # the two longest fit in one forward, not all three
    shapes = []
    forward = capped._good_prob
    capped._good_prob = lambda ids, mask: (shapes.append(tuple(ids.shape)), forward(ids, mask))[1]
    got = run(capped.score(requests))
    assert flat(got) == pytest.approx(flat(whole), abs=1e-5)
    assert shapes == [(2, lengths[-1]), (1, lengths[0])] and all(b * t <= cap for b, t in shapes)


def flat(scores):
    return [x for s in scores for x in s]


# -- served: vLLM's CPU build on the same checkpoint -----------------------------------------------

@pytest.mark.server
def test_vllm_serves_the_tiny_qwen_prm_and_scores_as_in_process(qwen_ckpt, tmp_path):
    """vLLM loads the tiny checkpoint as Qwen2ForProcessRewardModel (its own loader: so our layout
    is the released one), and ServedPRM's scores equal QwenPRM's on the same folder."""
    import json

    from conftest import free_port, vllm_python

    from ets.prm.qwen_prm import QwenPRM
    from ets.prm.served import ServedPRM
    from ets.serve import has_vllm, start_vllm_server

    python = vllm_python()
    if python is None or not has_vllm(python):
        pytest.skip("no vLLM venv: set ETS_VLLM_PYTHON (or run .ci/vllm-setup.sh)")
    folder, _, _, tok = qwen_ckpt
    local = QwenPRM(str(folder), device="cpu")
    requests = [ScoreRequest(QUESTION, path(p)) for p in PATHS]
    want = run(local.score(requests))
    # the tiny vocabulary has no id 151651 (vLLM's default <extra_0> id): name the tag's id
    pooler = json.dumps({"step_tag_id": tok.convert_tokens_to_ids("<extra_0>")})
    with start_vllm_server(folder, free_port(), python, kv_cache_gb=1, dtype="float32", max_model_len=512,
                           log_path=tmp_path / "vllm.log", extra_args=("--pooler-config", pooler)) as server:
        served = ServedPRM(server.url, convention="qwen-prm")

        async def go():
            try:
                return await served.score(requests)
            finally:
                await served.aclose()
        got = run(go())
    assert [len(s) for s in got] == [len(p) for p in PATHS]
    assert flat(got) == pytest.approx(flat(want), abs=1e-4)
