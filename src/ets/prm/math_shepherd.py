"""In-process model PRMs (ModelPRM: prefix cache, worker thread, batching), step-tag PRMs run
with transformers, and the Math-Shepherd adapter.

Scheme shared by tag-based PRMs: the path is written as question + steps, each step followed
by one step-tag token; the model is run once over the whole path; the score of step i is read at
the position of the i-th tag. The tag must be ONE token of the PRM's tokenizer (checked at load)
and every step must yield exactly one tag (else PRMError: a step the PRM cannot see is never
silently dropped).

Math-Shepherd (Wang et al., 2024): a causal LM; tag "ки"; score = P("+") / (P("+") + P("-"))
from the LM logits at the tag position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ets.prm.base import PRMError, RewardModel, ScoreRequest, charge
from ets.prm.cache import PrefixCache, in_worker
from ets.prm.formats import math_shepherd_text
from ets.prm.registry import BATCH_SIZE, BATCH_TOKENS, DEVICE, DTYPE, MODEL, PRMKind, check_target, register


def single_token(tok, text: str, what: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise PRMError(f"the PRM's {what} {text!r} must be ONE token of its tokenizer, got {ids}")
    return ids[0]


class ModelPRM(RewardModel):
    """Base of the in-process model PRMs (step-tag ones below, ets.prm.skywork).

    Subclasses give `encode_path(question, steps) -> (ids, at)`: the token ids the model reads for
    the path and, per step, the position whose output scores it (len(at) == len(steps), else
    PRMError); and `_good_prob(input_ids [B, T], attention_mask [B, T]) -> [B, T]`: P(step good)
    at every position (only the `at` positions are read; right padding). `from_folder(path,
    dtype) -> (model, tokenizer)` loads a local folder (strictly: ets.prm.loading).

    score(): every step score is kept in a PrefixCache (ets.prm.cache), so a path whose every
    prefix was scored is never encoded or run again, and identical paths of one call run once;
    encoding and forwards run in the PRM worker thread (ets.prm.cache.in_worker), never on the
    event loop. batch_size: most paths per forward; batch_tokens: most padded tokens (B * T) per
    forward, None = no cap (a path longer than the cap runs alone); max_length: longest path in
    tokens (longer: PRMError).
    """

    name = "model-prm"

    def __init__(self, model, tokenizer, device=None, batch_size: int = 8, max_length: int | None = None,
                 dtype=None, batch_tokens: int | None = None, cache_size: int = 200_000):
        import torch

        if batch_size < 1 or (batch_tokens is not None and batch_tokens < 1):
            raise ValueError(f"batch_size ({batch_size}) and batch_tokens ({batch_tokens}) must be >= 1")
        if tokenizer is None:  # `model` is a local folder
            model, tokenizer = self.from_folder(model, dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tok = tokenizer
        self.batch_size, self.batch_tokens, self.max_length = batch_size, batch_tokens, max_length
        self.cache = PrefixCache(cache_size)
        self.calls = self.paths = self.encoded = self.tokens = 0

    def from_folder(self, path, dtype):
        """(model, tokenizer) loaded from a local folder."""
        raise NotImplementedError

    def encode_path(self, question: str, step_texts: Sequence[str]) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def _good_prob(self, input_ids, attention_mask):
        raise NotImplementedError

    async def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self.calls += 1
        self.paths += len(requests)
        paths = [(r.question, tuple(r.node.step_texts())) for r in requests]
        todo = self.cache.todo(paths)
        if todo:
            tally: list[int] = []
            for p, scores in zip(todo, await in_worker(self._score_paths, todo, tally)):
                self.cache.store(p, scores)
            charge("prm_tokens", sum(tally))  # to the problem being searched (ets.prm.base)
        try:
            return [self.cache.scores(p) for p in paths]
        except KeyError as e:
            raise PRMError(f"PRM {self.name}: {e.args[0]}") from None

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the paths per forward, longest first (least padding), within the caps."""
        out, cur, T = [], [], 0
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            t = max(T, lengths[i])
            if cur and (len(cur) == self.batch_size or
                        (self.batch_tokens is not None and t * (len(cur) + 1) > self.batch_tokens)):
                out.append(cur)
                cur, t = [], lengths[i]
            cur.append(i)
            T = t
        return out + [cur] if cur else out

    def _score_paths(self, paths: list, tally: list | None = None) -> list[list[float]]:
        """Step scores of each (question, steps) path; runs in the worker thread. The input
        tokens encoded are counted in `tokens` (and appended to `tally`, if given)."""
        import math

        import torch

        encoded = []
        for q, steps in paths:
            ids, at = self.encode_path(q, list(steps))
            if self.max_length is not None and len(ids) > self.max_length:
                raise PRMError(f"path of {len(ids)} tokens exceeds the PRM's max_length {self.max_length}")
            if len(at) != len(steps):
                raise PRMError(f"PRM {self.name}: {len(steps)} steps but {len(at)} scored positions")
            encoded.append((ids, at))
        self.encoded += len(encoded)
        n_tokens = sum(len(ids) for ids, _ in encoded)
        self.tokens += n_tokens
        if tally is not None:
            tally.append(n_tokens)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        out: list = [None] * len(encoded)
        for chunk in self._batches([len(ids) for ids, _ in encoded]):
            T = max(len(encoded[i][0]) for i in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)  # [B, T], right padding
            mask = torch.zeros(len(chunk), T, dtype=torch.long)  # [B, T]
            for b, i in enumerate(chunk):
                seq = encoded[i][0]
                ids[b, :len(seq)] = torch.tensor(seq)
                mask[b, :len(seq)] = 1
            with torch.inference_mode():
                good = self._good_prob(ids.to(self.device), mask.to(self.device)).float().cpu()  # [B, T]
            for b, i in enumerate(chunk):
                out[i] = good[b, encoded[i][1]].tolist()
                for k, s in enumerate(out[i]):
                    if not math.isfinite(s):
                        raise PRMError(f"PRM {self.name}: non-finite score {s!r} for step {k + 1} "
                                       f"({paths[i][1][k][-60:]!r})")
        return out

    def stats(self) -> dict:
        return {"prm_calls": self.calls, "prm_paths": self.paths, "prm_paths_encoded": self.encoded,
                "prm_cache_hits": self.cache.hits, "prm_tokens": self.tokens}


class StepTagPRM(ModelPRM):
    """Base of the tag-based adapters. Subclasses give `_format(question, steps)` (text with one
    tag per step) and `_good_prob` (ModelPRM); a step is scored at its tag.

    insert_tag: True = strip each step's trailing step delimiter / whitespace and append the tag
      (any policy works); False = the steps must already end with the tag, i.e. the policy's
      step_delimiter must be the tag (checked at load when `step_delimiter` is given).
    """

    name = "step-tag"

    def __init__(self, model, tokenizer, tag: str, insert_tag: bool = True, step_delimiter: str | None = None,
                 device=None, batch_size: int = 8, max_length: int | None = None, dtype=None,
                 batch_tokens: int | None = None):
        super().__init__(model, tokenizer, device, batch_size, max_length, dtype, batch_tokens)
        tokenizer = self.tok
        self.tag, self.insert_tag = tag, insert_tag
        self.step_delimiter = step_delimiter
        self.tag_id = single_token(tokenizer, tag, "step tag")
        # the tag must survive tokenization in context too (no merge with neighbouring text)
        probe = tokenizer.encode(f"1 + 1 = 2 {tag}\nnext {tag}", add_special_tokens=False)
        if probe.count(self.tag_id) != 2:
            raise PRMError(f"the step tag {tag!r} does not stay one token in context: {probe}")
        if not insert_tag and step_delimiter is not None and tag not in step_delimiter:
            raise PRMError(f"with insert_tag=False the policy's steps must end with the tag {tag!r}, "
                           f"but its step_delimiter is {step_delimiter!r}: set step_delimiter to the tag "
                           "or use insert_tag=True")

    def clean_step(self, text: str) -> str:
        """A step's text as the PRM sees it, without a trailing delimiter (re-added as the tag)."""
        t = text.rstrip()
        if self.step_delimiter and self.step_delimiter.strip() and t.endswith(self.step_delimiter.strip()):
            t = t[: -len(self.step_delimiter.strip())].rstrip()
        if t.endswith(self.tag):
            t = t[: -len(self.tag)].rstrip()
        return t

    def _format(self, question: str, steps: list[str]) -> str:
        raise NotImplementedError

    def text(self, question: str, step_texts: Sequence[str]) -> str:
        """The input text the model scores for this path (one tag per step)."""
        if self.insert_tag:
            steps = [self.clean_step(s) for s in step_texts]
        else:
            steps = []
            for i, s in enumerate(step_texts):
                if not s.rstrip().endswith(self.tag):
                    raise PRMError(f"step {i + 1} does not end with the step tag {self.tag!r}: {s[-60:]!r}")
                steps.append(s.rstrip()[: -len(self.tag)].rstrip())
        return self._format(question, steps)

    def encode(self, question: str, step_texts: Sequence[str]) -> list[int]:
        steps = list(step_texts)
        ids = self.tok.encode(self.text(question, step_texts), add_special_tokens=False)
        n_tags = ids.count(self.tag_id)
        if n_tags != len(steps):
            raise PRMError(f"PRM {self.name}: the path has {len(steps)} steps but {n_tags} step tags "
                           f"{self.tag!r} reached the model (a step contains the tag, or the tag merged "
                           f"with its neighbours); last step: {steps[-1][-60:] if steps else ''!r}")
        return ids

    def encode_path(self, question: str, step_texts: Sequence[str]) -> tuple[list[int], list[int]]:
        ids = self.encode(question, step_texts)
        return ids, [i for i, t in enumerate(ids) if t == self.tag_id]


class MathShepherdPRM(StepTagPRM):
    """Math-Shepherd-style PRM over a causal LM (e.g. peiyi9979/math-shepherd-mistral-7b-prm,
    from a local folder). Input: ets.prm.formats.math_shepherd_text, "{question} {step 1} ки\\n{step 2} ки"
    (a tag inside a step is removed, as the served PRM does).
    `model` is a loaded model (with `tokenizer`) or a local folder (tokenizer None)."""

    name = "math-shepherd"

    def __init__(self, model, tokenizer=None, tag: str = "ки", good: str = "+", bad: str = "-",
                 insert_tag: bool = True, step_delimiter: str | None = None, device=None, batch_size: int = 8,
                 max_length: int | None = None, dtype=None, batch_tokens: int | None = None):
        super().__init__(model, tokenizer, tag, insert_tag, step_delimiter, device, batch_size, max_length, dtype,
                         batch_tokens)
        self.good_id = single_token(self.tok, good, "good token")
        self.bad_id = single_token(self.tok, bad, "bad token")

    def _format(self, question: str, steps: list[str]) -> str:
        return math_shepherd_text(question, steps, self.tag)  # the served PRM sends the same text

    def _good_prob(self, input_ids, attention_mask):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
        pair = logits[..., [self.good_id, self.bad_id]].float()  # [B, T, 2]
        return pair.softmax(-1)[..., 0]

    def from_folder(self, path: str | Path, dtype=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ets.prm.loading import strict_pretrained

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = strict_pretrained(AutoModelForCausalLM, path, fix="give a causal LM checkpoint with its lm_head "
                                  "(Math-Shepherd reads the LM logits of + and -)", dtype=dtype or "auto")
        return model, tok


def served_or_local(convention: str, local):
    """A kind's build: ServedPRM (vLLM pooling, `convention`) for a URL, else `local(spec, ctx)`."""
    def build(spec, ctx):
        if spec.is_url:
            from ets.prm.served import ServedPRM

            return ServedPRM(spec.target, model=spec.get("model"), convention=convention,
                             batch_size=spec.get("batch_size"), timeout_s=ctx.timeout_s)
        return local(spec, ctx)
    return build


register(PRMKind(
    "math-shepherd", "\"{question} {step 1} ки\\n{step 2} ки\": P(+) / (P(+) + P(-)) from the LM logits at each "
    "ки (Math-Shepherd's causal LM)", ("path", "url"),
    served_or_local("math-shepherd", lambda spec, ctx: MathShepherdPRM(
        spec.target, device=spec.get("device"), batch_size=spec.get("batch_size"), dtype=spec.get("dtype"),
        batch_tokens=spec.get("batch_tokens"))),
    options=(DEVICE, DTYPE, BATCH_SIZE, BATCH_TOKENS, MODEL), check=check_target,
    served_by="vLLM pooling, STEP pooling with returned_token_ids [+, -] (docs/servers.md)",
    tested="tiny Llama with the tag token: scores equal the logits by hand; served by a loopback "
           "stand-in (tests/test_prm_hf.py); a folder without its lm_head fails naming it (tests/test_prm_kinds.py)"))
