"""Benchmark of record: ETS against REBASE, beam search, DVTS and best-of-N, side by side.

Every method runs on the SAME problems with the same model, engine, PRM and seed, INTERLEAVED in
one process: problem-major (for each problem, every method; with --concurrency C, for each chunk
of C problems, every method runs that chunk with C problems in flight). The method order rotates
from one chunk to the next, so a slow patch of a shared, noisy machine hits every method alike.
The search itself is the library's (ets.runner.run_jobs -> ets.search.search; answers by
ets.answer; grading by ets.tasks); this script only orchestrates, measures and reports.

    # quick pipeline check (mock policy and PRM, seconds)
    python benchmarks/bench_record.py --policy mock --prm mock --problems 20 --widths 8 \
        --out benchmarks/results/mock-check

    # the default model, embedded engine, memory-bound (a fixed KV capacity in tokens)
    python benchmarks/bench_record.py --problems 12 --widths 8 --kv-capacity 3072 \
        --max-tokens 384 --out benchmarks/results/record-embedded

    # vLLM (CPU build): starts a server with a small KV cache (or give --url), C problems in flight
    python benchmarks/bench_record.py --engine vllm --vllm-blocks 128 --concurrency 4 \
        --problems 8 --widths 8 --out benchmarks/results/record-vllm

Methods: a comma list of strategy names (rebase, ets, beam, dvts, best_of_n), each optionally
with strategy parameters after a colon, separated by '/': `ets:node_cost=tokens`,
`ets:kv_budget=1500`, `ets:lambda_c=2/lambda_s=0`. Every ETS variant is compared with REBASE at
the same width.

Writes into --out:
  results.md    the machine, the command, the table, the ETS/REBASE ratios
  results.json  the same figures, per method and width (plus per-problem rows)
  accuracy.png, kv.png, throughput.png, selection.png   one panel per measure

Columns (per method and width; n = problems finished):
  acc [95% CI]      fraction right (weighted majority vote on the last step score, SPEC 4), with
                    its 95% Wilson score interval
  KV mean / peak    the tree's KV count (SPEC 3: tokens of all candidates and their distinct
                    ancestors, prompt included, after each step): mean over steps then over
                    problems; peak = the largest step of any problem
  blocks mean       the same in 16-token blocks
  meas KV mean/peak the engine's own figure from the trace's `engine` field: embedded engine =
                    tokens its KV store actually holds for the problem; vLLM = KV tokens held by
                    the server's running requests, sampled from /metrics (server-wide: with C
                    problems in flight it is their sum)
  prob/s, tok/s     problems and generated tokens per second of wall clock (scoring and
                    selection included), with `in flight` problems at once
  sel ms/step       strategy decision time per selection step (depth >= 1)
  waves             embedded engine only: decode waves (fewer = a smaller tree fit the capacity)

Ratios (ETS variant vs REBASE, same width): KV reduction = REBASE KV mean / ETS KV mean;
throughput ratio = ETS tok/s / REBASE tok/s (and prob/s); accuracy difference in points with
both intervals. Targets (paper): KV reduction >= 1.8x, throughput >= 1.4x, within 1 point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

DEFAULT_METHODS = "rebase,ets,beam,dvts,best_of_n"


# -- small helpers ---------------------------------------------------------------------------

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes out of n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def parse_method(spec: str) -> tuple[str, str, dict]:
    """'ets:node_cost=tokens/kv_budget=800' -> (label, strategy, params)."""
    name, _, rest = spec.partition(":")
    params = {}
    for kv in filter(None, rest.split("/")):
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"method {spec!r}: parameter {kv!r} is not key=value")
        params[k.strip()] = _value(v.strip())
    return spec, name.strip(), params


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["load_avg_start"] = os.getloadavg()
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


def _numeric_delta(after: dict, before: dict) -> dict:
    out = {}
    for k, v in after.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(before.get(k, 0), (int, float)):
            out[k] = v - (before.get(k) or 0)
    return out


def _stats(policy) -> dict:
    fn = getattr(policy, "stats", None)
    try:
        return dict(fn()) if fn else {}
    except Exception:  # noqa: BLE001  (a stats failure must not lose a benchmark)
        return {}


# -- the run ---------------------------------------------------------------------------------

class Bench:
    """Configs (method x width), their run directories, and the interleaved run."""

    def __init__(self, args, method_specs: list[str]):
        from ets.config import RunConfig, SamplingConfig, SearchConfig
        from ets.runs import RunDir
        from ets.tasks import load_dataset

        self.args = args
        self.task, self.problems = load_dataset(args.dataset, args.problems, args.offset)
        self.rc = RunConfig(dataset=args.dataset, policy=args.policy_spec, prm=args.prm,
                            embedder=args.embedder, concurrency=args.concurrency, runs_dir=args.runs_dir)
        sampling = SamplingConfig(max_step_tokens=args.max_step_tokens, step_delimiter=args.step_delimiter)
        self.combos = []  # (label, strategy, width, cfg, run)
        for spec in method_specs:
            label, strategy, params = parse_method(spec)
            if strategy == "ets":
                params.setdefault("embedder", args.embedder)
            for w in args.widths:
                cfg = SearchConfig(strategy=strategy, width=w, max_tokens=args.max_tokens, max_depth=args.max_depth,
                                   kv_block_size=args.kv_block_size, seed=args.seed, sampling=sampling,
                                   strategy_params=params)
                run = RunDir.prepare(args.runs_dir, self.rc.identity(cfg, self.task.to_dict()), self.rc.to_dict())
                self.combos.append({"label": label, "strategy": strategy, "width": w, "params": params,
                                    "cfg": cfg, "run": run, "engine": {}, "wall_s": 0.0})

    async def run(self, policy, prm, log=print) -> None:
        from ets.runner import Job, run_jobs

        C = self.args.concurrency
        chunks = [self.problems[i:i + C] for i in range(0, len(self.problems), C)]
        embedders: dict = {}
        # one-off start-up (grader, embedder) before any clock starts, so the first config is not charged
        self.task.grade("1", "1")
        from ets.cluster import make_embedder

        for combo in self.combos:
            if combo["strategy"] == "ets":
                name = combo["cfg"].strategy_config().embedder
                if name not in embedders:
                    embedders[name] = make_embedder(name)
                    embedders[name].embed(["warm up"])
        t0 = time.perf_counter()
        for ci, chunk in enumerate(chunks):
            order = self.combos[ci % len(self.combos):] + self.combos[:ci % len(self.combos)]
            for combo in order:
                todo = [p for p in chunk if not combo["run"].is_done(p.id)]
                if not todo:
                    continue
                before = _stats(policy)
                t = time.perf_counter()
                outcomes = await run_jobs([[Job(p, combo["cfg"], combo["run"])] for p in todo], self.task,
                                          policy, prm, embedders=embedders, concurrency=C, progress=False)
                wall = time.perf_counter() - t
                delta = _numeric_delta(_stats(policy), before)
                failed = [f for o in outcomes.values() for f in o.failures]
                # one line per (chunk, config): what the report's throughput and engine figures use
                _append_jsonl(combo["run"].path / CHUNK_LOG, {
                    "ids": [p.id for p in todo], "failed": [f.problem_id for f in failed], "wall_s": wall,
                    "in_flight": min(C, len(todo)),
                    "generated_tokens": sum(o.generated for o in outcomes.values()), "engine": delta})
                for f in failed:
                    log(f"  FAILED {f.message}")
            done = sum(len(c) for c in chunks[:ci + 1])
            log(f"[{time.perf_counter() - t0:7.0f} s] {done}/{len(self.problems)} problems x "
                f"{len(self.combos)} configs done")

    # -- figures ---------------------------------------------------------------------------
    def common_ids(self) -> list[str]:
        """Problems (in order) that every config has finished: the report compares those only."""
        return [p.id for p in self.problems if all(c["run"].is_done(p.id) for c in self.combos)]

    def rows(self, ids: list[str] | None = None) -> list[dict]:
        ids = self.common_ids() if ids is None else ids
        out = []
        for combo in self.combos:
            recs = {r["id"]: r for r in combo["run"].iter_problems() if r["id"] in set(ids)}
            recs = [recs[i] for i in ids if i in recs]
            out.append(self._row(combo, recs, ids))
        return out

    def _row(self, combo, recs: list[dict], ids: list[str]) -> dict:
        from ets.runs import summarize

        s = summarize(recs, [])
        n, k = s["problems"], s["correct"]
        lo, hi = wilson(k, n)
        chunks = _chunk_log(combo["run"].path, set(ids))
        wall = sum(c["wall_s"] for c in chunks)
        done = sum(len(c["ids"]) - len(c.get("failed", [])) for c in chunks)
        gen = sum(c["generated_tokens"] for c in chunks)
        eng: dict = {}
        for c in chunks:
            for k2, v in (c.get("engine") or {}).items():
                eng[k2] = eng.get(k2, 0) + v
        s.update({"wall_s": wall, "problems_per_s": done / wall if wall else None,
                  "tokens_per_s": gen / wall if wall else None,
                  "in_flight": max((c.get("in_flight", 1) for c in chunks), default=None)})
        sel_steps = [t for r in recs for t in r["trace"] if t["depth"] >= 1]
        meas_means, meas_peaks = [], []
        for r in recs:
            vals = [_measured(t.get("engine") or {}) for t in r["trace"]]
            vals = [v for v in vals if v is not None]
            if vals:
                meas_means.append(sum(vals) / len(vals))
                meas_peaks.append(max(vals))
        row = {
            "method": combo["label"], "strategy": combo["strategy"], "width": combo["width"],
            "params": combo["params"], "run_dir": str(combo["run"].path),
            "problems": n, "failed": len(combo["run"].errors()), "correct": k, "accuracy": s["accuracy"],
            "acc_lo": lo, "acc_hi": hi,
            "kv_mean": s["kv_mean"], "kv_peak": s["kv_peak"], "kv_peak_mean": s["kv_peak_mean"],
            "kv_blocks_mean": s["kv_blocks_mean"], "kv_blocks_peak": s["kv_blocks_peak"],
            "meas_kv_mean": sum(meas_means) / len(meas_means) if meas_means else None,
            "meas_kv_peak": max(meas_peaks) if meas_peaks else None,
            "generated_tokens": s["generated_tokens"], "wall_s": s["wall_s"],
            "problems_per_s": s["problems_per_s"], "tokens_per_s": s["tokens_per_s"],
            "in_flight": s["in_flight"],
            "select_ms_per_step": 1000 * sum(t["select_s"] for t in sel_steps) / len(sel_steps) if sel_steps else 0.0,
            "steps_per_problem": len(sel_steps) / n if n else 0.0,
            "embedder": s.get("embedder"), "throughput_from": f"{len(chunks)} timed chunks",
            "engine_counters": {k2: v for k2, v in eng.items() if not isinstance(v, float) or math.isfinite(v)},
            "waves": eng.get("waves"), "prefill_tokens": eng.get("prefill_tokens"),
            "server_prefix_hits": eng.get("server_prefix_hits"),
            "server_prefix_queries": eng.get("server_prefix_queries"),
            "per_problem": [{"id": r["id"], "correct": r["correct"], "kv_mean": r["kv"]["kv_mean"],
                             "kv_peak": r["kv"]["kv_peak"], "generated_tokens": r["counters"]["generated_tokens"],
                             "wall_s": r["counters"].get("wall_s"), "steps": len(r["trace"])} for r in recs],
        }
        return row


CHUNK_LOG = "bench_chunks.jsonl"


def _append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _chunk_log(run_path: Path, ids: set) -> list[dict]:
    """Timed chunks of a run whose problems are all among `ids`: this script's own log, or
    (for a run made without it) the harness's sessions.jsonl: one line per chunk, in order, each
    covering the next `computed` problems by finish time."""
    p = run_path / CHUNK_LOG
    if p.exists():
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return [c for c in rows if c["ids"] and set(c["ids"]) <= ids]
    sessions = [json.loads(line) for line in (run_path / "sessions.jsonl").read_text().splitlines()
                if line.strip()] if (run_path / "sessions.jsonl").exists() else []
    done = sorted((json.loads(f.read_text()) for f in (run_path / "problems").glob("*.json")),
                  key=lambda r: r["finished_at"]) if (run_path / "problems").exists() else []
    out, i = [], 0
    for sess in sessions:
        k = sess.get("computed", 0)
        if not k:
            continue
        chunk = [r["id"] for r in done[i:i + k]]
        i += k
        if chunk and set(chunk) <= ids:
            out.append({"ids": chunk, "wall_s": sess["wall_s"], "in_flight": min(sess.get("concurrency", 1), k),
                        "generated_tokens": sess.get("generated_tokens", 0), "engine": {}})
    return out


def _measured(engine: dict):
    """The engine's own KV figure for one step (vLLM: peak sampled from /metrics; embedded:
    tokens held in the KV store for this problem)."""
    for key in ("kv_tokens_peak", "kv_tokens"):
        v = engine.get(key)
        if isinstance(v, (int, float)):
            return v
    return None


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["strategy"] != "ets":
            continue
        base = next((b for b in rows if b["strategy"] == "rebase" and b["width"] == r["width"]), None)
        if base is None:
            continue

        def div(a, b):
            return a / b if a is not None and b else None

        out.append({
            "ets": r["method"], "width": r["width"],
            "kv_reduction": div(base["kv_mean"], r["kv_mean"]),
            "kv_peak_reduction": div(base["kv_peak"], r["kv_peak"]),
            "meas_kv_reduction": div(base["meas_kv_mean"], r["meas_kv_mean"]),
            "throughput_ratio": div(r["tokens_per_s"], base["tokens_per_s"]),
            "problems_per_s_ratio": div(r["problems_per_s"], base["problems_per_s"]),
            "acc_diff_points": 100 * (r["accuracy"] - base["accuracy"]),
            "ets_acc": [r["accuracy"], r["acc_lo"], r["acc_hi"]],
            "rebase_acc": [base["accuracy"], base["acc_lo"], base["acc_hi"]],
            "n": min(r["problems"], base["problems"]),
        })
    return out


# -- reporting -------------------------------------------------------------------------------

def _f(v, fmt):
    if v is None:
        return "-"
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def table(rows: list[dict]) -> str:
    has_meas = any(r["meas_kv_mean"] is not None for r in rows)
    has_waves = any(r.get("waves") for r in rows)
    head = ["method", "W", "n", "acc [95% CI]", "KV mean", "KV peak", "blocks mean"]
    if has_meas:
        head += ["meas KV mean", "meas KV peak"]
    head += ["gen tok/prob", "prob/s", "tok/s", "in flight", "sel ms/step"]
    if has_waves:
        head += ["waves"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["method"], str(r["width"]), str(r["problems"]),
                 f"{r['accuracy']:.3f} [{r['acc_lo']:.2f}, {r['acc_hi']:.2f}]",
                 _f(r["kv_mean"], "{:.0f}"), _f(r["kv_peak"], "{}"), _f(r["kv_blocks_mean"], "{:.1f}")]
        if has_meas:
            cells += [_f(r["meas_kv_mean"], "{:.0f}"), _f(r["meas_kv_peak"], "{:.0f}")]
        cells += [_f(r["generated_tokens"] / r["problems"] if r["problems"] else None, "{:.0f}"),
                  _f(r["problems_per_s"], "{:.4f}"), _f(r["tokens_per_s"], "{:.1f}"), str(r["in_flight"]),
                  _f(r["select_ms_per_step"], "{:.1f}")]
        if has_waves:
            cells += [_f(r.get("waves"), "{}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_lines(rats: list[dict]) -> list[str]:
    lines = []
    for q in rats:
        e, b = q["ets_acc"], q["rebase_acc"]
        ok_kv = q["kv_reduction"] is not None and q["kv_reduction"] >= 1.8
        ok_tp = q["throughput_ratio"] is not None and q["throughput_ratio"] >= 1.4
        lines.append(
            f"- **{q['ets']} vs rebase, W={q['width']}** (n={q['n']}): "
            f"KV reduction (tree mean) **{_f(q['kv_reduction'], '{:.2f}')}x** "
            f"[target 1.8x: {'met' if ok_kv else 'missed'}], peak {_f(q['kv_peak_reduction'], '{:.2f}')}x"
            + (f", measured {_f(q['meas_kv_reduction'], '{:.2f}')}x" if q["meas_kv_reduction"] is not None else "")
            + f"; throughput ratio (tok/s) **{_f(q['throughput_ratio'], '{:.2f}')}x** "
            f"[target 1.4x: {'met' if ok_tp else 'missed'}], problems/s {_f(q['problems_per_s_ratio'], '{:.2f}')}x; "
            f"accuracy {100 * e[0]:.1f}% [{100 * e[1]:.0f}, {100 * e[2]:.0f}] vs {100 * b[0]:.1f}% "
            f"[{100 * b[1]:.0f}, {100 * b[2]:.0f}] = {q['acc_diff_points']:+.1f} points"
            + (" (within noise: the intervals overlap)" if e[1] <= b[2] and b[1] <= e[2] else ""))
    return lines


def plots(rows: list[dict], out: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}\nW={r['width']}" for r in rows]
    x = list(range(len(rows)))
    n = max((r["problems"] for r in rows), default=0)
    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    acc = [r["accuracy"] for r in rows]
    err = [[a - r["acc_lo"] for a, r in zip(acc, rows)], [r["acc_hi"] - a for a, r in zip(acc, rows)]]
    ax.bar(x, acc, color=[f"C{i % 10}" for i in x], alpha=0.8)
    ax.errorbar(x, acc, yerr=err, fmt="none", ecolor="k", capsize=4)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.set_title(f"accuracy, n={n} problems — {title}", fontsize=9)
    save(fig, "accuracy.png")

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    w = 0.2
    ax.bar([i - 1.5 * w for i in x], [r["kv_mean"] for r in rows], w, label="tree KV mean")
    ax.bar([i - 0.5 * w for i in x], [r["kv_peak"] for r in rows], w, label="tree KV peak")
    if any(r["meas_kv_mean"] is not None for r in rows):
        ax.bar([i + 0.5 * w for i in x], [r["meas_kv_mean"] or 0 for r in rows], w, label="measured KV mean")
        ax.bar([i + 1.5 * w for i in x], [r["meas_kv_peak"] or 0 for r in rows], w, label="measured KV peak")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("KV tokens")
    ax.legend(fontsize=8)
    ax.set_title(f"KV size, n={n} problems — {title}", fontsize=9)
    save(fig, "kv.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 2 * len(rows)), 4))
    a1.bar(x, [r["tokens_per_s"] for r in rows], color=[f"C{i % 10}" for i in x])
    a1.set_ylabel("generated tokens / s")
    a2.bar(x, [r["problems_per_s"] for r in rows], color=[f"C{i % 10}" for i in x])
    a2.set_ylabel("problems / s")
    for a in (a1, a2):
        a.set_xticks(x, labels, fontsize=7)
    inflight = max((r["in_flight"] for r in rows), default=1)
    fig.suptitle(f"throughput, {inflight} problem(s) in flight, n={n} — {title}", fontsize=9)
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar(x, [r["select_ms_per_step"] for r in rows], color=[f"C{i % 10}" for i in x])
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("selection ms / step")
    ax.set_title(f"selection overhead — {title}", fontsize=9)
    save(fig, "selection.png")
    return files


def write_report(out: Path, rows: list[dict], meta: dict, extra_md: str = "") -> str:
    rats = ratios(rows)
    out.mkdir(parents=True, exist_ok=True)
    m = meta["machine"]
    md = [f"# {meta.get('title', 'Benchmark of record')}", "",
          f"- command: `{meta['command']}`",
          f"- machine: {m.get('cpu_model', m.get('processor'))}, {m.get('cpus')} CPUs, device {m.get('device')}, "
          f"torch {m.get('torch')} ({m.get('torch_threads')} threads), {m.get('platform')}; "
          f"load average at start {m.get('load_avg_start')}",
          f"- started {meta['started']}, wall {meta['wall_s']:.0f} s; engine {meta['engine']}"
          f" (policy {meta['policy']}, PRM {meta['prm']}, embedder {meta['embedder']})",
          f"- data: {meta['dataset']} problems {', '.join(meta['problem_ids'])} "
          f"(n={meta['n_problems']} of {meta['n_requested']} requested); seed {meta['seed']}; max_tokens {meta['max_tokens']}, "
          f"max_step_tokens {meta['max_step_tokens']}; step delimiter {meta.get('step_delimiter', chr(10) * 2)!r}; kv_capacity {meta.get('kv_capacity')}; "
          f"{meta['concurrency']} problem(s) in flight; interleaved {meta['interleave']}",
          "", table(rows), "", "## ETS / REBASE", ""] + (ratio_lines(rats) or ["(no ETS + REBASE pair)"])
    if meta.get("not_run"):
        md += ["", f"Not reported (stopped before finishing any problem): {', '.join(meta['not_run'])}."]
    if extra_md:
        md += ["", extra_md]
    text = "\n".join(md) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": rats}, indent=1,
                                                 default=str) + "\n")
    return text


# -- engines ---------------------------------------------------------------------------------

@contextlib.contextmanager
def engine_url(args):
    """The vLLM base URL: --url, else a server started here (killed on exit)."""
    if args.url:
        yield args.url, None
        return
    from ets.models import default_model_dir
    from ets.serve import default_venv_python, start_vllm_server

    python = args.vllm_python or str(default_venv_python())
    extra = []
    if args.vllm_blocks:
        extra += ["--num-gpu-blocks-override", str(args.vllm_blocks)]
    extra += ["--max-model-len", str(args.vllm_max_model_len)]
    if args.vllm_max_seqs:
        extra += ["--max-num-seqs", str(args.vllm_max_seqs)]
    server = start_vllm_server(default_model_dir(), args.port, python, args.kv_cache_gb,
                               block_size=args.vllm_block_size, extra_args=extra,
                               log_path=Path(args.runs_dir) / f"vllm-{args.port}.log")
    try:
        yield server.url, server
    finally:
        server.terminate()


def build_models(args, url=None):
    from ets.factory import make_policy, make_prm

    if args.engine == "vllm":
        from ets.engines.server import ServerPolicy

        policy = ServerPolicy(url)
    else:
        opts = {"seed": args.seed}
        if args.kv_capacity:
            opts["kv_capacity"] = args.kv_capacity
        policy = make_policy(args.policy, **opts)
    prm = make_prm(args.prm, policy, seed=args.seed)
    return policy, prm


async def _aclose(*objs):
    for o in objs:
        if o is not None and hasattr(o, "aclose"):
            await o.aclose()


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--problems", type=int, default=10, help="number of problems (default 10)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many problems first")
    ap.add_argument("--dataset", default="gsm8k", help="gsm8k | math500 | JSONL path")
    ap.add_argument("--widths", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=[8])
    ap.add_argument("--engine", choices=["embedded", "vllm"], default="embedded")
    ap.add_argument("--policy", default="default", help="embedded engine: default | mock | model dir/GGUF")
    ap.add_argument("--prm", default="default", help="default | mock | ... (ets.factory.make_prm spec)")
    ap.add_argument("--embedder", default="minilm", help="ETS clustering embedder: minilm | hash")
    ap.add_argument("--kv-capacity", type=int, default=None,
                    help="embedded engine: KV tokens it may hold (decode waves are sized to fit)")
    ap.add_argument("--concurrency", type=int, default=1, help="problems in flight at once (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default torch's; 1 can be faster on a shared, oversubscribed CPU)")
    ap.add_argument("--max-tokens", type=int, default=1024, help="generated tokens per trajectory")
    ap.add_argument("--max-step-tokens", type=int, default=256)
    ap.add_argument("--max-depth", type=int, default=25)
    from ets.cli import parse_delimiter

    ap.add_argument("--step-delimiter", type=parse_delimiter,
                    default="\n\n", help="step delimiter (default the spec's blank line; \\n: one line per "
                                          "step, which SmolLM2-135M needs for a tree to form)")
    ap.add_argument("--kv-block-size", type=int, default=16, help="block size of the tree's block count")
    ap.add_argument("--out", required=True, help="output folder (results.md, results.json, PNGs)")
    ap.add_argument("--note", default="", help="a paragraph added to the markdown report")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: report on what --runs-dir holds (the problems every config finished)")
    ap.add_argument("--runs-dir", default=None,
                    help="run directories with the full trees (default runs/bench-<time>; not for committing)")
    g = ap.add_argument_group("vLLM (--engine vllm)")
    g.add_argument("--url", default=None, help="a running server (default: start one)")
    g.add_argument("--port", type=int, default=8031)
    g.add_argument("--kv-cache-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB, integer)")
    g.add_argument("--vllm-blocks", type=int, default=None,
                   help="--num-gpu-blocks-override: cap the server's KV blocks (makes memory bind)")
    g.add_argument("--vllm-block-size", type=int, default=32, help="server block size (CPU: multiple of 32)")
    g.add_argument("--vllm-max-model-len", type=int, default=2048,
                   help="--max-model-len (vLLM refuses to start when one max-length sequence does not fit)")
    g.add_argument("--vllm-max-seqs", type=int, default=None, help="--max-num-seqs for the server")
    g.add_argument("--vllm-python", default=None, help="python of the vLLM venv")


def prepare_args(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.runs_dir is None:
        args.runs_dir = str(Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.engine == "vllm":
        args.policy_spec = args.url or "vllm:started"
        if args.kv_block_size == 16:
            args.kv_block_size = args.vllm_block_size  # count the tree in the server's blocks
    else:
        args.policy_spec = args.policy if not args.kv_capacity else f"{args.policy}@kv{args.kv_capacity}"
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)


async def run_all(args, method_specs: list[str], log=print) -> tuple[list[dict], dict]:
    """Build the configs, run them interleaved, return (rows, meta)."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    bench = Bench(args, method_specs)
    log(f"{len(bench.combos)} configs x {len(bench.problems)} problems, engine {args.engine}, "
        f"{args.concurrency} in flight; run dirs under {args.runs_dir}")
    t0 = time.perf_counter()
    url, policy_name, prm_name = args.url, args.policy, args.prm
    if not args.report_only:
        with engine_url(args) if args.engine == "vllm" else contextlib.nullcontext((None, None)) as (url, _server):
            policy, prm = build_models(args, url)
            policy_name, prm_name = getattr(policy, "name", args.policy), getattr(prm, "name", args.prm)
            try:
                await bench.run(policy, prm, log)
            finally:
                await _aclose(policy, prm)
    else:
        rec = next((r for c in bench.combos for r in c["run"].iter_problems()), None)
        if rec:
            policy_name, prm_name = rec.get("policy", policy_name), rec.get("prm", prm_name)
    not_run = []
    if args.report_only:  # a config stopped before its first problem has nothing to compare
        ids_all = {p.id for p in bench.problems}
        not_run = [c["label"] + f" W={c['width']}" for c in bench.combos
                   if not any(r["id"] in ids_all for r in c["run"].iter_problems())]
        bench.combos = [c for c in bench.combos if c["label"] + f" W={c['width']}" not in not_run]
        if not_run:
            log(f"not reported (no problem finished): {', '.join(not_run)}")
    ids = bench.common_ids()
    if len(ids) < len(bench.problems):
        log(f"report on the {len(ids)} of {len(bench.problems)} problems that every config finished")
    rows = bench.rows(ids)
    argv = list(sys.argv[1:])
    if "--note" in argv:  # the note is printed on its own; keep the command readable
        i = argv.index("--note")
        del argv[i:i + 2]
    meta = {"command": shlex.join([Path(sys.argv[0]).as_posix()] + argv), "started": started,
            "wall_s": time.perf_counter() - t0, "machine": machine(), "engine": args.engine,
            "policy": policy_name, "prm": prm_name, "report_only": args.report_only,
            "embedder": args.embedder, "dataset": args.dataset, "offset": args.offset,
            "n_problems": len(ids), "n_requested": len(bench.problems), "problem_ids": ids, "seed": args.seed,
            "max_tokens": args.max_tokens, "max_step_tokens": args.max_step_tokens,
            "step_delimiter": args.step_delimiter,
            "kv_capacity": args.kv_capacity, "concurrency": args.concurrency,
            "vllm": {"url": url, "kv_cache_gb": args.kv_cache_gb, "blocks": args.vllm_blocks,
                     "block_size": args.vllm_block_size} if args.engine == "vllm" else None,
            "interleave": f"problem-major in chunks of {args.concurrency}, method order rotating per chunk",
            "methods": method_specs, "widths": args.widths, "not_run": not_run}
    if args.report_only:  # this process ran nothing: its thread count is not the run's
        meta["machine"]["torch_threads"] = "see the run's command"
    try:
        meta["machine"]["load_avg_end"] = os.getloadavg()
    except OSError:
        pass
    return rows, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help=f"comma list, each `strategy[:k=v/k=v]` (default {DEFAULT_METHODS})")
    ap.add_argument("--title", default="Benchmark of record")
    add_common_args(ap)
    args = ap.parse_args(argv)
    prepare_args(args)
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    rows, meta = asyncio.run(run_all(args, specs))
    meta["title"] = args.title
    out = Path(args.out)
    text = write_report(out, rows, meta, args.note)
    files = plots(rows, out, f"{meta['dataset']}, {meta['engine']}, {meta['policy']}")
    print("\n" + text)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, " + ", ".join(str(out / f) for f in files))
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
