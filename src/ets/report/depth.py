"""Why a method holds the KV it holds: what the strategy saw and chose at each depth.

From the saved traces (one StepTrace per depth a problem reached), per method and depth d (the
depth of the candidates chosen among; d = 0 is the root's first expansion):

- `problems`: problems that reached depth d with a decision to make;
- `candidates`: mean unfinished nodes at d; `kept`: mean candidates given >= 1 child;
- `top_share`: mean share of the children the single best-funded candidate got (1.0 = all
  width on one node; what REBASE's temperature already concentrates);
- `rebase_kept` (ETS only): mean candidates REBASE's own allocation would have funded, so
  `rebase_kept - kept` is what the program pruned beyond REBASE;
- `clusters` (ETS only): mean semantic clusters among the candidates (coverage term);
- `kv_nodes` / `kv_tokens`: mean distinct nodes and tokens of the tree's live KV after the
  depth's children were generated (SPEC 3).

Depths past `max_depth` are pooled into one row "max_depth+".
"""

from __future__ import annotations

from ets.report.table import format_table


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def per_depth(records: list[dict], max_depth: int = 10) -> list[dict]:
    """Rows by depth over the problems' traces (see the module docstring)."""
    by: dict[int, list[dict]] = {}
    for r in records:
        for t in r.get("trace", []):
            by.setdefault(min(int(t["depth"]), max_depth), []).append(t)
    rows = []
    for d in sorted(by):
        ts = by[d]
        shares = [max(t["alloc"]) / sum(t["alloc"]) for t in ts if t.get("alloc") and sum(t["alloc"]) > 0]
        infos = [t.get("info") or {} for t in ts]
        rows.append({
            "depth": f"{d}+" if d == max_depth else str(d), "problems": len(ts),
            "candidates": _mean([t["candidates"] for t in ts]), "kept": _mean([t["kept"] for t in ts]),
            "top_share": _mean(shares),
            "rebase_kept": _mean([sum(1 for a in i["rebase_alloc"] if a > 0) for i in infos if "rebase_alloc" in i]),
            "clusters": _mean([i.get("num_clusters") for i in infos if "num_clusters" in i]),
            "kv_nodes": _mean([t.get("kv_nodes") for t in ts]), "kv_tokens": _mean([t.get("kv_tokens") for t in ts]),
        })
    return rows


def depth_markdown(label: str, rows: list[dict]) -> str:
    return f"**{label}**\n\n" + format_table(rows, [
        ("depth", "depth", "{}"), ("problems", "problems", "{}"), ("candidates", "candidates", "{:.1f}"),
        ("kept", "kept", "{:.1f}"), ("rebase_kept", "REBASE would keep", "{:.1f}"),
        ("top_share", "top share", "{:.2f}"), ("clusters", "clusters", "{:.1f}"), ("kv_nodes", "KV nodes", "{:.1f}"),
        ("kv_tokens", "KV tokens", "{:.0f}")], markdown=True)


def runs_depth_markdown(runs: list[tuple[str, list[dict]]], max_depth: int = 10) -> str:
    """The per-depth tables of several methods (label, their problem records), one after another."""
    parts = ["## Per depth", "",
             "What each strategy saw and chose at each depth (means over problems; see ets.report.depth)."]
    for label, recs in runs:
        parts += ["", depth_markdown(label, per_depth(recs, max_depth))]
    return "\n".join(parts)
