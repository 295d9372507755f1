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

Compute accounting (tokens, FLOPs, latency per problem and per run): `problem_compute`,
`compute_of` (which also reads records made before it) and `compute_summary`; see the block
comment above them.
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


# -- compute accounting (issue 40 item 2) -------------------------------------------------------
#
# Per problem (record["compute"], written by ets.runner.problem_record; `compute_of` derives what
# it can for records made before it):
#   generated_tokens  tokens the policy generated (= the tree's non-root node token counts)
#   prompt_tokens     tokens the policy was given to continue: for every node it expanded, the
#                     prompt plus the steps to that node (once per node; its n samples share it),
#                     from the tree. What an engine without a prefix cache prefills.
#   prefilled_tokens  prompt tokens the engine itself says it computed for this problem: a
#                     server's prefix-cache queries less hits over the problem's expands, kept only
#                     where the server had no other problem of this client at every depth (else
#                     they are server-wide); None elsewhere (embedded and mock engines).
#   prm_tokens        input tokens the PRM read for this problem's paths (charged by the PRM as it
#                     scores: ets.prm.base.charge; cache hits cost none); None where the PRM does not
#                     count them.
#   wall_s            the problem's search wall time (its counters' wall_s).
#   policy_params, prm_params   parameter counts (a model's own, its folder's, or --policy-params /
#                     --prm-params); None where unknown.
#   policy_flops      2 x policy_params x (generated_tokens + prompt_tokens): a forward is 2 FLOPs
#                     per parameter per token; the prompt counted as a cache-less engine reads it
#                     (an upper bound where a prefix cache serves part of it).
#   prm_flops         2 x prm_params x prm_tokens.   flops: their sum; None where either is None.


def parse_count(text: str) -> float:
    """A parameter count as given on the command line: 135e6, 0.5e9, 7000000000, 1.5B, 135M."""
    t = str(text).strip().replace("_", "").replace(",", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(t[-1:].lower())
    try:
        value = float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise ValueError(f"not a parameter count: {text!r} (e.g. 0.5e9, 135M, 7B)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a parameter count must be a finite number >= 0, got {text!r}")
    return value


def folder_params(path) -> int | None:
    """Parameters of the model in a local folder: the shapes in its *.safetensors headers (read
    without loading the weights), else the decoder-only transformer counted from config.json
    (embeddings, attention with its key/value heads, gated MLP, norms); None when neither
    tells."""
    import json
    import struct
    from pathlib import Path

    p = Path(str(path))
    if not p.is_dir():
        return None
    total = 0
    for f in sorted(p.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for k, v in header.items():
            if k != "__metadata__" and isinstance(v, dict):
                total += math.prod(v.get("shape") or [1])
    if total:
        return total
    try:
        c = json.loads((p / "config.json").read_text())
        c = c.get("text_config", c)
        if any(k in c for k in ("num_experts", "num_local_experts", "n_routed_experts")):
            return None  # mixture of experts: not this count
        h, layers, inter, vocab = (int(c[k]) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                         "vocab_size"))
        heads = int(c.get("num_attention_heads"))
        kv = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or h // heads)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * h * inter  # gate, up, down
    embed = vocab * h * (1 if c.get("tie_word_embeddings", True) else 2)
    return embed + layers * (attn + mlp + 2 * h) + h


def model_params(obj) -> float | None:
    """Parameters of a policy's or PRM's model, where known without guessing: a count declared
    for it (`declare_params`: --policy-params / --prm-params), else the sum of its in-process
    model's parameters (`.model`, a torch module), else its served model's local folder
    (`folder_params` of a server's reported root, or of the model name when that is a local
    path); None otherwise."""
    declared = getattr(obj, "_ets_params", None)
    if declared is not None:
        return declared
    model = getattr(obj, "model", None)
    if hasattr(model, "parameters"):
        try:
            return sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001  (a measure must not lose a run)
            return None
    for s in getattr(obj, "servers", None) or []:
        for where in (getattr(s, "root", None), getattr(obj, "model", None) or getattr(s, "model", None)):
            n = folder_params(where) if isinstance(where, str) and where else None
            if n:
                return n
    return folder_params(model) if isinstance(model, str) and model else None


def declare_params(obj, n: float | None) -> None:
    """Record that `obj` (a policy or PRM) has n parameters (None: leave it to model_params)."""
    if n is not None:
        try:
            obj._ets_params = n
        except AttributeError:
            pass


def _flops(params, tokens):
    return None if params is None or tokens is None else 2 * params * tokens


def prompt_tokens(tree: dict) -> int:
    """Sum over the saved tree's expanded nodes (those with children) of prompt + path tokens."""
    nodes = tree.get("nodes") or []
    if not nodes:
        return 0
    parents = {n["parent"] for n in nodes if n.get("parent") is not None}
    prompt = len(nodes[0].get("token_ids") or [])
    return sum(prompt + (n.get("cum_tokens") or 0) for n in nodes if n["id"] in parents)


def measured_prefill(trace: list[dict]) -> int | None:
    """A server's prefix-cache queries less hits over one problem's expands, where it had only
    this problem at every depth; None otherwise (see the block comment above)."""
    engines = [t.get("engine") or {} for t in trace]
    if not engines or not all(isinstance(e.get("prefix_queries"), (int, float)) and isinstance(
            e.get("prefix_hits"), (int, float)) and e.get("problems_on_server") == 1 for e in engines):
        return None
    return int(sum(e["prefix_queries"] - e["prefix_hits"] for e in engines))


def problem_compute(tree: dict, counters: dict, trace: list[dict], prm_tokens=None, policy_params=None,
                    prm_params=None) -> dict:
    """One problem's compute figures (the block comment above) from its saved tree and trace."""
    gen = int(counters.get("generated_tokens", 0))
    prompt = prompt_tokens(tree)
    pol = _flops(policy_params, gen + prompt)
    prm = _flops(prm_params, prm_tokens)
    return {"generated_tokens": gen, "prompt_tokens": prompt, "prefilled_tokens": measured_prefill(trace),
            "prm_tokens": prm_tokens, "wall_s": counters.get("wall_s"),
            "policy_params": policy_params, "prm_params": prm_params,
            "policy_flops": pol, "prm_flops": prm, "flops": None if pol is None or prm is None else pol + prm}


def compute_of(record: dict, params: dict | None = None) -> dict:
    """record["compute"], or for a record made before it, what its tree, trace and counters
    give (PRM tokens and parameters then None). params: {"policy": N, "prm": N} given now
    (--policy-params / --prm-params), replacing the record's where not None; FLOPs follow."""
    c = dict(record.get("compute") or problem_compute(record.get("tree") or {}, record.get("counters") or {},
                                                      record.get("trace") or []))
    params = params or {}
    pp = params.get("policy") if params.get("policy") is not None else c.get("policy_params")
    qp = params.get("prm") if params.get("prm") is not None else c.get("prm_params")
    c["policy_params"], c["prm_params"] = pp, qp
    gen, prompt = c.get("generated_tokens"), c.get("prompt_tokens")
    c["policy_flops"] = _flops(pp, None if gen is None or prompt is None else gen + prompt)
    c["prm_flops"] = _flops(qp, c.get("prm_tokens"))
    c["flops"] = None if c["policy_flops"] is None or c["prm_flops"] is None else c["policy_flops"] + c["prm_flops"]
    return c


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of values, linear between the closest ranks (numpy's
    default); None for no values."""
    v = sorted(values)
    if not v:
        return None
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def compute_summary(records: list[dict], params: dict | None = None) -> dict:
    """Run-level compute figures over `records` (summary.json and each results.json row): for
    each per-problem figure its total and its mean per problem (`<key>`, `<key>_mean`), None
    unless every problem has it (never part-filled); parameters where every problem agrees;
    latency_p50/p90/p99 and latency_mean: percentiles of the per-problem wall_s."""
    per = [compute_of(r, params) for r in records]
    n = len(per)
    out: dict = {}
    for k in ("prompt_tokens", "prefilled_tokens", "prm_tokens", "policy_flops", "prm_flops", "flops"):
        vals = [c.get(k) for c in per]
        known = n > 0 and all(v is not None for v in vals)
        out[k] = sum(vals) if known else None
        out[f"{k}_mean"] = sum(vals) / n if known else None
    for k in ("policy_params", "prm_params"):
        vals = {c.get(k) for c in per}
        out[k] = vals.pop() if len(vals) == 1 else None
    walls = [c["wall_s"] for c in per if isinstance(c.get("wall_s"), (int, float))]
    out.update({f"latency_p{q}": percentile(walls, q) for q in (50, 90, 99)})
    out["latency_mean"] = sum(walls) / len(walls) if walls else None
    return out
