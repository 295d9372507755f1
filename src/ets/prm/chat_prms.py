"""What the chat-model PRM kinds share (ets.prm.rlhflow, ets.prm.judge, ets.prm.orm): loading a
local chat checkpoint, the client of a served one, and the rule that turns returned top-k
log-probs into a two-class score.

Two-class rule (`two_class`): score = P(pos) / (P(pos) + P(neg)). A server returns only the
top-k log-probs of a position (vLLM: `prompt_logprobs` / `top_logprobs`, capped by its
--max-logprobs, 20 by default), so a class may be missing from what it returns. A missing class
is taken at the largest probability an unlisted token can have, `unlisted_bound(listed)` =
min(the smallest listed probability, 1 - the sum of the listed ones): for a missing `-` this is
the lowest score the returned numbers allow (a step is never rated above what is known); when
both classes are missing the score is 0.5 (no signal either way). With k at least the rank of
both classes the rule is exact.

Nothing here imports torch or transformers at import time.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Sequence

from ets.prm.base import PRMError, charge
from ets.prm.registry import Option, SpecError, check_target

TOP_K = Option("top_k", int, 20, "log-probs per position asked of a served PRM (vLLM caps it at its --max-logprobs, "
               "default 20); the judge applies the same top-k in-process")
TOKENIZER = Option("tokenizer", str, None, "local folder of a served PRM's tokenizer (its chat template and "
                   "vocabulary; served rlhflow needs it to find every step's answer token)")


def unlisted_bound(top: Sequence[float], others: Sequence[float] = ()) -> float:
    """The largest probability a token missing from a returned top-k list can have: min(the
    smallest of the top-k probabilities `top`, 1 - the sum of every returned probability, `top`
    and `others`: tokens returned beside the top-k), never below 0; 1 when nothing is returned."""
    rest = 1.0 - sum(top) - sum(others)
    return max(0.0, min(min(top), rest) if top else rest)


def read_entry(entry) -> dict[int, tuple[float, int | None]]:
    """One position of vLLM's `prompt_logprobs` ({token id: {"logprob", "rank", ...}}, ids as
    JSON strings) as {id: (probability, rank or None)}; ValueError when it is not that shape."""
    if not isinstance(entry, dict):
        raise ValueError(f"a position's log-probs are {type(entry).__name__}, not a mapping")
    out = {}
    for key, v in entry.items():
        lp, rank = (v.get("logprob"), v.get("rank")) if isinstance(v, dict) else (v, None)
        if isinstance(lp, bool) or not isinstance(lp, (int, float)):
            raise ValueError(f"token {key}: log-prob {lp!r} is not a number")
        out[int(key)] = (math.exp(min(0.0, float(lp))), rank if isinstance(rank, int) else None)
    return out


def two_class(pos: float | None, neg: float | None, unlisted: float) -> float:
    """pos / (pos + neg), a class that is None (not among the returned top-k) taken at
    `unlisted`; 0.5 when both are zero."""
    p = unlisted if pos is None else pos
    n = unlisted if neg is None else neg
    return 0.5 if p + n <= 0.0 else p / (p + n)


def chat_text(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    """`messages` rendered by the tokenizer's own chat template (PRMError if it has none)."""
    if not getattr(tok, "chat_template", None):
        raise PRMError("the PRM's tokenizer has no chat template; give a chat checkpoint (its "
                       "tokenizer_config.json holds `chat_template`)")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True)


def load_model(cls, path, dtype, fix: str):
    """A strict (ets.prm.loading) local checkpoint of `cls` in eval mode."""
    from ets.prm.loading import strict_pretrained

    return strict_pretrained(cls, Path(path).expanduser(), fix=fix, dtype=dtype or "auto").eval()


def device_of(device):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_spec(spec, needs_tokenizer: bool = False) -> None:
    """check_target, plus: top_k >= 1, a given tokenizer folder exists, and a served spec of a
    kind that renders its own prompt names one (`?tokenizer=FOLDER`)."""
    check_target(spec)
    opts = dict(spec.options)
    if opts.get("top_k", 1) < 1:
        raise SpecError(f"--prm {spec}: top_k={opts['top_k']}; give a number of log-probs >= 1")
    tok = opts.get("tokenizer")
    if tok is not None and not (Path(tok).expanduser() / "tokenizer_config.json").is_file():
        raise SpecError(f"--prm {spec}: tokenizer={tok}: no tokenizer folder there (no tokenizer_config.json)")
    if needs_tokenizer and spec.is_url and tok is None:
        raise SpecError(f"--prm {spec}: a served {spec.kind} PRM needs the served model's tokenizer to build its "
                        f"prompt: add ?tokenizer=FOLDER (a local folder with its tokenizer_config.json)")


class Client:
    """HTTP side of a served chat PRM: POST JSON to `url + path` through
    ets.http.request_with_retries (timeout_s per try, None: 300 s), at most `max_concurrency`
    requests in flight; a server that does not answer raises ServerError with the PRM hint."""

    def __init__(self, url: str, what: str, timeout_s: float | None = None, max_concurrency: int = 8,
                 retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 8.0, down_after: int = 3):
        from ets.http import Health, split_urls

        self.url, self.what = split_urls(url)[0], what
        self.timeout_s = 300.0 if timeout_s is None else timeout_s
        self.max_concurrency, self.retries = max_concurrency, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.health = Health(self.url, down_after)
        self.counters = {"requests": 0, "retries": 0}
        self._loop = self._client = self._sem = None

    async def post(self, path: str, payload: dict) -> dict:
        import httpx

        from ets.http import ServerError, request_with_retries

        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None))
            self._sem = asyncio.Semaphore(self.max_concurrency)
        async with self._sem:
            self.counters["requests"] += 1
            try:
                body = await request_with_retries(
                    self._client, "POST", f"{self.url}{path}", json=payload, retries=self.retries,
                    backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s, timeout_s=self.timeout_s,
                    counters=self.counters, health=self.health)
            except ServerError as e:
                err = type(e)(f"{self.what} (--prm): {e}")
                err.hint = "the PRM server did not answer: check that it is up and that the --prm URL is right"
                raise err from e
        if not isinstance(body, dict):
            raise self.bad(path, f"answered {type(body).__name__}, not a JSON object")
        used = (body.get("usage") or {}).get("prompt_tokens") if isinstance(body.get("usage"), dict) else None
        if isinstance(used, int) and not isinstance(used, bool):  # the server's count of what it read
            self.counters["prm_tokens"] = self.counters.get("prm_tokens", 0) + used
            charge("prm_tokens", used)
        return body

    def bad(self, path: str, msg: str) -> PRMError:
        """A PRMError about the server's answer (not the steps), with the fix."""
        from ets.http import one_line, redact_url

        err = PRMError(redact_url(f"{self.what} at {self.url}{path} (--prm): {one_line(msg, 300)}"))
        err.hint = (f"the PRM server's answer cannot be used: check that --prm points at a vLLM server of a "
                    f"{self.what} model (docs/prms.md), or restart it")
        return err

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = self._loop = None


def finite(score: float, what: str) -> float:
    if not math.isfinite(score):
        raise PRMError(f"{what}: non-finite score {score!r}")
    return float(score)
