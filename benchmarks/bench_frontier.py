"""Accuracy against KV: the ETS frontier over lambda_c, lambda_s, token cost and KV budget,
with REBASE and the other baselines as reference points (one point per setting).

All settings run through `ets compare` (ets.experiment: the same problems, model, engine and
seed, interleaved in chunks; one run directory per setting); every argument not listed here
goes to it (via bench_record.py, so --threads and --start-vllm work too).

    # the default model (embedded engine), a small sweep
    python benchmarks/bench_frontier.py --problems 8 --widths 8 --max-tokens 256 \
        --lambda-c 0.5,1,2 --lambda-s 0,paper --token-cost 1,3 --kv-budgets 400,600 \
        --out benchmarks/results/frontier-smollm

    # mock policy and PRM (a pipeline demonstration only: its accuracy means nothing)
    python benchmarks/bench_frontier.py --policy mock --prm mock --embedder hash --problems 30 \
        --out benchmarks/results/frontier-mock

Settings swept (each an `ets[:k=v/...]` method spec as in bench_record.py):
  ets:lambda_c=C/lambda_s=S      for C in --lambda-c, S in --lambda-s ("paper" = the paper's value)
  ets:node_cost=tokens/lambda_c=C   for C in --token-cost (charge each node its tokens)
  ets:kv_budget=B                for B in --kv-budgets (hard cap on kept KV tokens, lambda_c default)
  plus --baselines (default rebase,beam,dvts,best_of_n)

Writes into --out: what `ets compare --out` writes (results.md with the paired differences to
REBASE, results.json, PNGs), frontier.png (accuracy with its 95% Wilson interval against mean
tree KV tokens, one point per setting, the non-dominated points joined) and frontier.md
(results.md plus the non-dominated settings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_record  # noqa: E402  (ets compare, with its --threads and --start-vllm conveniences)


def _floats(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def settings(args) -> list[str]:
    specs = [b for b in _floats(args.baselines)]
    for c in _floats(args.lambda_c):
        for s in _floats(args.lambda_s):
            specs.append(f"ets:lambda_c={c}" + ("" if s == "paper" else f"/lambda_s={s}"))
    for c in _floats(args.token_cost):
        specs.append(f"ets:node_cost=tokens/lambda_c={c}")
    for b in _floats(args.kv_budgets):
        specs.append(f"ets:kv_budget={b}")
    return list(dict.fromkeys(specs))


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower KV and higher accuracy is better), by KV."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -1.0
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_frontier(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"rebase": "s", "beam": "^", "dvts": "v", "best_of_n": "D", "ets": "o"}
    for i, r in enumerate(rows):
        is_ets = r["strategy"] == "ets"
        color = "C0" if is_ets and "tokens" not in r["method"] and "budget" not in r["method"] else (
            "C2" if "tokens" in r["method"] else "C4" if "budget" in r["method"] else "C3")
        if not is_ets:
            color = {"rebase": "C3", "beam": "C1", "dvts": "C5", "best_of_n": "C7"}.get(r["strategy"], "k")
        ax.errorbar([r["kv_mean"]], [r["accuracy"]],
                    yerr=[[r["accuracy"] - r["acc_lo"]], [r["acc_hi"] - r["accuracy"]]],
                    fmt=markers.get(r["strategy"], "o"), color=color, alpha=0.85, capsize=3, ms=7)
        label = r["method"].replace("ets:", "").replace("lambda_", "λ").replace("node_cost=tokens", "tok")
        ax.annotate(f"{label} W{r['width']}" if len({x['width'] for x in rows}) > 1 else label,
                    (r["kv_mean"], r["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = pareto([(r["kv_mean"], r["accuracy"]) for r in rows])
    ax.plot([rows[i]["kv_mean"] for i in front], [rows[i]["accuracy"] for i in front], "k:", alpha=0.5,
            label="non-dominated")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="C0", marker="o", ls="", label="ETS (λc, λs)"),
               Line2D([], [], color="C2", marker="o", ls="", label="ETS token cost"),
               Line2D([], [], color="C4", marker="o", ls="", label="ETS KV budget"),
               Line2D([], [], color="C3", marker="s", ls="", label="REBASE"),
               Line2D([], [], color="C1", marker="^", ls="", label="beam"),
               Line2D([], [], color="C5", marker="v", ls="", label="DVTS"),
               Line2D([], [], color="C7", marker="D", ls="", label="best-of-N"),
               Line2D([], [], color="k", ls=":", label="non-dominated")]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("mean KV tokens (tree count, SPEC 3)")
    ax.set_ylabel("accuracy (95% Wilson interval)")
    n = max((r["problems"] for r in rows), default=0)
    ax.set_title(f"accuracy vs KV, n={n} problems — {title}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--baselines", default="rebase,beam,dvts,best_of_n")
    ap.add_argument("--lambda-c", default="0.5,1,2", help="ETS lambda_c values (node cost)")
    ap.add_argument("--lambda-s", default="0,paper", help="ETS lambda_s values ('paper' = width's value)")
    ap.add_argument("--token-cost", default="1,2", help="lambda_c values with node_cost=tokens ('' = none)")
    ap.add_argument("--kv-budgets", default="", help="ETS kv_budget values in tokens ('' = none)")
    ap.add_argument("--title", default="ETS frontier")
    ap.add_argument("--out", required=True, help="output folder (results.*, frontier.png, frontier.md)")
    args, rest = ap.parse_known_args(argv)
    code = bench_record.main(["--methods", ",".join(settings(args)), "--title", args.title, "--out", args.out, *rest])
    out = Path(args.out)
    if not (out / "results.json").exists():
        return code
    rows = json.loads((out / "results.json").read_text())["rows"]
    if not rows:
        return code
    plot_frontier(rows, out / "frontier.png", args.title)
    front = pareto([(r["kv_mean"], r["accuracy"]) for r in rows])
    text = ((out / "results.md").read_text() + "\nNon-dominated (accuracy vs mean KV): "
            + ", ".join(f"{rows[i]['method']} W{rows[i]['width']}" for i in front) + "\n\n![frontier](frontier.png)\n")
    (out / "frontier.md").write_text(text)
    print(f"written: {out / 'frontier.md'}, {out / 'frontier.png'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
