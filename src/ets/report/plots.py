"""Plots of comparison runs: accuracy and KV vs width (one line per method), the record's
per-config bars (accuracy, KV, throughput, selection time), and accuracy against KV (one point
per config: the frontier), and accuracy against generated tokens and FLOPs per problem (one line
per method across widths, best-of-n's subsampled curve dashed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence


def _config_suffix(r: dict, sep: str) -> str:
    """What tells a row apart beyond its method and width: its dataset and PRM where the
    experiment had several (ets.experiment.Arm.key names them the same way)."""
    return (f"{sep}{r['dataset']}" if r.get("dataset") else "") + (f"{sep}prm={r['prm']}" if r.get("prm") else "")


def plot_compare(rows: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Save a PNG with two panels (accuracy vs width; mean and peak KV tokens vs width).

    rows: run summaries or record rows, with keys strategy (or method: the line's label),
    width, accuracy, kv_mean, kv_peak."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[(r.get("method") or r["strategy"]) + _config_suffix(r, " ")].append(r)
    fig, (ax_acc, ax_kv) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (method, rs) in enumerate(sorted(by_method.items())):
        rs = sorted(rs, key=lambda r: r["width"])
        ws = [r["width"] for r in rs]
        # distinct markers, each smaller than the last, so methods with equal values stay visible
        color, marker, size = f"C{i}", "os^Dv<>p"[i % 8], max(3.0, 10.0 - 1.5 * i)
        ax_acc.plot(ws, [r["accuracy"] for r in rs], marker=marker, ms=size, ls="-", color=color, label=method)
        ax_kv.plot(ws, [r["kv_mean"] for r in rs], marker=marker, ms=size, ls="-", color=color, label=f"{method} mean")
        ax_kv.plot(ws, [r["kv_peak"] for r in rs], marker=marker, ms=size, ls="--", color=color, alpha=0.5,
                   label=f"{method} peak")
    widths = sorted({r["width"] for r in rows})
    for ax, ylabel in ((ax_acc, "accuracy"), (ax_kv, "KV tokens")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel("width W")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_acc.set_ylim(-0.02, 1.02)
    n = max((r.get("problems", 0) for r in rows), default=0)
    fig.suptitle(title or f"accuracy and KV size vs width ({n} problems)")
    return _save_figure(fig, path, dpi=110)


def record_plots(rows: Sequence[dict], out: str | Path, title: str) -> list[str]:
    """Save accuracy.png (with Wilson intervals), kv.png (tree and measured KV, mean and peak),
    throughput.png (tok/s, problems/s) and selection.png (ms per step) into `out`, one bar per
    row of ets.report.record.rows, and accuracy_kv.png (one point per row); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [f"{r['method']}\nW={r['width']}" + _config_suffix(r, "\n") for r in rows]
    x = list(range(len(rows)))
    n = max((r["problems"] for r in rows), default=0)
    files = []

    def save(fig, name):
        _save_figure(fig, out / name, dpi=100)
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
    a1.bar(x, [r["tokens_per_s"] or 0 for r in rows], color=[f"C{i % 10}" for i in x])
    a1.set_ylabel("generated tokens / s")
    a2.bar(x, [r["problems_per_s"] or 0 for r in rows], color=[f"C{i % 10}" for i in x])
    a2.set_ylabel("problems / s")
    for a in (a1, a2):
        a.set_xticks(x, labels, fontsize=7)
    inflight = max((r["in_flight"] or 1 for r in rows), default=1)
    fig.suptitle(f"throughput, {inflight} problem(s) in flight, n={n} — {title}", fontsize=9)
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar(x, [r["select_ms_per_step"] for r in rows], color=[f"C{i % 10}" for i in x])
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("selection ms / step")
    ax.set_title(f"selection overhead — {title}", fontsize=9)
    save(fig, "selection.png")

    plot_accuracy_kv([{"label": lab.replace("\n", " "), "accuracy": r["accuracy"], "acc_lo": r["acc_lo"],
                       "acc_hi": r["acc_hi"], "kv_mean": r["kv_mean"], "ets": r["strategy"] == "ets"}
                      for lab, r in zip(labels, rows)],
                     out / "accuracy_kv.png", f"accuracy against KV, n={n} problems — {title}")
    files.append("accuracy_kv.png")
    files += plot_accuracy_compute(rows, out, title)
    return files


def plot_accuracy_compute(rows: Sequence[dict], out: str | Path, title: str) -> list[str]:
    """Save accuracy_tokens.png (accuracy against generated tokens per problem) and, where every
    row of some method knows it, accuracy_flops.png (against FLOPs per problem: policy + PRM
    where all of them know both, else the policy's alone, as the axis says), one line per method
    across its widths; a row with `best_of_n_curve` (ets.report.record) adds its best-of-n curve
    as a dashed line on the tokens plot, n samples costing n/W of its tokens. Returns the file
    names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[(r.get("method") or r["strategy"]) + _config_suffix(r, " ")].append(r)
    n = max((r.get("problems", 0) for r in rows), default=0)
    files = []

    def tokens(r):
        return r["generated_tokens"] / r["problems"] if r.get("problems") else None

    flops_key = "flops_mean" if rows and all(r.get("flops_mean") is not None for r in rows) else "policy_flops_mean"
    for name, x_of, xlabel in (
            ("accuracy_tokens.png", tokens, "generated tokens per problem"),
            ("accuracy_flops.png", lambda r: r.get(flops_key),
             "FLOPs per problem (policy + PRM)" if flops_key == "flops_mean" else
             "policy FLOPs per problem (PRM not counted: its tokens or parameters unknown)")):
        lines = [(m, [r for r in sorted(rs, key=lambda r: r["width"]) if x_of(r)]) for m, rs in sorted(by_method.items())]
        lines = [(m, rs) for m, rs in lines if rs]
        if not lines:
            continue  # nothing known to draw (FLOPs without parameter counts)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, (m, rs) in enumerate(lines):
            # each marker smaller than the last, so methods with equal values stay visible (plot_compare)
            color, marker, size = f"C{i % 10}", "os^Dv<>p"[i % 8], max(3.0, 10.0 - 1.5 * i)
            ax.plot([x_of(r) for r in rs], [r["accuracy"] for r in rs], marker=marker, ms=size, ls="-", color=color,
                    label=m)
            for r in rs:
                ax.annotate(f"W={r['width']}", (x_of(r), r["accuracy"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
            for r in rs:
                curve = r.get("best_of_n_curve")
                if name == "accuracy_tokens.png" and curve and curve.get("width"):
                    v = r.get("best_of_n_vote", "weighted")
                    ax.plot([x_of(r) * k / curve["width"] for k in curve["n"]], curve[v], ls="--", marker=".",
                            color=color, alpha=0.7, label=f"{m}: best-of-n from W={curve['width']} ({v})")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(f"accuracy against {'tokens' if 'tokens' in name else 'FLOPs'}, n={n} problems — {title}",
                     fontsize=9)
        _save_figure(fig, out / name, dpi=100)
        files.append(name)
    return files


def plot_accuracy_kv(points: Sequence[dict], path: str | Path, title: str) -> Path:
    """Save a PNG of accuracy (95% interval bars) against mean tree KV tokens, one labelled point
    each: the frontier a KV-saving search is judged on (up and to the left is better).

    points: dicts with label, accuracy, acc_lo, acc_hi, kv_mean and ets (True: an ETS setting,
    drawn as a circle; False: a baseline, drawn as a square)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = [plt.get_cmap("tab10" if len(points) <= 10 else "tab20")(i % 20) for i in range(len(points))]
    for i, p in enumerate(points):
        err = [[p["accuracy"] - p["acc_lo"]], [p["acc_hi"] - p["accuracy"]]]
        # points often share an accuracy (n is small): a legend, not labels beside the points
        ax.errorbar([p["kv_mean"]], [p["accuracy"]], yerr=err, fmt="o" if p["ets"] else "s", ms=7,
                    color=colors[i], capsize=3, alpha=0.85, label=p["label"])
    ax.set_xlabel("tree KV tokens, mean over the search (smaller is better)")
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title + "\ncircles: ETS settings; squares: baselines", fontsize=9)
    return _save_figure(fig, path, dpi=100)


def _save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Write the figure (laid out) to path, creating its folder, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
