"""ServedPRM: a process reward model served by vLLM's pooling API, with a client-side cache.

The server runs the PRM with step pooling (vLLM: a process-reward architecture such as
Qwen2ForProcessRewardModel, or `--pooler-config '{"tok_pooling_type": "STEP", "step_tag_id": ...,
"returned_token_ids": [...]}'`), so it returns one vector per step tag in the input
(see docs/servers.md for the exact commands). The client sends POST {url}/pooling with
`{"input": [text, ...], "task": "token_classify"}` and reads `data[i].data`: a list with one
vector per step tag, in order.

Conventions (how a path becomes the PRM's input and a vector becomes a score):
- "qwen-prm" (Qwen2.5-Math-PRM): ChatML with the system prompt the model was trained with, the
  question as the user turn, the steps joined and ended by `<extra_0>` as the assistant turn;
  each vector is 2-class, score = P(class 1) (positive).
- "math-shepherd": "{question} {step 1} ки\n{step 2} ки\n..."; each vector holds the logits or
  probabilities of the (good "+", bad "-") tokens (returned_token_ids [good, bad]); score =
  P(good) = softmax(vector)[0].
A vector is taken as probabilities when its entries are in [0, 1] and sum to 1, else softmaxed;
a 1-entry vector is the score itself. Step texts lose the tag wherever it occurs in them (a
policy whose delimiter is the tag, e.g. "ки", keeps it in its steps) and surrounding
whitespace, then get exactly one tag each.

Cache: the PRM is causal, so a step's score depends only on the question and the steps up to
it. Every step score a response gives is cached under (question, step texts up to it); a path
whose every prefix is cached is not sent again, and identical paths in one batch are sent once.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import httpx

from ets.http import Health, ServerError, one_line, redact_url, request_with_retries, split_urls
from ets.prm.base import PRMError, RewardModel, ScoreRequest, charge
from ets.prm.formats import math_shepherd_text, tagged_steps

QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Convention:
    name: str
    step_tag: str
    positive_index: int  # which entry of a step's vector is the "step is good" class

    def render(self, question: str, steps: Sequence[str]) -> str:
        if self.name == "math-shepherd":  # the very text the local MathShepherdPRM scores
            return math_shepherd_text(question, steps, self.step_tag)
        clean = tagged_steps(steps, self.step_tag)
        body = "".join(f"{s}{self.step_tag}" for s in clean)
        return (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{question.strip()}"
                f"<|im_end|>\n<|im_start|>assistant\n{body}<|im_end|>\n")


CONVENTIONS = {
    "qwen-prm": Convention("qwen-prm", "<extra_0>", 1),
    "math-shepherd": Convention("math-shepherd", "ки", 0),
}


def step_score(vec, positive_index: int) -> float:
    """Probability that the step is good, from one step's pooled vector."""
    if isinstance(vec, (int, float)):
        return float(vec)
    vals = [float(v) for v in vec]
    if len(vals) == 1:
        return vals[0]
    if not (all(0.0 <= v <= 1.0 for v in vals) and abs(sum(vals) - 1.0) < 1e-3):
        m = max(vals)
        exps = [math.exp(v - m) for v in vals]
        vals = [e / sum(exps) for e in exps]
    return vals[positive_index]


class ServedPRM(RewardModel):
    def __init__(self, url: str, model: str | None = None, convention: str = "qwen-prm",
                 step_tag: str | None = None, positive_index: int | None = None,
                 batch_size: int = 16, max_concurrency: int = 8, timeout_s: float | None = None,
                 retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 cache_size: int = 200_000, down_after: int = 3):
        """url: the PRM server's base URL. model: its served name (None: the server's default).
        convention: "qwen-prm" | "math-shepherd"; step_tag / positive_index override its tag and
        positive class (e.g. for another PRM of the same shape). batch_size: paths per /pooling
        request; max_concurrency: requests in flight. cache_size: step scores kept (LRU).
        timeout_s: per request (None: 300). down_after: consecutive connection failures after
        which the server is taken as down (every later call fails at once).
        A server that cannot be reached raises ServerError (hint: the PRM server and --prm URL),
        not PRMError: the steps are fine, the server is not."""
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
        base = CONVENTIONS[convention]
        self.convention = Convention(base.name, step_tag or base.step_tag,
                                     base.positive_index if positive_index is None else positive_index)
        self.url = split_urls(url)[0]
        self.model, self.batch_size, self.max_concurrency = model, batch_size, max_concurrency
        self.timeout_s = 300.0 if timeout_s is None else timeout_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.health = Health(self.url, down_after)
        self.cache_size = cache_size
        self.name = f"served-prm:{convention}"
        self._cache: OrderedDict[tuple, float] = OrderedDict()
        self._counters = {"calls": 0, "requests": 0, "paths_sent": 0, "paths_cached": 0, "retries": 0}
        self._loop = None
        self._client: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None))
            self._sem = asyncio.Semaphore(self.max_concurrency)

    def _cached(self, key: tuple) -> float | None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        return None

    def _store(self, key: tuple, score: float) -> None:
        self._cache[key] = score
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self._bind_loop()
        self._counters["calls"] += 1
        paths = [(r.question, tuple(r.node.step_texts())) for r in requests]
        todo: dict[tuple, None] = {}  # paths to send, deduplicated, in order
        for q, steps in paths:
            if any(self._cached((q, steps[: k + 1])) is None for k in range(len(steps))):
                todo[(q, steps)] = None
            else:
                self._counters["paths_cached"] += 1
        todo_list = list(todo)
        batches = [todo_list[i: i + self.batch_size] for i in range(0, len(todo_list), self.batch_size)]
        await asyncio.gather(*(self._score_batch(b) for b in batches))
        out = []
        for (q, steps), req in zip(paths, requests):
            scores = [self._cached((q, steps[: k + 1])) for k in range(len(steps))]
            if any(s is None for s in scores):  # evicted between scoring and reading: cache too small
                raise PRMError(f"{self.name}: cache_size {self.cache_size} is too small for one batch")
            out.append(scores)
        return out

    async def _score_batch(self, batch: list[tuple]) -> None:
        texts = [self.convention.render(q, steps) for q, steps in batch]
        payload = {"input": texts, "task": "token_classify"}
        if self.model is not None:
            payload["model"] = self.model
        async with self._sem:
            self._counters["requests"] += 1
            self._counters["paths_sent"] += len(batch)
            try:
                body = await request_with_retries(
                    self._client, "POST", f"{self.url}/pooling", json=payload, retries=self.retries,
                    backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s,
                    timeout_s=self.timeout_s, counters=self._counters, health=self.health)
            except ServerError as e:
                err = type(e)(f"{self.name} (--prm): {e}")
                err.hint = ("the PRM server did not answer: check that it is up and that the --prm URL "
                            "is right")
                raise err from e
        used = (body.get("usage") or {}).get("prompt_tokens") if isinstance(body, dict) else None
        if isinstance(used, int) and not isinstance(used, bool):  # the server's count (vLLM gives it)
            self._counters["prm_tokens"] = self._counters.get("prm_tokens", 0) + used
            charge("prm_tokens", used)
        where = f"{self.name} at {redact_url(self.url)}/pooling (--prm)"
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise self._bad(f"{where} answered without a 'data' list: {one_line(body, 200)}")
        index = lambda d: d["index"] if isinstance(d.get("index"), int) else 0  # noqa: E731
        data = sorted(data, key=index)
        if len(data) != len(batch):
            raise self._bad(f"{where} returned {len(data)} results for {len(batch)} inputs")
        for (q, steps), item in zip(batch, data):
            vecs = item.get("data")
            if not isinstance(vecs, list) or len(vecs) != len(steps):
                got = len(vecs) if isinstance(vecs, list) else one_line(repr(vecs), 60)
                bad = len(vecs) if isinstance(vecs, list) and len(vecs) < len(steps) else len(steps) - 1
                raise PRMError(redact_url(
                    f"{where}: {len(steps)} steps sent, {got} step scores returned; step "
                    f"{bad + 1} ({steps[min(bad, len(steps) - 1)][-80:]!r}) got none. Is the server's "
                    f"step_tag_id the token of {self.convention.step_tag!r}, and is it step pooling?"))
            for k, vec in enumerate(vecs):
                s = self._vector_score(vec, where, k)
                if not math.isfinite(s):
                    raise self._bad(f"{where} returned a non-finite score ({s!r}) for step {k + 1}",
                                    "the PRM server computes NaN/Inf: check its model and dtype (e.g. float32 "
                                    "instead of float16), or restart it")
                self._store((q, steps[: k + 1]), s)

    def _vector_score(self, vec, where: str, k: int) -> float:
        """step_score of one step's vector, after checking its shape: a number, or a non-empty
        list of numbers long enough to hold the positive class."""
        num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        pos = self.convention.positive_index
        if num(vec):
            return float(vec)
        if not isinstance(vec, list) or not vec or not all(num(v) for v in vec):
            raise self._bad(f"{where} returned {one_line(repr(vec), 60)} for step {k + 1}, not a number or a "
                            "list of numbers")
        if len(vec) > 1 and pos >= len(vec):
            raise self._bad(f"{where} returned a {len(vec)}-entry vector for step {k + 1}; the positive class "
                            f"is entry {pos}", "check the PRM server's returned_token_ids / classes and the spec's "
                            "positive_index")
        try:
            return step_score(vec, pos)
        except OverflowError:
            return math.nan

    def _bad(self, msg: str, hint: str | None = None) -> PRMError:
        """A PRMError about the server's answer (not the steps): its fix names the PRM server."""
        err = PRMError(redact_url(msg))
        err.hint = hint or ("the PRM server's answer cannot be used: check that --prm points at a "
                            "step-pooling PRM server of this kind (see docs/servers.md), or restart it")
        return err

    def stats(self) -> dict:
        return dict(self._counters)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client, self._loop = None, None
