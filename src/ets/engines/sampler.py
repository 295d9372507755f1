"""Drawing tokens and ending steps.

Sampling (common random numbers): child i of a node draws its tokens from its own CPU generator
seeded with `node_seed(run seed, node's path) + i` (ets.engines.base, as servers seed requests),
one uniform per token. So a node's k-th child depends only on the run seed, the node's path (the
prompt names the problem) and k, and on the logits: not on the batch, the iteration it joined,
the problems in flight, a preemption, what ran earlier in the process, or how many siblings were
asked for. The logits themselves are float arithmetic whose last bits can depend on the batch's
shape (padding, batch size); a token changes only when its uniform falls within that rounding
of a boundary of the cumulative distribution.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ets.engines.base import DELIMITER, EOS, LENGTH, node_seed
from ets.engines.sampling import SamplingConfig


def row_generators(run_seed: int, path_token_ids: Sequence[int], n: int) -> list[torch.Generator]:
    """The random streams of a node's children 0..n-1: CPU generators seeded with
    `node_seed(run_seed, path) + i`, the scheme servers use for a request's `seed`. Child i's
    stream depends only on (run seed, the node's path, i): not on n, on what else is in the batch,
    on earlier problems in the process, nor on the device."""
    base = node_seed(run_seed, path_token_ids)
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generators: Sequence[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. logits: [B, V]; generators: one per row (None only when
    temperature is 0). Returns (ids [B], logprobs [B]); the log-prob is under the model's own
    distribution (before temperature/top-p), the policy's confidence.

    Row b draws exactly ONE uniform from generators[b] (on the CPU, in float64) and takes the
    token where it falls in the row's cumulative distribution (inverse CDF, vocabulary order), so
    a row's token depends only on its own logits and its own stream, never on the other rows.
    temperature 0 is greedy and draws nothing."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        ids = logits.argmax(-1)
    else:
        if generators is None or len(generators) != logits.shape[0]:
            raise ValueError("sampling at temperature > 0 needs one generator per row")
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            # drop a token when the mass before it already reaches top_p (keeps at least one)
            drop = sorted_p.cumsum(-1) - sorted_p >= top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        cdf = probs.double().cumsum(-1)  # [B, V]; its last entry is the kept mass
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
        at = (u.to(cdf.device)[:, None] * cdf[:, -1:])  # [B, 1] in [0, kept mass)
        ids = torch.searchsorted(cdf, at, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


class StepEnd:
    """Where a step ends: at an EOS id (kept in the step), at the first occurrence of the step
    delimiter in the decoded text (its tokens kept), or at `max_step_tokens`.

    The delimiter is looked for in the decoded text of the step's last tokens only, once per new
    token: it first appears with the newest token, so its characters come from the last
    len(delimiter) tokens that decode to something. The window holds len(delimiter) + 4 tokens,
    widened while its text is shorter than the delimiter + 4 characters (tokens that decode to
    nothing, e.g. special tokens); its first token's text may be cut by the decoder (a leading
    space), and that token is never needed."""

    def __init__(self, decode: Callable[[list[int]], str], eos_ids: set[int]):
        self.decode, self.eos_ids = decode, eos_ids

    def __call__(self, tokens: list[int], sampling: SamplingConfig) -> str | None:
        if tokens[-1] in self.eos_ids:
            return EOS
        delim = sampling.step_delimiter
        window = len(delim) + 4
        while True:
            text = self.decode(tokens[-window:])
            if delim in text:
                return DELIMITER
            if len(text) >= len(delim) + 4 or window >= len(tokens):
                break
            window *= 4
        if len(tokens) >= sampling.max_step_tokens:
            return LENGTH
        return None
