"""RLHFlow PRMs (RLHFlow/Llama3.1-8B-PRM-Deepseek-Data, RLHFlow/Llama3.1-8B-PRM-Mistral-Data): a
chat LM that answers each step with `+` (good) or `-` (bad).

Format (RLHFlow/RLHF-Reward-Modeling, math-rm/README.md "Process Reward Evaluation" and
math-rm/prm_evaluate.py; the same in huggingface/search-and-learn, src/sal/models/reward_models.py,
class RLHFFlow): the path is a multi-turn conversation rendered by the checkpoint's own chat
template (Llama 3.1's), one user turn per step: the first "{question} {step 1}", the later ones
"{step k}" (each step stripped of surrounding whitespace; the Mistral-data tag "ки" removed, as the
card splits on it), each followed by the assistant turn "+". The score of step k is
P(+) / (P(+) + P(-)) of the LM predicting step k's answer token (the card reads
logits[:, -3, [+, -]] of the conversation ending at step k: with Llama 3.1's template the answer
`+` is followed by <|eot_id|> only, so position -3 predicts it). Earlier answers are "+", as in
the card's loop, so step k's score depends on steps 1..k only: every step of a path is read from
ONE forward of the whole conversation, and scores are cached by prefix.

Step k's answer token is found by rendering the conversation up to user turn k with the
template's generation prompt: the whole conversation must continue there with `+`, and its tokens
must start with that prefix's tokens (else PRMError: this template does not fit the format).

Served (vLLM): one POST {url}/v1/completions per path, the whole conversation as the prompt text,
`add_special_tokens: false` (the template writes its own BOS), `max_tokens: 1`,
`prompt_logprobs: top_k` and `return_token_ids: true`. vLLM 0.32 answers in `choices[0]`:
`prompt_logprobs`, one entry per prompt token (None for the first), each {token id: {logprob,
rank, decoded_token}} holding the top-k tokens of that position AND the prompt's own token; and
`prompt_token_ids` (checked equal to the local tokenization: the served model must be the
tokenizer's). The entry at step k's answer token gives P(+) (the prompt's own token: always
there) and P(-) when `-` is among the top-k; when it is not, ets.prm.chat_prms.two_class takes
P(-) at the largest probability an unlisted token can have, i.e. the lowest score the answer
allows (counted in stats as `minus_unlisted`). The client renders the prompt itself, so a served
spec names the served model's tokenizer folder: `rlhflow:URL?tokenizer=FOLDER`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Sequence

from ets.prm.base import PRMError, RewardModel, ScoreRequest
from ets.prm.cache import PrefixCache
from ets.prm.chat_prms import (TOKENIZER, TOP_K, Client, chat_text, check_spec, finite, load_model,
                               load_tokenizer, read_entry, two_class, unlisted_bound)
from ets.prm.formats import MATH_SHEPHERD_TAG, tagged_steps
from ets.prm.math_shepherd import ModelPRM, single_token
from ets.prm.registry import BATCH_SIZE, BATCH_TOKENS, DEVICE, DTYPE, MODEL, PRMKind, register

GOOD, BAD = "+", "-"


def conversation(question: str, steps: Sequence[str]) -> list[dict]:
    """The card's conversation of a path: user "{question} {step 1}", assistant "+", user
    "{step 2}", assistant "+", ..."""
    msgs = []
    for k, s in enumerate(tagged_steps(steps, MATH_SHEPHERD_TAG)):
        msgs.append({"role": "user", "content": f"{question.strip()} {s}" if k == 0 else s})
        msgs.append({"role": "assistant", "content": GOOD})
    return msgs


class Format:
    """A path as the RLHFlow PRM reads it, with one tokenizer: `encode(question, steps)` ->
    (text, token ids, answers), answers[k] the index in ids of step k's `+`."""

    def __init__(self, tok):
        self.tok = tok
        self.good = single_token(tok, GOOD, "good answer")
        self.bad = single_token(tok, BAD, "bad answer")

    def encode(self, question: str, steps: Sequence[str]) -> tuple[str, list[int], list[int]]:
        msgs = conversation(question, steps)
        text = chat_text(self.tok, msgs, add_generation_prompt=False)
        ids = self.tok.encode(text, add_special_tokens=False)
        answers = []
        for k in range(len(msgs) // 2):
            head = chat_text(self.tok, msgs[: 2 * k + 1], add_generation_prompt=True)
            head_ids = self.tok.encode(head, add_special_tokens=False)
            j = len(head_ids)
            if not text.startswith(head + GOOD) or ids[:j] != head_ids or j >= len(ids) or ids[j] != self.good:
                raise PRMError(f"PRM rlhflow: step {k + 1}'s answer {GOOD!r} is not one token right after the chat "
                               f"template's generation prompt ({text[len(head) - 40: len(head) + 10]!r}); this "
                               "checkpoint's template does not fit the RLHFlow format")
            answers.append(j)
        return text, ids, answers


class RLHFlowPRM(ModelPRM):
    """In-process RLHFlow PRM: a causal LM with its chat template (ModelPRM: prefix cache,
    batched forwards in the PRM worker thread). `model`: a loaded model (with `tokenizer`) or a
    local folder (tokenizer None)."""

    name = "rlhflow"

    def __init__(self, model, tokenizer=None, device=None, batch_size: int = 8, max_length: int | None = None,
                 dtype=None, batch_tokens: int | None = None):
        super().__init__(model, tokenizer, device, batch_size, max_length, dtype, batch_tokens)
        self.format = Format(self.tok)

    def text(self, question: str, step_texts: Sequence[str]) -> str:
        return self.format.encode(question, step_texts)[0]

    def encode_path(self, question, step_texts):
        _, ids, answers = self.format.encode(question, step_texts)
        return ids, [j - 1 for j in answers]  # the position whose output predicts the answer

    def _good_prob(self, input_ids, attention_mask):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
        return logits[..., [self.format.good, self.format.bad]].float().softmax(-1)[..., 0]

    def from_folder(self, path, dtype=None):
        from transformers import AutoModelForCausalLM

        model = load_model(AutoModelForCausalLM, path, dtype, "give a causal LM checkpoint with its lm_head "
                           "(RLHFlow reads the LM logits of + and -)")
        return model, load_tokenizer(path)


class ServedRLHFlow(RewardModel):
    """RLHFlow PRM served by vLLM (module docstring). tokenizer: the served model's tokenizer (a
    local folder or a loaded one); top_k: prompt log-probs asked per position; model: the
    served name (None: the server's only one)."""

    name = "served-prm:rlhflow"

    def __init__(self, url: str, tokenizer, model: str | None = None, top_k: int = 20,
                 timeout_s: float | None = None, max_concurrency: int = 8, cache_size: int = 200_000):
        if tokenizer is None:
            raise PRMError("served rlhflow needs the served model's tokenizer (?tokenizer=FOLDER)")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.format = Format(load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer)
        self.client = Client(url, "rlhflow", timeout_s, max_concurrency)
        self.model, self.top_k = model, top_k
        self.cache = PrefixCache(cache_size)
        self.minus_unlisted = 0

    def payload(self, text: str) -> dict:
        body = {"prompt": text, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": self.top_k,
                "add_special_tokens": False, "return_token_ids": True}
        return body if self.model is None else {"model": self.model, **body}

    async def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        paths = [(r.question, tuple(r.node.step_texts())) for r in requests]
        todo = self.cache.todo(paths)
        for p, scores in zip(todo, await asyncio.gather(*(self._path(q, steps) for q, steps in todo))):
            self.cache.store(p, scores)
        try:
            return [self.cache.scores(p) for p in paths]
        except KeyError as e:
            raise PRMError(f"PRM {self.name}: {e.args[0]}") from None

    async def _path(self, question: str, steps: Sequence[str]) -> list[float]:
        text, ids, answers = self.format.encode(question, steps)
        where = "/v1/completions"
        body = await self.client.post(where, self.payload(text))
        choices = body.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        lps = choice.get("prompt_logprobs")
        if not isinstance(lps, list) or len(lps) != len(ids):
            raise self.client.bad(where, f"answered without prompt_logprobs for the {len(ids)} prompt tokens "
                                  f"(got {len(lps) if isinstance(lps, list) else lps!r}); is it vLLM?")
        got = choice.get("prompt_token_ids")
        if got is not None and list(got) != ids:
            raise self.client.bad(where, "tokenizes the prompt differently from ?tokenizer: give the served "
                                  "model's own tokenizer folder")
        out = []
        for k, j in enumerate(answers):
            try:
                table = read_entry(lps[j])
            except ValueError as e:
                raise self.client.bad(where, f"step {k + 1}: {e}") from None
            if self.format.good not in table:
                raise self.client.bad(where, f"step {k + 1}: the prompt's own token {GOOD!r} is missing from its "
                                      "prompt_logprobs")
            top = [p for t, (p, r) in table.items() if r is None or r <= self.top_k]
            others = [p for t, (p, r) in table.items() if r is not None and r > self.top_k]
            neg = table[self.format.bad][0] if self.format.bad in table else None
            self.minus_unlisted += neg is None
            score = two_class(table[self.format.good][0], neg, unlisted_bound(top, others))
            out.append(finite(score, f"PRM {self.name}, step {k + 1}"))
        return out

    def stats(self) -> dict:
        return {**self.client.counters, "prm_cache_hits": self.cache.hits, "minus_unlisted": self.minus_unlisted}

    async def aclose(self) -> None:
        await self.client.aclose()


def build(spec, ctx):
    if spec.is_url:
        return ServedRLHFlow(spec.target, spec.get("tokenizer"), model=spec.get("model"), top_k=spec.get("top_k"),
                             timeout_s=ctx.timeout_s)
    return RLHFlowPRM(spec.target, device=spec.get("device"), batch_size=spec.get("batch_size"),
                      dtype=spec.get("dtype"), batch_tokens=spec.get("batch_tokens"))


register(PRMKind(
    "rlhflow", "multi-turn chat in the checkpoint's template: user \"{question} {step 1}\", \"{step 2}\", ..., each "
    "answered by the assistant \"+\": P(+) / (P(+) + P(-)) predicting each answer (RLHFlow Llama3.1-8B-PRM-*-Data)",
    ("path", "url"), build, options=(DEVICE, DTYPE, BATCH_SIZE, BATCH_TOKENS, MODEL, TOKENIZER, TOP_K),
    check=lambda spec: check_spec(spec, needs_tokenizer=True),
    served_by="vLLM /v1/completions with prompt_logprobs, one request per path (needs ?tokenizer=FOLDER)",
    tested="tiny chat Llama: scores equal the logits by hand; a loopback stand-in and a real vLLM server give "
           "the in-process scores (tests/test_prm_chat_kinds.py)"))
