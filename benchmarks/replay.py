"""Replay saved decisions under other selection settings: what each would have kept.

A one-decision counterfactual, cheap (no generation): at every depth a saved run traced
(its candidates, their PRM scores, the width remaining), rerun REBASE's allocation and ETS under
each setting on exactly those inputs, and measure what each keeps:

- `kept`: candidates given >= 1 child;
- `kept_nodes` / `kept_tokens`: distinct nodes / tokens of the kept candidates with all their
  ancestors (prompt included) - the shared KV the next depth is grown from, what the ETS program
  prices;
- `next_kv`: `kept_tokens` plus an estimate of the children's own tokens (`remaining` times the
  mean step length at the next depth of the saved tree; every setting spends the full remaining
  width, so this part is nearly the same for all and dilutes the ratio exactly as in a real run);
- `top_share`: share of the width on the best-funded candidate.

The replay holds the tree fixed at the saved run's trajectory, so it says what each setting does
with the same candidates, not where its own search would have gone (its accuracy needs a real
run). It is the quick way to see which settings can move KV before paying for a frontier. With
`rescore` the candidates keep their text but take another PRM's scores (e.g. a learned PRM's):
how the same decisions would go under a sharper or flatter ranking.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ets.report.table import format_table
from ets.strategies.base import Frontier
from ets.strategies.ets import ETS, ETSConfig
from ets.strategies.rebase import rebase_allocate
from ets.tree import kv_footprint
from ets.treeio import tree_from_dict


class CachedEmbedder:
    """Embeds each distinct text once across settings (the replay asks for the same texts often)."""

    def __init__(self, inner):
        self.inner, self.name, self._cache = inner, inner.name, {}

    def embed(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            for t, v in zip(todo, self.inner.embed(todo)):
                self._cache[t] = np.asarray(v)
        return np.stack([self._cache[t] for t in texts])


def run_width(record: dict) -> int:
    """The width a saved problem was searched at: the root's first expansion got all of it."""
    return sum(record["trace"][0]["alloc"]) if record.get("trace") else 0


def decisions(records: list[dict], rescore=None):
    """(problem id, tree, depth, candidates, remaining, width) for every traced decision with a
    choice to make (>= 2 candidates). `rescore(question, tree)`, when given, replaces the saved
    node scores first (another PRM's view of the same candidates)."""
    for r in records:
        tree = tree_from_dict(r["tree"])
        if rescore is not None:
            rescore(r["question"], tree)
        width = run_width(r)
        for t in r.get("trace", []):
            if t["depth"] < 1 or len(t.get("candidate_ids", [])) < 2:
                continue
            cands = [tree.nodes[i] for i in t["candidate_ids"]]
            yield r["id"], tree, t["depth"], cands, t["remaining"], width


def _measure(cands, alloc, children_tokens: float) -> dict:
    """What `alloc` keeps of `cands`; `children_tokens`: the estimate of the new children's own
    tokens (the same for every setting at one decision)."""
    kept = [c for c, a in zip(cands, alloc) if a > 0]
    kv = kv_footprint(kept)
    return {"kept": len(kept), "kept_nodes": kv.nodes, "kept_tokens": kv.tokens,
            "next_kv": kv.tokens + children_tokens, "top_share": max(alloc) / max(sum(alloc), 1)}


def replay(records: list[dict], settings: dict[str, ETSConfig | None], embedder,
           rescore=None) -> dict[str, list[dict]]:
    """Per setting label, one measure dict per decision. A setting of None is REBASE at the
    softmax temperature of the first ETS setting (0.2 when there is none). `rescore`: see
    `decisions`."""
    temp = next((c.softmax_temperature for c in settings.values() if c is not None), 0.2)
    embedder = CachedEmbedder(embedder)
    out: dict[str, list[dict]] = {k: [] for k in settings}
    for pid, tree, depth, cands, remaining, width in decisions(records, rescore):
        scores = [c.score for c in cands]
        nxt = tree.at_depth(depth + 1)
        children_tokens = remaining * (float(np.mean([len(n.token_ids) for n in nxt])) if nxt else 0.0)
        frontier = Frontier(depth=depth, candidates=cands, finished=[], remaining=remaining, width=width)
        for label, cfg in settings.items():
            if cfg is None:
                alloc = rebase_allocate(scores, remaining, temp)
            else:
                alloc, _ = ETS(cfg, width, embedder=embedder).select(frontier)
            out[label].append({"problem": pid, "depth": depth, **_measure(cands, alloc, children_tokens)})
    return out


def summarize(out: dict[str, list[dict]], reference: str) -> list[dict]:
    """One row per setting: means over decisions, and the reference's summed kept/next KV over
    the setting's (> 1 = the setting holds less)."""
    ref = out[reference]
    rows = []
    for label, ms in out.items():
        if not ms:
            continue
        mean = {k: float(np.mean([m[k] for m in ms])) for k in ("kept", "kept_nodes", "kept_tokens", "next_kv", "top_share")}
        rows.append({"setting": label, "decisions": len(ms), **mean,
                     "kept_ratio": sum(m["kept_tokens"] for m in ref) / max(sum(m["kept_tokens"] for m in ms), 1),
                     "next_ratio": sum(m["next_kv"] for m in ref) / max(sum(m["next_kv"] for m in ms), 1e-9)})
    return rows


def replay_markdown(rows: list[dict], reference: str) -> str:
    return format_table(rows, [
        ("setting", "setting", "{}"), ("decisions", "decisions", "{}"), ("kept", "kept cand.", "{:.1f}"),
        ("kept_nodes", "kept nodes", "{:.1f}"), ("kept_tokens", "kept KV tok", "{:.0f}"),
        ("kept_ratio", f"{reference} / it (kept KV)", "{:.2f}x"), ("next_kv", "next-depth KV (est.)", "{:.0f}"),
        ("next_ratio", f"{reference} / it (next KV)", "{:.2f}x"), ("top_share", "top share", "{:.2f}")],
        markdown=True)


def grid(width: int, lambda_c=(0.5, 1.0, 2.0, 4.0), lambda_s_scale=(0.0, 1.0, 2.0),
         embedder: str = "minilm") -> dict[str, ETSConfig | None]:
    """REBASE plus ETS over lambda_c x lambda_s (as multiples of the paper's value for the width)."""
    base = ETSConfig.for_width(width, embedder=embedder)
    settings: dict[str, ETSConfig | None] = {"rebase": None}
    for lc in lambda_c:
        for s in lambda_s_scale:
            settings[f"ets lambda_c={lc:g} lambda_s={base.lambda_s * s:g}"] = replace(
                base, lambda_c=lc, lambda_s=base.lambda_s * s)
    return settings
