"""The judge PRM: any instruct model asked, step by step, whether the last step is correct.

Prompt (fixed; `system` optional, none by default): one user turn

    Question:
    {question}

    Previous steps:
    Step 1: {step 1}
    ...                      ("(none)" for the first step)

    Step to judge:
    Step {k}: {step k}

    Is this step correct? Answer Yes or No.

(every text stripped of surrounding whitespace), rendered by the model's chat template with its
generation prompt. Score = Y / (Y + N) from the FIRST generated token's top-k probabilities:
Y sums those of the top-k tokens whose text, stripped of whitespace and lower-cased, is "yes"
(so " Yes", "Yes", "yes", "YES", "\\nYes" all count), N those that read "no". A class with no
token in the top-k is taken at the largest probability an unlisted token can have
(ets.prm.chat_prms.two_class; neither: 0.5). The in-process judge applies the same top-k rule
to the model's full distribution, so it and the served judge give the same score.

Each step of a path is judged once, in its own request, and cached by prefix
(ets.prm.cache.PrefixCache): a path of k steps whose first k-1 were scored costs one request.

Served (vLLM, or any OpenAI-compatible server with log-probs): POST {url}/v1/chat/completions
with the messages, `max_tokens: 1`, `temperature: 0`, `logprobs: true`, `top_logprobs: top_k`
(vLLM caps it at its --max-logprobs, 20 by default); read choices[0].logprobs.content[0]
.top_logprobs ([{token, logprob, bytes}]). The server applies its own chat template.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from ets.prm.base import PRMError, RewardModel, ScoreRequest
from ets.prm.cache import PrefixCache, in_worker
from ets.prm.chat_prms import (TOP_K, Client, chat_text, check_spec, device_of, finite, load_model, load_tokenizer,
                               two_class, unlisted_bound)
from ets.prm.registry import BATCH_SIZE, DEVICE, DTYPE, MODEL, SYSTEM, PRMKind, register

PROMPT = ("Question:\n{question}\n\nPrevious steps:\n{previous}\n\nStep to judge:\n{step}\n\n"
          "Is this step correct? Answer Yes or No.")


def judge_messages(question: str, steps: Sequence[str], system: str | None = None) -> list[dict]:
    """The chat that asks whether the last of `steps` is correct."""
    clean = [s.strip() for s in steps]
    previous = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(clean[:-1])) or "(none)"
    user = PROMPT.format(question=question.strip(), previous=previous, step=f"Step {len(clean)}: {clean[-1]}")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def yes_no_score(top: Sequence[tuple[str, float]]) -> float:
    """Y / (Y + N) of a first token's top-k (text, probability) pairs (module docstring)."""
    yes = [p for t, p in top if t.strip().lower() == "yes"]
    no = [p for t, p in top if t.strip().lower() == "no"]
    return two_class(sum(yes) if yes else None, sum(no) if no else None, unlisted_bound([p for _, p in top]))


class JudgeBase(RewardModel):
    """score(): every distinct uncached prefix of the batch judged once (`_judge(chats) ->
    scores`, one per chat), all scores kept in a PrefixCache."""

    name = "judge"

    def __init__(self, system: str | None, top_k: int, cache_size: int = 200_000):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.system, self.top_k = system, top_k
        self.cache = PrefixCache(cache_size)
        self.judged = 0

    def messages(self, question: str, steps: Sequence[str]) -> list[dict]:
        return judge_messages(question, steps, self.system)

    async def _judge(self, chats: list[list[dict]]) -> list[float]:
        raise NotImplementedError

    async def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        paths = [(r.question, tuple(r.node.step_texts())) for r in requests]
        todo = self.cache.todo(paths)
        known: dict[tuple, float | None] = {}
        for q, steps in todo:
            for k in range(len(steps)):
                pre = (q, steps[: k + 1])
                if pre not in known:
                    known[pre] = self.cache.get(pre)  # None: judge it
        need = [p for p, s in known.items() if s is None]
        if need:
            scores = await self._judge([self.messages(q, steps) for q, steps in need])
            self.judged += len(need)
            for (q, steps), s in zip(need, scores):
                known[(q, steps)] = finite(s, f"PRM {self.name}, step {len(steps)}")
        for q, steps in todo:
            self.cache.store((q, steps), [known[(q, steps[: k + 1])] for k in range(len(steps))])
        try:
            return [self.cache.scores(p) for p in paths]
        except KeyError as e:
            raise PRMError(f"PRM {self.name}: {e.args[0]}") from None


class JudgePRM(JudgeBase):
    """In-process judge: a causal LM with its chat template, from a local folder (tokenizer None)
    or loaded (`model`, `tokenizer`); batch_size prompts per forward, in the PRM worker thread."""

    def __init__(self, model, tokenizer=None, system: str | None = None, top_k: int = 20, device=None,
                 batch_size: int = 8, dtype=None):
        super().__init__(system, top_k)
        if tokenizer is None:
            from transformers import AutoModelForCausalLM

            tokenizer = load_tokenizer(model)
            model = load_model(AutoModelForCausalLM, model, dtype, "give a causal LM checkpoint with its lm_head")
        self.device = device_of(device)
        self.model, self.tok, self.batch_size = model.to(self.device).eval(), tokenizer, batch_size
        self._texts: dict[int, str] = {}

    def prompt(self, question: str, steps: Sequence[str]) -> str:
        """The text the model reads to judge the last of `steps`."""
        return chat_text(self.tok, self.messages(question, steps), add_generation_prompt=True)

    async def _judge(self, chats):
        return await in_worker(self._forward, chats)

    def _token(self, i: int) -> str:
        if i not in self._texts:
            self._texts[i] = self.tok.decode([i])
        return self._texts[i]

    def _forward(self, chats: list[list[dict]]) -> list[float]:
        import torch

        enc = [self.tok.encode(chat_text(self.tok, m, True), add_special_tokens=False) for m in chats]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        out = []
        for i in range(0, len(enc), self.batch_size):
            chunk = enc[i: i + self.batch_size]
            lengths = torch.tensor([len(e) for e in chunk])
            ids = torch.full((len(chunk), int(lengths.max())), pad, dtype=torch.long)  # [B, T], right padding
            mask = torch.zeros_like(ids)
            for b, e in enumerate(chunk):
                ids[b, :len(e)], mask[b, :len(e)] = torch.tensor(e), 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                last = logits[torch.arange(len(chunk)), (lengths - 1).to(logits.device)].float().softmax(-1)  # [B, V]
                probs, top = last.topk(min(self.top_k, last.shape[-1]), dim=-1)
            for p_row, t_row in zip(probs.cpu().tolist(), top.cpu().tolist()):
                out.append(yes_no_score([(self._token(t), p) for t, p in zip(t_row, p_row)]))
        return out

    def stats(self) -> dict:
        return {"prm_judged": self.judged, "prm_cache_hits": self.cache.hits}


class ServedJudge(JudgeBase):
    """The judge on a served instruct model (module docstring): one chat-completions request per
    judged step. model: the served name (None: the server's only one)."""

    name = "served-prm:judge"

    def __init__(self, url: str, model: str | None = None, system: str | None = None, top_k: int = 20,
                 timeout_s: float | None = None, max_concurrency: int = 8):
        super().__init__(system, top_k)
        self.client = Client(url, "judge", timeout_s, max_concurrency)
        self.model = model

    def payload(self, messages: list[dict]) -> dict:
        body = {"messages": messages, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                "top_logprobs": self.top_k}
        return body if self.model is None else {"model": self.model, **body}

    async def _judge(self, chats):
        return await asyncio.gather(*(self._one(m) for m in chats))

    async def _one(self, messages: list[dict]) -> float:
        import math

        where = "/v1/chat/completions"
        body = await self.client.post(where, self.payload(messages))
        try:
            first = body["choices"][0]["logprobs"]["content"][0]
            top = [(str(e["token"]), math.exp(min(0.0, float(e["logprob"])))) for e in first["top_logprobs"]]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise self.client.bad(where, f"answered without the first token's top_logprobs ({type(e).__name__}: "
                                  f"{e}); does the server return log-probs?") from None
        if not top:
            raise self.client.bad(where, "returned no top_logprobs for the first token")
        return yes_no_score(top)

    def stats(self) -> dict:
        return {**self.client.counters, "prm_judged": self.judged, "prm_cache_hits": self.cache.hits}

    async def aclose(self) -> None:
        await self.client.aclose()


def build(spec, ctx):
    if spec.is_url:
        return ServedJudge(spec.target, model=spec.get("model"), system=spec.get("system"), top_k=spec.get("top_k"),
                           timeout_s=ctx.timeout_s, max_concurrency=spec.get("batch_size"))  # served: requests in flight
    return JudgePRM(spec.target, system=spec.get("system"), top_k=spec.get("top_k"), device=spec.get("device"),
                    batch_size=spec.get("batch_size"), dtype=spec.get("dtype"))


register(PRMKind(
    "judge", "any instruct model, its chat template, one user turn per step: the question, the earlier steps, the "
    "step to judge, \"Is this step correct? Answer Yes or No.\": P(Yes) / (P(Yes) + P(No)) from the first "
    "generated token's top-k (yes/no in any case and spacing)", ("path", "url"), build,
    options=(DEVICE, DTYPE, BATCH_SIZE, MODEL, SYSTEM, TOP_K), check=check_spec,
    served_by="vLLM (any OpenAI-compatible server) /v1/chat/completions, max_tokens 1, top_logprobs; one request "
              "per new step",
    tested="tiny chat Llama: scores equal the logits by hand; a loopback stand-in and a real vLLM server give "
           "the in-process scores (tests/test_prm_chat_kinds.py)"))
