"""`ets pair`: methods paired across results files: accuracy and tree KV on the problems both finished.

`ets compare` pairs its own arms with REBASE; this pairs rows of different results.json files (each
row keeps its per-problem outcomes), so a method run later, in another session or on another
machine, is judged against the record's REBASE on the same problems without recomputing it.

    ets pair \\
        --base benchmarks/results/record-vllm-qwen-gsm8k-w16/results.json:rebase \\
        benchmarks/results/record-vllm-qwen-gsm8k-w16-beam-dvts/results.json:beam \\
        benchmarks/results/record-vllm-qwen-gsm8k-w16-beam-dvts/results.json:dvts

A row is FILE:METHOD (METHOD as the results table names it, e.g. `ets:lambda_c=2`); FILE:METHOD@PRM
picks one PRM's row where a file compares several; ROW+ROW joins the problems of rows run in pieces
(say problems 0-49 in one session, 50-99 in the next, each its own results file). Prints a markdown table: problems in common,
each side's accuracy on them, the paired difference with its 95% interval (Newcombe, as `ets
compare`), problems right only under one side, and the tree KV means on those problems with their
ratio (base / this: above 1 means this row kept less KV). `--plot PNG` also draws accuracy against
tree KV, one point a row, on the problems every row finished (ETS rows as circles).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ets.report.record import paired_interval, wilson


def load(spec: str) -> tuple[str, dict]:
    """(label, row) for ROW[+ROW...]: the pieces' per-problem outcomes joined (SystemExit when a
    problem is in two pieces)."""
    pieces = [load_row(s) for s in spec.split("+")]
    if len(pieces) == 1:
        return pieces[0]
    seen: dict[str, str] = {}
    for label, row in pieces:
        for p in row["per_problem"]:
            if p["id"] in seen:
                raise SystemExit(f"{spec}: problem {p['id']} is in both {seen[p['id']]} and {label}")
            seen[p["id"]] = label
    return "+".join(label for label, _ in pieces), {"method": pieces[0][1]["method"],
                                                     "per_problem": [p for _, r in pieces for p in r["per_problem"]]}


def load_row(spec: str) -> tuple[str, dict]:
    """(label, row) for FILE:METHOD[@PRM]; SystemExit naming the choices when no row matches."""
    path, sep, method = spec.partition(".json:")
    if not sep:
        raise SystemExit(f"{spec}: expected FILE.json:METHOD (e.g. results.json:rebase)")
    path += ".json"
    method, _, prm = method.partition("@")
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["rows"]
    found = [r for r in rows if r["method"] == method and (not prm or (r.get("prm") or "") == prm)]
    if len(found) != 1:
        have = ", ".join(f"{r['method']}@{r.get('prm') or ''}" for r in rows)
        why = "no row" if not found else f"{len(found)} rows (add @PRM)"
        raise SystemExit(f"{spec}: {why} for method {method!r} in {path}; its rows: {have}")
    if not found[0].get("per_problem"):
        raise SystemExit(f"{spec}: the row has no per-problem outcomes (made before they were saved)")
    return f"{Path(path).parent.name}:{method}{'@' + prm if prm else ''}", found[0]


def pair(row: dict, base: dict) -> dict:
    """This row against the base on the problems both finished (in the base's order)."""
    mine = {p["id"]: p for p in row["per_problem"]}
    theirs = [p for p in base["per_problem"] if p["id"] in mine]
    x = [bool(mine[p["id"]]["correct"]) for p in theirs]
    y = [bool(p["correct"]) for p in theirs]
    n = len(theirs)
    diff, lo, hi = paired_interval(x, y)
    kv_this = sum(mine[p["id"]]["kv_mean"] for p in theirs) / n if n else None
    kv_base = sum(p["kv_mean"] for p in theirs) / n if n else None
    return {"n": n, "correct": sum(x), "base_correct": sum(y), "acc_ci": wilson(sum(x), n),
            "diff": diff, "lo": lo, "hi": hi,
            "only_this": sum(a and not b for a, b in zip(x, y)), "only_base": sum(b and not a for a, b in zip(x, y)),
            "kv_this": kv_this, "kv_base": kv_base,
            "kv_ratio": kv_base / kv_this if n and kv_this else None}


def table(base_label: str, pairs: list[tuple[str, dict]]) -> str:
    lines = [f"Paired with {base_label} on the problems both finished.", "",
             "| row | n | acc [95% CI] | base acc | diff, points [95% CI] | right only here / only base "
             "| KV mean | base KV mean | KV base/this |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, p in pairs:
        if not p["n"]:
            lines.append(f"| {label} | 0 | - | - | - | - | - | - | - |")
            continue
        lo, hi = p["acc_ci"]
        lines.append(f"| {label} | {p['n']} | {p['correct']}/{p['n']} [{lo:.2f}, {hi:.2f}] | "
                     f"{p['base_correct']}/{p['n']} | {100 * p['diff']:+.1f} [{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}] | "
                     f"{p['only_this']} / {p['only_base']} | {p['kv_this']:,.0f} | {p['kv_base']:,.0f} | "
                     f"{p['kv_ratio']:.2f}x |")
    return "\n".join(lines)


def plot(path: str, rows: list[tuple[str, dict]]) -> str:
    """Accuracy against tree KV for every row (the base first) on the problems all of them
    finished, so the points are comparable with each other; returns a line saying what was drawn."""
    from ets.report.plots import plot_accuracy_kv

    common = set.intersection(*({p["id"] for p in r["per_problem"]} for _, r in rows))
    if not common:
        raise SystemExit(f"--plot {path}: the rows have no problem in common")
    # a point is named by its method alone unless two rows share one (then by the whole label)
    methods = [r["method"] for _, r in rows]
    points = []
    for label, r in rows:
        ps = [p for p in r["per_problem"] if p["id"] in common]
        right = sum(bool(p["correct"]) for p in ps)
        lo, hi = wilson(right, len(ps))
        points.append({"label": r["method"] if methods.count(r["method"]) == 1 else label,
                       "accuracy": right / len(ps), "acc_lo": lo, "acc_hi": hi,
                       "kv_mean": sum(p["kv_mean"] for p in ps) / len(ps),
                       "ets": r["method"].split(":")[0] == "ets"})
    plot_accuracy_kv(points, path, f"accuracy against KV on the {len(common)} problems every row finished")
    return f"plot: {path} ({len(rows)} rows on {len(common)} common problems)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ets pair", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="FILE.json:METHOD[@PRM][+...] every other row is paired with")
    ap.add_argument("rows", nargs="+", help="FILE.json:METHOD[@PRM][+...] rows to pair with the base")
    ap.add_argument("--plot", metavar="PNG", help="also draw accuracy against tree KV, every row on the "
                    "problems all rows (and the base) finished")
    args = ap.parse_args(argv)
    base_label, base = load(args.base)
    loaded = [load(spec) for spec in args.rows]
    print(table(base_label, [(label, pair(row, base)) for label, row in loaded]))
    if args.plot:
        print("\n" + plot(args.plot, [(base_label, base), *loaded]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
