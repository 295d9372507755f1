"""ServedPRM against a stand-in of vLLM's /pooling endpoint (step pooling)."""

from __future__ import annotations

import asyncio
import math

import pytest

from ets.engines.base import DELIMITER
from ets.prm.base import PRMError, ScoreRequest
from ets.prm.served import CONVENTIONS, ServedPRM, step_score
from ets.tree import Tree


class FakePooling:
    """One vector per step tag: logits (0, 0.1 * len(text before the tag)) for qwen-prm, or
    probabilities for math-shepherd; `drop` removes the last vector (a tag that got lost)."""

    def __init__(self, tag: str, probs: bool = False, drop: bool = False):
        self.tag, self.probs, self.drop = tag, probs, drop

    def __call__(self, method, path, body):
        if path != "/pooling":
            return 404, {}
        assert body["task"] == "token_classify"
        data = []
        for i, text in enumerate(body["input"]):
            parts = text.split(self.tag)[:-1]
            vecs = [[0.75, 0.25] if self.probs else [0.0, 0.1 * len(p)] for p in parts]
            data.append({"index": i, "object": "pooling", "data": vecs[:-1] if self.drop else vecs})
        return 200, {"data": data, "model": "prm"}


def _tree():
    tree = Tree([1], "q")
    a = tree.add_child(tree.root, [2], "First step.\n\n", DELIMITER)
    b = tree.add_child(a, [3], "Second.\n\n", DELIMITER)
    c = tree.add_child(a, [4], "Other second.\n\n", DELIMITER)
    return tree, a, b, c


def _score(prm, reqs):
    async def go():
        try:
            return await prm.score(reqs)
        finally:
            await prm.aclose()
    return asyncio.run(go())


def test_qwen_convention_scores_every_step(stand_in):
    srv = stand_in(FakePooling("<extra_0>"))
    _, a, b, c = _tree()
    prm = ServedPRM(srv.url)
    out = _score(prm, [ScoreRequest("What is 1+1?", b), ScoreRequest("What is 1+1?", c)])
    assert [len(s) for s in out] == [2, 2]
    (body,) = srv.posts("/pooling")
    text = body["input"][0]
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nWhat is 1+1?<|im_end|>" in text
    assert "First step.<extra_0>Second.<extra_0><|im_end|>" in text  # delimiter whitespace stripped
    sig = lambda x: 1 / (1 + math.exp(-x))  # softmax([0, x])[1]
    n1 = len(text.split("<extra_0>")[0])
    assert out[0][0] == pytest.approx(sig(0.1 * n1))
    assert out[0][0] == out[1][0]  # same first step, same score


def test_cache_avoids_rescoring(stand_in):
    srv = stand_in(FakePooling("<extra_0>"))
    _, a, b, c = _tree()
    prm = ServedPRM(srv.url)

    async def go():
        first = await prm.score([ScoreRequest("q", b)])
        again = await prm.score([ScoreRequest("q", a), ScoreRequest("q", b)])  # a: prefix of b
        dup = await prm.score([ScoreRequest("q", c), ScoreRequest("q", c)])  # identical paths
        await prm.aclose()
        return first, again, dup

    first, again, dup = asyncio.run(go())
    assert again == [first[0][:1], first[0]]
    assert dup[0] == dup[1]
    posts = srv.posts("/pooling")
    assert len(posts) == 2 and len(posts[1]["input"]) == 1  # c sent once; a and b never again
    assert prm.stats()["paths_cached"] == 2 and prm.stats()["paths_sent"] == 2


def test_math_shepherd_convention(stand_in):
    tag = CONVENTIONS["math-shepherd"].step_tag
    srv = stand_in(FakePooling(tag, probs=True))
    tree = Tree([1], "q")
    a = tree.add_child(tree.root, [2], f"Step 1: add. {tag}", DELIMITER)  # tag as the delimiter
    b = tree.add_child(a, [3], "Step 2: done.\n\n", DELIMITER)
    out = _score(ServedPRM(srv.url, convention="math-shepherd", model="ms"), [ScoreRequest("Q?", b)])
    assert out == [[0.75, 0.75]]  # probabilities used as they are; P(good) is entry 0
    (body,) = srv.posts("/pooling")
    assert body["input"] == [f"Q? Step 1: add. {tag}\nStep 2: done. {tag}"] and body["model"] == "ms"


def test_missing_step_score_is_an_error(stand_in):
    srv = stand_in(FakePooling("<extra_0>", drop=True))
    _, _, b, _ = _tree()
    with pytest.raises(PRMError, match="2 steps sent, 1 step scores returned"):
        _score(ServedPRM(srv.url), [ScoreRequest("q", b)])


def test_server_errors_stay_server_errors_with_the_prm_fix(stand_in):
    """A PRM server that cannot answer is a server problem, not a PRM/step-tag one: the error is
    a ServerError (not PRMError) and its hint names the PRM server and --prm."""
    from ets.engines.server import ServerError
    from ets.runner import hint

    calls = []

    def handler(method, path, body):
        calls.append(path)
        return 503, {"error": "loading"}

    srv = stand_in(handler)
    _, a, _, _ = _tree()
    with pytest.raises(ServerError, match="failed after 2 tries") as err:
        _score(ServedPRM(srv.url, retries=1, backoff_s=0.01), [ScoreRequest("q", a)])
    assert not isinstance(err.value, PRMError) and len(calls) == 2
    assert "--prm URL" in hint(err.value) and "step-delimiter" not in hint(err.value)


def test_step_score_shapes():
    assert step_score([0.2, 0.8], 1) == 0.8
    assert step_score([0.0, 0.0], 0) == 0.5  # logits: softmaxed
    assert step_score([0.3], 0) == 0.3 and step_score(0.9, 0) == 0.9
