"""The ORM kind: an outcome reward model, scoring a path as a whole solution.

Input: the chat [user: the question, assistant: the path's steps joined as the policy wrote them
(their own delimiters kept), both stripped], rendered by the model's chat template without a
generation prompt. Score = sigmoid of the single logit of an AutoModelForSequenceClassification
with one label (num_labels == 1; any other head is refused at load).

Rule for the steps (so the RewardModel contract holds): the ORM gives one score per path, and
EVERY step of the path carries it: score(path) = [s] * depth with s = ORM(question, path).
Earlier steps get no separate score: a prefix scored as a node of its own gets the ORM's score
of that prefix, which a longer path's entries need not equal. Aggregations over a path's steps
then read the whole-path score (last, min and mean give s; prod gives s ** depth). Scores are
cached by whole path (the ORM is not causal over steps), and identical paths of a call are
scored once.

Served (vLLM): POST {url}/classify with `messages` (vLLM 0.32's ClassificationChatRequest; the
server applies its chat template, `add_generation_prompt: false`), one request per path; vLLM
answers data[0].probs, the sigmoid of the one logit for a one-label classifier (its
PoolerClassify activation). Serve the checkpoint with `--runner pooling` (a
*ForSequenceClassification architecture). Checked against a loopback stand-in only, not yet a
real vLLM server.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Sequence

from ets.prm.base import RewardModel, ScoreRequest
from ets.prm.cache import in_worker
from ets.prm.chat_prms import Client, chat_text, check_spec, device_of, finite, load_model, load_tokenizer
from ets.prm.registry import DEVICE, DTYPE, MODEL, PRMKind, SpecError, register


def orm_messages(question: str, steps: Sequence[str]) -> list[dict]:
    return [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": "".join(steps).strip()}]


class ORMBase(RewardModel):
    """score(): `_whole(paths) -> one score per (question, steps)` for the uncached paths; each
    step of a path carries its path's score (module docstring)."""

    name = "orm"

    def __init__(self, cache_size: int = 200_000):
        self._cache: OrderedDict[tuple, float] = OrderedDict()
        self.cache_size, self.scored, self.hits = cache_size, 0, 0

    async def _whole(self, paths: list[tuple]) -> list[float]:
        raise NotImplementedError

    async def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        paths = [(r.question, tuple(r.node.step_texts())) for r in requests]
        todo = list(dict.fromkeys(p for p in paths if p not in self._cache))
        self.hits += len(paths) - len(todo)
        new = dict(zip(todo, await self._whole(todo))) if todo else {}
        self.scored += len(todo)
        out = []
        for p in paths:
            s = new[p] if p in new else self._cache[p]
            out.append([finite(s, f"PRM {self.name}")] * len(p[1]))
        for p, s in new.items():
            self._cache[p] = s
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def stats(self) -> dict:
        return {"prm_paths_scored": self.scored, "prm_cache_hits": self.hits}


class ORMPRM(ORMBase):
    """In-process ORM: a one-label sequence classifier with a chat template, from a local folder
    (tokenizer None) or loaded. One path per forward (no padding reaches the classifier's
    last-token pooling), in the PRM worker thread."""

    def __init__(self, model, tokenizer=None, device=None, dtype=None):
        super().__init__()
        if tokenizer is None:
            from transformers import AutoModelForSequenceClassification

            tokenizer = load_tokenizer(model)
            model = load_model(AutoModelForSequenceClassification, model, dtype,
                               "give a sequence-classification checkpoint with one label (an outcome reward model)")
        labels = getattr(model.config, "num_labels", None)
        if labels != 1:
            raise SpecError(f"PRM orm: the model has {labels} labels; an ORM here is a sequence classifier with ONE "
                            "label (a sigmoid score)")
        self.device = device_of(device)
        self.model, self.tok = model.to(self.device).eval(), tokenizer

    def text(self, question: str, steps: Sequence[str]) -> str:
        return chat_text(self.tok, orm_messages(question, steps), add_generation_prompt=False)

    async def _whole(self, paths):
        return await in_worker(self._forward, paths)

    def _forward(self, paths) -> list[float]:
        import torch

        out = []
        for q, steps in paths:
            ids = torch.tensor([self.tok.encode(self.text(q, steps), add_special_tokens=False)], device=self.device)
            with torch.inference_mode():
                out.append(torch.sigmoid(self.model(input_ids=ids).logits.float()[0, 0]).item())
        return out


class ServedORM(ORMBase):
    """The ORM served by vLLM's /classify (module docstring)."""

    name = "served-prm:orm"

    def __init__(self, url: str, model: str | None = None, timeout_s: float | None = None, max_concurrency: int = 8):
        super().__init__()
        self.client = Client(url, "orm", timeout_s, max_concurrency)
        self.model = model

    def payload(self, question: str, steps: Sequence[str]) -> dict:
        body = {"messages": orm_messages(question, steps), "add_generation_prompt": False}
        return body if self.model is None else {"model": self.model, **body}

    async def _whole(self, paths):
        return await asyncio.gather(*(self._one(q, steps) for q, steps in paths))

    async def _one(self, question, steps) -> float:
        where = "/classify"
        body = await self.client.post(where, self.payload(question, steps))
        try:
            probs = body["data"][0]["probs"]
        except (KeyError, IndexError, TypeError):
            raise self.client.bad(where, "answered without data[0].probs; is it vLLM with --runner pooling?") from None
        if not isinstance(probs, list) or len(probs) != 1 or isinstance(probs[0], bool) \
                or not isinstance(probs[0], (int, float)):
            raise self.client.bad(where, f"returned probs {probs!r}; an ORM here has ONE label")
        return float(probs[0])

    def stats(self) -> dict:
        return {**self.client.counters, **super().stats()}

    async def aclose(self) -> None:
        await self.client.aclose()


def build(spec, ctx):
    if spec.is_url:
        return ServedORM(spec.target, model=spec.get("model"), timeout_s=ctx.timeout_s)
    return ORMPRM(spec.target, device=spec.get("device"), dtype=spec.get("dtype"))


register(PRMKind(
    "orm", "chat [user: question, assistant: the whole solution] in the model's template: sigmoid of a one-label "
    "sequence classifier; every step of a path carries the whole path's score (an outcome RM)", ("path", "url"),
    build, options=(DEVICE, DTYPE, MODEL), check=check_spec,
    served_by="vLLM /classify (chat messages; --runner pooling), one request per path; checked against a stand-in only",
    tested="tiny one-label Qwen2 classifier: scores equal sigmoid(logit) by hand; a loopback stand-in "
           "(tests/test_prm_chat_kinds.py)"))
