"""benchmarks/pair_results.py: rows of different results files paired on their common problems."""

import json
import subprocess
import sys
from pathlib import Path

from ets.report.record import paired_interval

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "pair_results.py"


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {}, "rows": rows, "ratios": []}))
    return path


def row(method: str, outcomes: dict, kv: float, prm=None) -> dict:
    return {"method": method, "prm": prm, "per_problem": [
        {"id": i, "correct": c, "kv_mean": kv, "kv_peak": kv, "generated_tokens": 1} for i, c in outcomes.items()]}


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_pairs_on_common_problems_only(tmp_path):
    # base: p0..p5; the other file has p2..p7, so p2..p5 are common (p6, p7 are not in the base)
    base = write(tmp_path / "record" / "results.json",
                 [row("rebase", {f"p{i}": i % 2 == 0 for i in range(6)}, kv=1500.0),
                  row("ets", {f"p{i}": True for i in range(6)}, kv=1000.0)])
    other = write(tmp_path / "later" / "results.json",
                  [row("beam", {"p2": True, "p3": True, "p4": False, "p5": False, "p6": True, "p7": True}, kv=1200.0)])
    out = run("--base", f"{base}:rebase", f"{other}:beam")
    assert out.returncode == 0, out.stderr
    # common p2..p5: beam T,T,F,F; rebase (even ids right) T,F,T,F -> 2/4 each, diff 0
    diff, lo, hi = paired_interval([True, True, False, False], [True, False, True, False])
    line = next(l for l in out.stdout.splitlines() if l.startswith("| later:beam"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "4" and cells[2].startswith("2/4") and cells[3] == "2/4"
    assert cells[4] == f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    assert cells[5] == "1 / 1" and cells[8] == "1.25x"  # 1500 / 1200


def test_names_the_rows_when_the_method_is_missing_or_ambiguous(tmp_path):
    f = write(tmp_path / "a" / "results.json",
              [row("rebase", {"p0": True}, 1.0, prm="default"), row("rebase", {"p0": False}, 1.0, prm="learned:x.npz")])
    out = run("--base", f"{f}:rebase", f"{f}:rebase@default")
    assert out.returncode != 0 and "2 rows (add @PRM)" in out.stderr
    out = run("--base", f"{f}:rebase@learned:x.npz", f"{f}:beam")
    assert out.returncode != 0 and "no row for method 'beam'" in out.stderr and "rebase@default" in out.stderr
    out = run("--base", f"{f}:rebase@learned:x.npz", f"{f}:rebase@default")
    assert out.returncode == 0, out.stderr
    assert "| a:rebase@default | 1 | 1/1" in out.stdout and "| 0/1 |" in out.stdout


def test_joins_rows_run_in_pieces(tmp_path):
    base = write(tmp_path / "record" / "results.json", [row("rebase", {f"p{i}": i < 2 for i in range(4)}, kv=100.0)])
    a = write(tmp_path / "first" / "results.json", [row("beam", {"p0": True, "p1": True}, kv=50.0)])
    b = write(tmp_path / "second" / "results.json", [row("beam", {"p2": True, "p3": False}, kv=50.0)])
    out = run("--base", f"{base}:rebase", f"{a}:beam+{b}:beam")
    assert out.returncode == 0, out.stderr
    assert "| first:beam+second:beam | 4 | 3/4" in out.stdout and "| 2/4 |" in out.stdout and "| 1 / 0 |" in out.stdout
    out = run("--base", f"{base}:rebase", f"{a}:beam+{a}:beam")
    assert out.returncode != 0 and "problem p0 is in both" in out.stderr


def test_plots_every_row_on_the_problems_all_finished(tmp_path):
    base = write(tmp_path / "record" / "results.json", [row("rebase", {f"p{i}": True for i in range(4)}, kv=100.0)])
    other = write(tmp_path / "later" / "results.json",
                  [row("ets:lambda_c=2", {"p1": True, "p2": False, "p9": True}, kv=80.0),
                   row("beam", {"p2": True, "p3": True}, kv=60.0)])
    png = tmp_path / "frontier.png"
    out = run("--base", f"{base}:rebase", f"{other}:ets:lambda_c=2", f"{other}:beam", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert f"plot: {png} (3 rows on 1 common problems)" in out.stdout  # only p2 is in all three
    assert png.read_bytes()[:4] == b"\x89PNG"
    disjoint = write(tmp_path / "far" / "results.json", [row("dvts", {"p7": True}, kv=1.0)])
    out = run("--base", f"{base}:rebase", f"{disjoint}:dvts", "--plot", str(png))
    assert out.returncode != 0 and "no problem in common" in out.stderr
