"""The experiment's record: one row per config (method x width [x dataset]), the ETS/REBASE
ratios, and results.md / results.json (plots: ets.report.plots.record_plots).

Row columns (n = problems every config finished, the same problems in every row):
  accuracy, acc_lo/acc_hi     fraction right, 95% Wilson score interval
  paired_diff, paired_lo/hi   accuracy minus REBASE's at the same width on the same problems,
                              with Newcombe's paired interval (`paired_interval`); None for
                              REBASE itself or without a REBASE row
  kv_mean/kv_peak, kv_blocks_*  the tree's KV count (SPEC 3), mean over steps then problems; peak
  meas_kv_mean/meas_kv_peak   the engine's own KV figure per step (ets.measures.measured_kv), over
                              the problems of timed units only (a pooled call's engine held others)
  prefill_tokens              prompt tokens the engine computed (embedded: prefill_tokens; server:
                              prefix-cache queries minus hits)
  prefix_hit_rate             server prefix-cache hits / queries over the timed chunks
  preemptions                 server: sequences it evicted for want of KV blocks (timed chunks)
  server_running/waiting      server: mean sequences running / queued while requests were out
  problems_per_s, tokens_per_s  problems and generated tokens per second of wall clock over the
                              timed chunks (`timed_chunks`), with `in_flight` problems at once;
                              `timed_problems` of them (the table's "timed on": problems (chunks)).
                              Each row's own chunks: compare two rows' columns only where they
                              were timed on the same chunks; the ETS/REBASE ratio uses those alone
  select_ms_per_step          strategy decision time per selection step (depth >= 1)
  waves                       embedded engine: iterations at which rows joined the batch (timed chunks)
  prompt_tokens[_mean], prefilled_tokens[_mean], prm_tokens[_mean], policy_flops[_mean],
  prm_flops[_mean], flops[_mean], policy_params, prm_params, latency_p50/p90/p99/mean
                              compute over the n problems (ets.measures.compute_summary: totals
                              and per problem, None unless every problem knows it)
  best_of_n_curve             the widest best_of_n row: accuracy at n = 1, 2, ..., W subsampled
                              from its own trees (ets.report.subsample)
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from ets.measures import add_counters, trace_measures
from ets.report.table import cell as _f
from ets.runs import summarize

LEGACY_CHUNK_LOG = "bench_chunks.jsonl"  # written by benchmarks/bench_record.py before ets.experiment


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes out of n ((0, 1) when n == 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def paired_interval(x: list[bool], y: list[bool], z: float = 1.96) -> tuple[float, float, float]:
    """(difference, lo, hi) of accuracy x minus accuracy y on the SAME problems (x[i], y[i] =
    problem i right under each method), 95%.

    Newcombe's hybrid score interval for paired proportions (Stat. Med. 17:2635, 1998, method
    10): Wilson intervals of both accuracies, combined with the phi correlation of the 2x2
    table (a both right, b only x, c only y, d neither). Unlike the Wald interval of the
    per-problem differences (mean +- 1.96 sd / sqrt(n)), it does not collapse to zero width when
    no problem is discordant and it stays inside [-1, 1]."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"paired samples differ in length: {n} != {len(y)}")
    if n == 0:
        return 0.0, -1.0, 1.0
    a = sum(1 for u, v in zip(x, y) if u and v)
    b = sum(1 for u, v in zip(x, y) if u and not v)
    c = sum(1 for u, v in zip(x, y) if v and not u)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(den) if den else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return diff, max(-1.0, diff - delta), min(1.0, diff + eps)


def timed_chunks(run, ids: set) -> list[dict]:
    """The timed units of `run` whose problems are all among `ids`, each {"ids", "failed",
    "wall_s", "in_flight", "generated_tokens", "engine"}: its sessions.jsonl lines that list their
    ids (one per `run_jobs` call: one (chunk, config) of an experiment, or one `ets run`; a call
    that held several runs, as the pooled schedule's, is left out), plus,
    for a run directory made before sessions listed ids, the legacy bench_chunks.jsonl if there
    is one, else its id-less sessions matched to problems by finishing time (one session covers
    the next `computed` problems)."""
    sessions = run.sessions()
    out = [{"ids": s["ids"], "failed": [], "wall_s": s["wall_s"], "generated_tokens": s.get("generated_tokens", 0),
            "in_flight": min(s.get("concurrency", 1), len(s["ids"]) + s.get("failed", 0)),
            "engine": s.get("engine") or {}} for s in sessions
           if s.get("ids") and s.get("interleaved_runs", 1) == 1]  # a pooled call times no single run
    legacy = run.path / LEGACY_CHUNK_LOG
    if legacy.exists():
        out += [json.loads(line) for line in legacy.read_text().splitlines() if line.strip()]
    else:
        covered = {i for c in out for i in c["ids"]}
        done = sorted((r for r in run.iter_problems() if r["id"] not in covered), key=lambda r: r["finished_at"])
        i = 0
        for s in sessions:
            k = s.get("computed", 0)
            if "ids" in s or not k:
                continue
            chunk = [r["id"] for r in done[i:i + k]]
            i += k
            if chunk:
                out.append({"ids": chunk, "failed": [], "wall_s": s["wall_s"], "generated_tokens":
                            s.get("generated_tokens", 0), "in_flight": min(s.get("concurrency", 1), k), "engine": {}})
    return [c for c in out if c["ids"] and set(c["ids"]) <= ids]


def common_ids(arms) -> list[str]:
    """Problems (in order) that every arm has finished: the record compares those only. Arms of
    different datasets: each dataset's common problems, concatenated."""
    out = []
    for a in arms:
        for p in a.problems:
            if p.id not in out and all(b.run.is_done(p.id) for b in arms if b.problems is a.problems):
                out.append(p.id)
    return out


def rows(arms, ids: list[str] | None = None, params: dict | None = None) -> list[dict]:
    """One row per arm (ets.experiment.Arm) on the problems `ids` (default `common_ids`). Each
    row is paired with REBASE at its width under its own PRM (`paired_*`); where the arms compare
    several PRMs, each row under a later PRM is also paired with the same method and width under
    the first PRM (`prm_*`). params: {"policy": N, "prm": N} parameter counts given now
    (--policy-params / --prm-params), replacing the records' for the FLOPs columns."""
    ids = common_ids(arms) if ids is None else ids
    out = [_row(a, ids, params) for a in arms]
    _best_of_n_curves(arms, out)
    first_prm = getattr(arms[0], "prm", "") if arms else ""
    for r, a in zip(out, arms):
        base = next((b for b, ba in zip(out, arms) if b["strategy"] == "rebase" and b["width"] == r["width"]
                     and ba.problems is a.problems and b["prm"] == r["prm"]), None)
        if base is not None and base is not r:
            diff, lo, hi, n, only_this, only_base = _paired(r, base)
            r.update(paired_diff=diff, paired_lo=lo, paired_hi=hi, paired_n=n,
                     paired_only_this=only_this, paired_only_rebase=only_base)
        if not r["prm"] or r["prm"] == first_prm:  # one PRM only, or this row is under the first
            continue
        same = next((b for b, ba in zip(out, arms) if b["method"] == r["method"] and b["width"] == r["width"]
                     and ba.problems is a.problems and b["prm"] == first_prm), None)
        if same is not None:
            diff, lo, hi, n, only_this, only_base = _paired(r, same)
            r.update(prm_base=first_prm, prm_diff=diff, prm_lo=lo, prm_hi=hi, prm_n=n,
                     prm_only_this=only_this, prm_only_base=only_base)
    return out


def _paired(r: dict, base: dict) -> tuple:
    """(difference, lo, hi, n, right only in r, right only in base): r's accuracy less base's on
    the problems both finished, with the paired interval."""
    mine = {p["id"]: p["correct"] for p in r["per_problem"]}
    theirs = {p["id"]: p["correct"] for p in base["per_problem"]}
    both = [i for i in mine if i in theirs]
    diff, lo, hi = paired_interval([mine[i] for i in both], [theirs[i] for i in both])
    return (diff, lo, hi, len(both), sum(mine[i] and not theirs[i] for i in both),
            sum(theirs[i] and not mine[i] for i in both))


def _best_of_n_curves(arms, out: list[dict]) -> None:
    """The widest best_of_n row of each (dataset, PRM) gets `best_of_n_curve`: accuracy at n = 1,
    2, 4, ..., W subsampled from its W-sample trees (ets.report.subsample), under its run's
    aggregation; `best_of_n_vote` the curve drawn (majority where the run votes so, else
    weighted). n samples cost n/W of the row's tokens."""
    from ets.report.subsample import subsampled_accuracy

    widest: dict = {}
    for r, a in zip(out, arms):
        if r["strategy"] == "best_of_n" and r["problems"]:
            key = (r.get("dataset"), r.get("prm"))
            if key not in widest or r["width"] > widest[key][0]["width"]:
                widest[key] = (r, a)
    for r, a in widest.values():
        run = a.run.config().get("run", {})
        wanted = {p["id"] for p in r["per_problem"]}
        recs = [x for x in a.run.iter_problems() if x["id"] in wanted]
        r["best_of_n_curve"] = subsampled_accuracy(recs, agg=run.get("agg", "last"))
        r["best_of_n_vote"] = "majority" if run.get("vote") == "majority" else "weighted"


def _row(arm, ids: list[str], params: dict | None = None) -> dict:
    from ets.measures import compute_of, compute_summary

    wanted = set(ids) & {p.id for p in arm.problems}
    by_id = {r["id"]: r for r in arm.run.iter_problems() if r["id"] in wanted}
    recs = [by_id[i] for i in ids if i in by_id]
    s = summarize(recs, [])
    comp = compute_summary(recs, params)
    n, k = s["problems"], s["correct"]
    lo, hi = wilson(k, n)
    chunks = timed_chunks(arm.run, wanted)
    wall = sum(c["wall_s"] for c in chunks)
    done = sum(len(c["ids"]) - len(c.get("failed", [])) for c in chunks)
    eng: dict = {}
    for c in chunks:
        add_counters(eng, c.get("engine"))
    sel = [t for r in recs for t in r["trace"] if t["depth"] >= 1]
    # The engine's KV figure is the whole engine's (the server's): it is this config's only where
    # its problems had the engine to themselves, i.e. in a timed unit; a pooled call's problems
    # shared it with other configs' problems and more of them in flight, so they are left out.
    timed_ids = {i for c in chunks for i in c["ids"]}
    measured = {r["id"]: (r.get("engine") or trace_measures(r["trace"])) for r in recs if r["id"] in timed_ids}
    means = [m["measured_kv_mean"] for m in measured.values() if m.get("measured_kv_mean") is not None]
    peaks = [m["measured_kv_peak"] for m in measured.values() if m.get("measured_kv_peak") is not None]
    hits, queries = eng.get("server_prefix_hits"), eng.get("server_prefix_queries")
    load_n = eng.get("server_load_samples")
    errors = [e for e in arm.run.errors() if e["id"] in {p.id for p in arm.problems}]
    return {
        "method": arm.method.label, "strategy": arm.method.strategy, "width": arm.width,
        "dataset": arm.dataset or None, "prm": getattr(arm, "prm", "") or None, "params": arm.method.params,
        "run_dir": str(arm.run.path),
        "problems": n, "failed": len(errors), "correct": k, "accuracy": s["accuracy"], "acc_lo": lo, "acc_hi": hi,
        "paired_diff": None, "paired_lo": None, "paired_hi": None,
        "kv_mean": s["kv_mean"], "kv_peak": s["kv_peak"], "kv_peak_mean": s["kv_peak_mean"],
        "kv_blocks_mean": s["kv_blocks_mean"], "kv_blocks_peak": s["kv_blocks_peak"],
        "meas_kv_mean": sum(means) / len(means) if means else None, "meas_kv_peak": max(peaks) if peaks else None,
        "meas_kv_problems": len(means),
        "generated_tokens": s["generated_tokens"],
        "generated_tokens_mean": s["generated_tokens"] / n if n else None, **comp, "wall_s": wall,
        "problems_per_s": done / wall if wall else None,
        "tokens_per_s": sum(c["generated_tokens"] for c in chunks) / wall if wall else None,
        "in_flight": max((c.get("in_flight", 1) for c in chunks), default=None),
        "select_ms_per_step": 1000 * sum(t["select_s"] for t in sel) / len(sel) if sel else 0.0,
        "steps_per_problem": len(sel) / n if n else 0.0, "embedder": s.get("embedder"),
        "throughput_from": f"{len(chunks)} timed chunks",
        "timed_problems": sum(len(c["ids"]) for c in chunks),
        "engine_counters": {k2: v for k2, v in eng.items() if not isinstance(v, float) or math.isfinite(v)},
        "waves": eng.get("waves"),
        "prefill_tokens": eng.get("prefill_tokens", eng.get("prefilled_tokens")),
        "server_prefix_hits": hits, "server_prefix_queries": queries,
        "prefix_hit_rate": hits / queries if queries else None,
        "preemptions": eng.get("server_preemptions"),
        "server_running": eng["server_running_sum"] / load_n if load_n else None,
        "server_waiting": eng["server_waiting_sum"] / load_n if load_n else None,
        "timed": [{"ids": sorted(c["ids"]), "wall_s": c["wall_s"], "generated_tokens": c["generated_tokens"],
                   "done": len(c["ids"]) - len(c.get("failed", [])),
                   "meas_kv": [measured[i]["measured_kv_mean"] for i in sorted(c["ids"])
                               if measured.get(i, {}).get("measured_kv_mean") is not None]} for c in chunks],
        "per_problem": [{"id": r["id"], "correct": r["correct"], "kv_mean": r["kv"]["kv_mean"],
                         "kv_peak": r["kv"]["kv_peak"], "generated_tokens": r["counters"]["generated_tokens"],
                         "wall_s": r["counters"].get("wall_s"), "steps": len(r["trace"]),
                         **{k: c[k] for k in ("prompt_tokens", "prefilled_tokens", "prm_tokens", "flops")}}
                        for r, c in ((r, compute_of(r, params)) for r in recs)],
    }


def same_chunks(mine: list[dict], base: list[dict]) -> list[tuple[dict, dict]]:
    """(mine's chunk, base's chunk) for each timed chunk of `mine` that `base` timed on exactly
    the same problems (the same chunk of an experiment)."""
    theirs = {tuple(c["ids"]): c for c in base}
    return [(c, theirs[tuple(c["ids"])]) for c in mine if tuple(c["ids"]) in theirs]


def paired_throughput(mine: list[dict], base: list[dict]) -> tuple[float | None, float | None, int, int]:
    """(tok/s ratio, problems/s ratio, chunks, problems) of `mine` over `base`, timed on the same
    problem sets only: a timed chunk counts when the other run has a chunk of exactly the same
    problems (the same chunk of an experiment), so that neither side's figure comes from other
    problems, another number in flight or another session's machine load."""
    pairs = same_chunks(mine, base)
    if not pairs:
        return None, None, 0, 0
    wall_m, wall_b = sum(a["wall_s"] for a, _ in pairs), sum(b["wall_s"] for _, b in pairs)
    if not wall_m or not wall_b:
        return None, None, len(pairs), 0
    tok = (sum(a["generated_tokens"] for a, _ in pairs) / wall_m) / max(sum(b["generated_tokens"] for _, b in pairs) / wall_b, 1e-12)
    done_b = sum(b["done"] for _, b in pairs)
    prob = (sum(a["done"] for a, _ in pairs) / wall_m) / (done_b / wall_b) if done_b else None
    return tok, prob, len(pairs), sum(len(a["ids"]) for a, _ in pairs)


def paired_measured_kv(mine: list[dict], base: list[dict]) -> float | None:
    """base's mean measured KV over mine's, on the chunks both timed on the same problems (as
    `paired_throughput`): the engine's figure depends on what else it held, so only chunks of the
    same problems with the same number in flight compare."""
    pairs = same_chunks(mine, base)
    a = [v for c, _ in pairs for v in c.get("meas_kv", [])]
    b = [v for _, c in pairs for v in c.get("meas_kv", [])]
    return (sum(b) / len(b)) / (sum(a) / len(a)) if a and b and sum(a) else None


def ratios(rows_: list[dict]) -> list[dict]:
    """Every ETS variant against REBASE at the same width (and dataset). Throughput ratios come
    from the chunks both timed on the same problems (`paired_throughput`)."""
    def div(a, b):
        return a / b if a is not None and b else None

    out = []
    for r in rows_:
        base = next((b for b in rows_ if b["strategy"] == "rebase" and b["width"] == r["width"]
                     and b.get("dataset") == r.get("dataset") and b.get("prm") == r.get("prm")), None)
        if r["strategy"] != "ets" or base is None:
            continue
        tok, prob, n_chunks, n_timed = paired_throughput(r.get("timed", []), base.get("timed", []))
        out.append({
            "ets": r["method"], "width": r["width"], "dataset": r.get("dataset"), "prm": r.get("prm"),
            "kv_reduction": div(base["kv_mean"], r["kv_mean"]),
            "kv_peak_reduction": div(base["kv_peak"], r["kv_peak"]),
            "meas_kv_reduction": paired_measured_kv(r.get("timed", []), base.get("timed", [])),
            "throughput_ratio": tok, "problems_per_s_ratio": prob,
            "timed_chunks": n_chunks, "timed_problems": n_timed,
            "acc_diff_points": 100 * (r["accuracy"] - base["accuracy"]),
            "paired": [r["paired_diff"], r["paired_lo"], r["paired_hi"]],
            "ets_acc": [r["accuracy"], r["acc_lo"], r["acc_hi"]],
            "rebase_acc": [base["accuracy"], base["acc_lo"], base["acc_hi"]],
            "n": min(r["problems"], base["problems"]),
        })
    return out


def table(rows_: list[dict]) -> str:
    """The markdown table; engine columns (measured KV, prefill, hit rate, waves) only where some
    row has them."""
    has = {k: any(r.get(k) is not None for r in rows_)
           for k in ("meas_kv_mean", "prefill_tokens", "prefix_hit_rate", "paired_diff", "dataset",
                     "server_running", "prm", "prm_diff", "prompt_tokens_mean", "prefilled_tokens_mean",
                     "prm_tokens_mean", "policy_flops_mean", "flops_mean", "latency_p50")}
    has_waves = any(r.get("waves") for r in rows_)
    base_prm = next((r["prm_base"] for r in rows_ if r.get("prm_diff") is not None), None)
    head = ["method", "W"] + (["data"] if has["dataset"] else []) + (["PRM"] if has["prm"] else [])
    head += ["n", "acc [95% CI]"]
    head += ["vs REBASE [95% CI]"] if has["paired_diff"] else []
    head += [f"vs PRM {base_prm} [95% CI]"] if has["prm_diff"] else []
    head += ["KV mean", "KV peak", "blocks mean", "blocks peak"]
    head += ["meas KV mean", "meas KV peak"] if has["meas_kv_mean"] else []
    head += ["prefill tok"] if has["prefill_tokens"] else []
    head += ["prefix hit"] if has["prefix_hit_rate"] else []
    head += ["running / waiting", "preempted"] if has["server_running"] else []
    head += ["gen tok/prob"]
    # compute columns (ets.measures.compute_summary): each only where some row knows it
    compute_cols = [(k, h, f) for k, h, f in COMPUTE_COLUMNS if has[k]]
    head += [h for _, h, _ in compute_cols]
    head += ["prob/s", "tok/s", "timed on", "in flight", "sel ms/step"] + (["waves"] if has_waves else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows_:
        cells = [r["method"], str(r["width"])] + ([r.get("dataset") or "-"] if has["dataset"] else [])
        cells += [r.get("prm") or "-"] if has["prm"] else []
        cells += [str(r["problems"]), f"{r['accuracy']:.3f} [{r['acc_lo']:.2f}, {r['acc_hi']:.2f}]"]
        for k in ("paired", "prm"):
            if has[f"{k}_diff"]:
                cells.append("-" if r.get(f"{k}_diff") is None else
                             f"{100 * r[f'{k}_diff']:+.1f} [{100 * r[f'{k}_lo']:+.0f}, {100 * r[f'{k}_hi']:+.0f}]")
        cells += [_f(r["kv_mean"], "{:.0f}"), _f(r["kv_peak"], "{}"), _f(r["kv_blocks_mean"], "{:.1f}"),
                  _f(r["kv_blocks_peak"], "{}")]
        if has["meas_kv_mean"]:
            cells += [_f(r["meas_kv_mean"], "{:.0f}"), _f(r["meas_kv_peak"], "{:.0f}")]
        if has["prefill_tokens"]:
            cells.append(_f(r.get("prefill_tokens"), "{:.0f}"))
        if has["prefix_hit_rate"]:
            cells.append(_f(r.get("prefix_hit_rate"), "{:.3f}"))
        if has["server_running"]:
            cells += ["-" if r.get("server_running") is None else
                      f"{r['server_running']:.0f} / {r.get('server_waiting') or 0:.0f}", _f(r.get("preemptions"), "{}")]
        cells += [_f(r["generated_tokens"] / r["problems"] if r["problems"] else None, "{:.0f}")]
        for k, _, fmt in compute_cols:
            cells.append(_latency(r) if k == "latency_p50" else _f(r.get(k), fmt))
        cells += [_f(r["problems_per_s"], "{:.4f}"), _f(r["tokens_per_s"], "{:.1f}"), _timed_on(r), _f(r["in_flight"], "{}"),
                  _f(r["select_ms_per_step"], "{:.1f}")]
        if has_waves:
            cells.append(_f(r.get("waves"), "{}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# (row key, header, format) of the compute columns, in table order
COMPUTE_COLUMNS = [("prompt_tokens_mean", "prompt tok/prob", "{:.0f}"),
                   ("prefilled_tokens_mean", "meas prefill tok/prob", "{:.0f}"),
                   ("prm_tokens_mean", "PRM tok/prob", "{:.0f}"),
                   ("policy_flops_mean", "policy FLOPs/prob", "{:.3g}"),
                   ("flops_mean", "FLOPs/prob", "{:.3g}"),
                   ("latency_p50", "latency p50 / p90 s", "")]


def _latency(r: dict) -> str:
    if r.get("latency_p50") is None:
        return "-"
    return f"{r['latency_p50']:.3g} / {r['latency_p90']:.3g}"


def compute_markdown(rows_: list[dict]) -> str:
    """results.md's compute section: what the columns count, and the best-of-n curve of each
    best_of_n row that has one (ets.report.subsample)."""
    from ets.report.subsample import subsample_markdown

    lines = ["## Compute", "",
             "Per problem: gen tok = tokens the policy generated; prompt tok = the prompt plus the path of "
             "every node it expanded (what an engine without a prefix cache prefills); meas prefill = the "
             "prompt tokens the server says it computed, where it held no other problem; PRM tok = input "
             "tokens the PRM read (where it counts them); FLOPs = 2 x parameters x tokens (policy: gen + "
             "prompt tok; PRM: PRM tok), shown where the parameter counts are known (model config, "
             "--policy-params, --prm-params); latency = percentiles of the problems' search wall time. "
             "Latency p99: " + ", ".join(f"{r['method']} W={r['width']} {_f(r.get('latency_p99'), '{:.3g}')} s"
                                         for r in rows_) + "."]
    for r in rows_:
        if r.get("best_of_n_curve"):
            lines += ["", f"### {r['method']} W={r['width']}" + _suffix(r) + ": best-of-n from one run",
                      "", subsample_markdown(r["best_of_n_curve"]),
                      "", f"(n samples cost about n/{r['width']} of its {_f(r.get('generated_tokens_mean'), '{:.0f}')} "
                      "generated tokens per problem)"]
    return "\n".join(lines)


def _suffix(r: dict) -> str:
    return (f" {r['dataset']}" if r.get("dataset") else "") + (f" prm={r['prm']}" if r.get("prm") else "")


def _timed_on(r: dict) -> str:
    """The problems and chunks a row's prob/s and tok/s come from: each row's own timed chunks,
    so two rows' columns compare only where they were timed on the same chunks (the ETS / REBASE
    ratio below uses those alone)."""
    if r.get("timed_problems") is None:
        return "-"
    return f"{r['timed_problems']} ({len(r.get('timed', []))} ch)"


def ratio_lines(rats: list[dict]) -> list[str]:
    """One markdown bullet per ETS/REBASE pair, against the paper's targets (KV >= 1.8x,
    throughput >= 1.4x, accuracy within 1 point)."""
    lines = []
    for q in rats:
        e, b, p = q["ets_acc"], q["rebase_acc"], q["paired"]
        ok_kv = q["kv_reduction"] is not None and q["kv_reduction"] >= 1.8
        ok_tp = q["throughput_ratio"] is not None and q["throughput_ratio"] >= 1.4
        paired = (f" = {100 * p[0]:+.1f} points, paired 95% interval [{100 * p[1]:+.1f}, {100 * p[2]:+.1f}]"
                  if p[0] is not None else f" = {q['acc_diff_points']:+.1f} points")
        lines.append(
            f"- **{q['ets']} vs rebase, W={q['width']}**{' ' + q['dataset'] if q.get('dataset') else ''}"
            f"{', PRM ' + q['prm'] if q.get('prm') else ''} (n={q['n']}): "
            f"KV reduction (tree mean) **{_f(q['kv_reduction'], '{:.2f}')}x** "
            f"[target 1.8x: {'met' if ok_kv else 'missed'}], peak {_f(q['kv_peak_reduction'], '{:.2f}')}x"
            + (f", measured by the engine {_f(q['meas_kv_reduction'], '{:.2f}')}x (on the timed problems below)"
               if q["meas_kv_reduction"] is not None else "")
            + (f"; throughput ratio (tok/s) **{_f(q['throughput_ratio'], '{:.2f}')}x** "
               f"[target 1.4x: {'met' if ok_tp else 'missed'}], problems/s {_f(q['problems_per_s_ratio'], '{:.2f}')}x "
               f"(timed on the same {q.get('timed_problems', 0)} problems, {q.get('timed_chunks', 0)} chunks); "
               if q["throughput_ratio"] is not None else
               "; throughput not timed on the same problems (pooled schedule, or other chunks); ")
            + f"accuracy {100 * e[0]:.1f}% [{100 * e[1]:.0f}, {100 * e[2]:.0f}] vs {100 * b[0]:.1f}% "
            f"[{100 * b[1]:.0f}, {100 * b[2]:.0f}]" + paired)
    return lines


def machine() -> dict:
    """Where it ran: platform, CPUs, CPU model, load average, torch and its device."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["device"] = ("cuda: " + torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"
    except ImportError:
        info["device"] = "cpu (no torch)"
    return info


def write_report(out: Path, rows_: list[dict], meta: dict, extra_md: str = "") -> str:
    """Write out/results.md (header from `meta`, the table, the ratios) and out/results.json
    ({"meta", "rows", "ratios"}); returns the markdown. `meta` keys used: title, command,
    machine, started, wall_s, policy, prm, embedder, dataset, problem_ids, n_requested, settings
    (a dict printed as key value pairs), not_run."""
    from ets.http import redact_obj

    rows_, meta = redact_obj(rows_), redact_obj(meta)  # a URL's credentials never reach the report
    rats = ratios(rows_)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = meta.get("machine", {})
    settings = "; ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}" for k, v in meta.get("settings", {}).items())
    md = [f"# {meta.get('title', 'Comparison')}", "",
          f"- command: `{meta.get('command', '')}`",
          f"- machine: {m.get('cpu_model') or m.get('processor')}, {m.get('cpus')} CPUs, device {m.get('device')}, "
          f"torch {m.get('torch')} ({m.get('torch_threads')} threads), {m.get('platform')}; load average {m.get('load_avg')}",
          f"- started {meta.get('started')}, wall {meta.get('wall_s', 0):.0f} s; policy {meta.get('policy')}, "
          f"PRM {meta.get('prm')}, embedder {meta.get('embedder')}",
          f"- data: {meta.get('dataset')} problems {', '.join(meta.get('problem_ids', []))} "
          f"(n={len(meta.get('problem_ids', []))} of {meta.get('n_requested')} requested)",
          f"- settings: {settings}",
          "", table(rows_), "", "## ETS / REBASE", ""] + (ratio_lines(rats) or ["(no ETS + REBASE pair)"])
    if rows_:
        md += ["", compute_markdown(rows_)]
    if meta.get("not_run"):
        md += ["", f"Not reported (no problem finished): {', '.join(meta['not_run'])}."]
    if extra_md:
        md += ["", extra_md]
    text = "\n".join(md) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows_, "ratios": rats}, indent=1,
                                                 default=str) + "\n")
    return text
