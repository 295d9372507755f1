"""Plots of comparison runs: accuracy vs width and KV vs width, one line per method."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence


def plot_compare(rows: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Save a PNG with two panels (accuracy vs width; mean and peak KV tokens vs width).

    rows: run summaries with keys strategy, width, accuracy, kv_mean, kv_peak."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["strategy"]].append(r)
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
