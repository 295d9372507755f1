"""What the engine and the PRM measured, per problem and per run.

Two sources, with different exactness:

- `Policy.stats()` / `RewardModel.stats()` are process-wide counters. `counter_delta` of two
  snapshots taken around one `run_jobs` call gives that call's (session's or chunk's) own
  counts, exactly: prefill/decode tokens, waves, requests, retries, prefix-cache hits and
  queries. With several problems in flight these counts cannot be split per problem (the
  problems share batches and server counters), so they are recorded per session only.
- `Policy.observe(root)` is stored per depth in a problem's trace (`engine`); `trace_measures`
  reduces it to that problem's figures: measured KV mean/peak (embedded engine: tokens its KV
  store holds for this problem; server: KV tokens held by all running requests, sampled from
  /metrics, so server-wide) and the prefix-cache hits/queries seen during its expands (server
  counter deltas: with several problems in flight they include the others' requests).

`run_measures` combines both into the figures written to summary.json.
"""

from __future__ import annotations

import math

# stats() keys that are not counters (levels, running maxima, ratios): no delta is taken
_NOT_COUNTERS = ("peak", "max_", "now", "capacity", "rate", "mean")


def snapshot(obj) -> dict:
    """obj.stats() as a dict; {} when it has none or it fails (a measure must not lose a run)."""
    fn = getattr(obj, "stats", None)
    try:
        return dict(fn()) if fn else {}
    except Exception:  # noqa: BLE001
        return {}


def counter_delta(after: dict, before: dict) -> dict:
    """Per-key difference of the numeric counters of two snapshots (levels and maxima left out)."""
    out = {}
    for k, v in after.items():
        if any(m in k for m in _NOT_COUNTERS) or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        b = before.get(k) or 0
        if isinstance(b, (int, float)):
            out[k] = v - b
    return out


def add_counters(total: dict, delta: dict) -> dict:
    """total += delta, key by key (in place; returns total)."""
    for k, v in (delta or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v
    return total


def measured_kv(engine: dict):
    """The engine's own KV figure for one depth: `kv_tokens_peak` (server, sampled while the
    expand ran) else `kv_tokens` (embedded engine: held for the problem); None if neither."""
    for key in ("kv_tokens_peak", "kv_tokens"):
        v = engine.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    return None


def trace_measures(trace: list[dict]) -> dict:
    """One problem's engine figures from its trace's per-depth `engine` dicts (see module doc)."""
    engines = [t.get("engine") or {} for t in trace]
    kv = [v for v in map(measured_kv, engines) if v is not None]
    hits = [e["prefix_hits"] for e in engines if isinstance(e.get("prefix_hits"), (int, float))]
    queries = [e["prefix_queries"] for e in engines if isinstance(e.get("prefix_queries"), (int, float))]
    out = {"measured_kv_mean": sum(kv) / len(kv) if kv else None, "measured_kv_peak": max(kv) if kv else None}
    if queries:
        out.update(prefix_hits=sum(hits), prefix_queries=sum(queries),
                   prefix_hit_rate=sum(hits) / sum(queries) if sum(queries) else None)
    return out


def run_measures(records: list[dict], sessions: list[dict]) -> dict:
    """Run-level engine/PRM figures for summary.json.

    From the sessions' stats deltas (exact): `engine` and `prm` (summed counters),
    `prefix_cache_hits`, `prefix_cache_queries`, `prefix_cache_hit_rate` (servers), `requests`,
    `retries`, `prefill_tokens`, `decode_tokens`, `waves` (embedded engine); None where no
    session reported them. From the problems' traces: `measured_kv_mean` (mean over problems of
    each one's mean over depths) and `measured_kv_peak` (largest of any depth)."""
    engine: dict = {}
    prm: dict = {}
    for s in sessions:
        add_counters(engine, s.get("engine"))
        add_counters(prm, s.get("prm"))
    per = [r.get("engine") or trace_measures(r.get("trace", [])) for r in records]
    means = [m["measured_kv_mean"] for m in per if m.get("measured_kv_mean") is not None]
    peaks = [m["measured_kv_peak"] for m in per if m.get("measured_kv_peak") is not None]
    hits, queries = engine.get("server_prefix_hits"), engine.get("server_prefix_queries")
    out = {
        "measured_kv_mean": sum(means) / len(means) if means else None,
        "measured_kv_peak": max(peaks) if peaks else None,
        "prefix_cache_hits": hits if queries else None,
        "prefix_cache_queries": queries if queries else None,
        "prefix_cache_hit_rate": hits / queries if queries else None,
        **{k: engine.get(k) for k in ("requests", "retries", "prefill_tokens", "decode_tokens", "waves")},
        "engine": engine, "prm_stats": prm,
    }
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
