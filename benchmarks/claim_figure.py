"""The claim along the PRM-quality dial: ETS / REBASE KV ratio and accuracy difference against the
PRM's open-prefix AUROC, one line per lambda setting, W=16 and W=64 (docs/results.md, section 4).

    python benchmarks/claim_figure.py --out benchmarks/results/claim-figure \\
        --point "default PRM@0.594@16@benchmarks/results/record-vllm-qwen-gsm8k-w16/results.json:rebase@benchmarks/results/record-vllm-qwen-gsm8k-w16/results.json:ets=paper" \\
        --point "reference noise 0@0.681@16@benchmarks/results/claim-reference-w16-noise0/results.json:rebase@benchmarks/results/claim-reference-w16-noise0/results.json:ets=paper" ...

A point is LABEL@AUROC@WIDTH@BASE@ROW=SETTING: BASE and ROW are `ets pair` rows
(FILE.json:METHOD[+...]), paired on the problems both finished; SETTING names the line the point
belongs to (e.g. `paper`, `lambda_c 4`). AUROC is the PRM's open-prefix AUROC within a depth of a
problem (`ets worth`, benchmarks/results/reference-prm-levels). Writes OUT/claim.md (the table)
and OUT/claim.png (two panels: KV ratio, and accuracy difference with its paired 95% interval).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ets.report.pairing import load, pair


def parse_point(text: str) -> dict:
    try:
        label, auroc, width, base, rest = text.split("@", 4)
        row, _, setting = rest.rpartition("=")
    except ValueError:
        raise SystemExit(f"--point {text!r}: expected LABEL@AUROC@WIDTH@BASE@ROW=SETTING") from None
    if not row:
        raise SystemExit(f"--point {text!r}: the row needs =SETTING (the line it belongs to)")
    _, b = load(base)
    _, r = load(row)
    return {"label": label, "auroc": float(auroc), "width": int(width), "setting": setting, **pair(r, b)}


def markdown(points: list[dict]) -> str:
    lines = ["| PRM | open-prefix AUROC | W | ETS setting | n | REBASE acc | ETS acc | ETS - REBASE, points [95%] "
             "| KV mean REBASE / ETS |", "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["width"], p["setting"], p["auroc"])):
        lines.append(f"| {p['label']} | {p['auroc']:.3f} | {p['width']} | {p['setting']} | {p['n']} | "
                     f"{p['base_correct']}/{p['n']} | {p['correct']}/{p['n']} | {100 * p['diff']:+.1f} "
                     f"[{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}] | {p['kv_ratio']:.2f}x |")
    return "\n".join(lines)


def figure(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = sorted({(p["width"], p["setting"]) for p in points})
    for width, setting in lines:
        ps = sorted((p for p in points if (p["width"], p["setting"]) == (width, setting)), key=lambda p: p["auroc"])
        style = "-o" if width == 16 else "--s"
        x = [p["auroc"] for p in ps]
        ax1.plot(x, [p["kv_ratio"] for p in ps], style, label=f"W={width}, ETS {setting}")
        ax2.errorbar(x, [100 * p["diff"] for p in ps],
                     yerr=[[100 * (p["diff"] - p["lo"]) for p in ps], [100 * (p["hi"] - p["diff"]) for p in ps]],
                     fmt=style, capsize=3, label=f"W={width}, ETS {setting}")
    ax1.axhline(1.8, color="grey", ls=":", lw=1)
    ax1.text(ax1.get_xlim()[0], 1.8, " paper: 1.8x", va="bottom", color="grey", fontsize=8)
    ax1.set(xlabel="PRM open-prefix AUROC (within a depth of a problem)", ylabel="KV mean, REBASE / ETS",
            title="KV saved")
    ax2.axhline(0, color="grey", lw=1)
    ax2.set(xlabel="PRM open-prefix AUROC (within a depth of a problem)", ylabel="ETS - REBASE accuracy, points",
            title="accuracy, paired 95% interval")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--point", action="append", required=True, help="LABEL@AUROC@WIDTH@BASE@ROW=SETTING")
    ap.add_argument("--out", required=True, help="folder for claim.md and claim.png")
    a = ap.parse_args(argv)
    points = [parse_point(t) for t in a.point]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(points)
    (out / "claim.md").write_text(text + "\n", encoding="utf-8")
    figure(points, out / "claim.png")
    print(text)
    print(f"wrote {out / 'claim.md'}, {out / 'claim.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
