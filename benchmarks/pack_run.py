"""Pack a run directory's finished problems into one small .tar.xz that can be committed, so that
rollouts which took hours of a server survive the machine they were made on:

    python benchmarks/pack_run.py runs/best_of_n-w16-XXXXXXXX benchmarks/results/SOMEWHERE/rollouts.tar.xz
    tar xJf benchmarks/results/SOMEWHERE/rollouts.tar.xz -C runs      # back: the same run directory

The archive holds RUN/config.json, RUN/sessions.jsonl, RUN/summary.json, RUN/policy_identity.txt, RUN/named_by.json
(those that exist) and RUN/problems/*.json, not claims/ or errors/ (a machine's own state).
Unpacked under the runs directory of the command that made it, the run resumes as usual: finished
problems are skipped, the rest are sampled. Token log-probs are rounded to --decimals (default 4:
a learned PRM's statistics move by about 1e-4; the archive is 2-3x smaller); --decimals -1 keeps
them whole. Problem files are written compactly (no indentation)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

RUN_FILES = ("config.json", "sessions.jsonl", "summary.json", "policy_identity.txt", "named_by.json")


def compact_record(record: dict, decimals: int) -> bytes:
    """A problem record as compact JSON, its tree's token log-probs rounded to `decimals` (< 0: kept)."""
    if decimals >= 0:
        for node in record.get("tree", {}).get("nodes", []):
            if node.get("logprobs"):
                node["logprobs"] = [round(x, decimals) for x in node["logprobs"]]
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


def pack(run_dir: Path, out: Path, decimals: int = 4) -> int:
    """Write the archive; returns the number of problems packed."""
    if not (run_dir / "config.json").is_file():
        raise SystemExit(f"{run_dir} is not a run directory (no config.json)")
    problems = sorted((run_dir / "problems").glob("*.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")

    def add(tar, name: str, data: bytes, mtime: float) -> None:
        info = tarfile.TarInfo(f"{run_dir.name}/{name}")
        info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(tmp, "w:xz") as tar:
        for name in RUN_FILES:
            p = run_dir / name
            if p.is_file():
                add(tar, name, p.read_bytes(), p.stat().st_mtime)
        for p in problems:
            add(tar, f"problems/{p.name}", compact_record(json.loads(p.read_text()), decimals), p.stat().st_mtime)
    tmp.replace(out)
    return len(problems)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--decimals", type=int, default=4, help="round token log-probs to this many decimals (-1: keep)")
    a = p.parse_args()
    n = pack(a.run_dir, a.out, a.decimals)
    print(f"{a.out}: {n} problems of {a.run_dir.name}, {a.out.stat().st_size / 1e6:.2f} MB "
          f"(unpack: tar xJf {a.out} -C <runs dir>)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
