"""Run directories: the full config, one file per finished problem, a summary; resumable.

Layout (see docs/harness.md):

    runs/<strategy>-w<width>-<hash8>/
      config.json            # {"name", "hash", "identity": {...}, "run": {...}}; hash = sha256(identity)[:8]
      problems/<id>.json     # one finished problem: tree, trace, counters, KV, answer, correct
      errors/<id>.json       # the last failure of a problem not finished (removed once it finishes)
      sessions.jsonl         # one line per invocation: wall time, problems computed, in flight
      summary.json           # accuracy, KV, tokens, throughput, versions (rewritten each session)

Invariants:
- `identity` holds everything that changes a problem's result (search config, policy, PRM,
  embedder, data set and its field mapping); the directory name is derived from it, so running
  the same command again finds the same directory. Problem selection (limit/offset/ids) and
  concurrency are not part of it: a larger --limit extends the same run.
- A problem file exists only when that problem is finished: it is written once, atomically
  (tmp file + os.replace), so a crash at any moment leaves either the whole file or none.
- A resumed run never recomputes a problem whose file exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

FORMAT = 1


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(x):
    if hasattr(x, "tolist"):  # numpy arrays and scalars
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def config_hash(identity: dict) -> str:
    canon = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(canon.encode()).hexdigest()[:8]


def run_name(identity: dict) -> str:
    s = identity["search"]
    return f"{s['strategy']}-w{s['width']}-{config_hash(identity)}"


def safe_name(problem_id: str) -> str:
    """A file name for a problem id; ids with other characters get a hash suffix so that two
    ids never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", problem_id)
    if safe != problem_id or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(problem_id.encode()).hexdigest()[:8]}"
    return safe


class RunMismatch(RuntimeError):
    """--resume DIR with a configuration that is not the one the directory was made with."""


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, root: str | Path, identity: dict, run: dict, resume: str | Path | None = None) -> RunDir:
        """The run directory for `identity` under `root` (or exactly `resume`), created or
        resumed. Raises RunMismatch when `resume` was made with another identity."""
        h = config_hash(identity)
        rd = cls(resume if resume is not None else Path(root) / run_name(identity))
        cfg_path = rd.path / "config.json"
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            if old.get("hash") != h:
                diff = _diff(old.get("identity", {}), json.loads(json.dumps(identity, default=_jsonable)))
                raise RunMismatch(f"{rd.path} was made with another configuration (hash {old.get('hash')} "
                                  f"!= {h}); differing: {diff}. Resume it with its own flags, or drop --resume "
                                  "to start a new run directory.")
        elif resume is not None and rd.path.exists() and any(rd.path.iterdir()):
            raise RunMismatch(f"{rd.path} is not a run directory (no config.json)")
        atomic_write_json(cfg_path, {"format": FORMAT, "name": rd.name, "hash": h, "identity": identity,
                                     "run": run})
        return rd

    def config(self) -> dict:
        p = self.path / "config.json"
        if not p.exists():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.json)")
        return json.loads(p.read_text())

    # -- problems -------------------------------------------------------------------------------
    def problem_path(self, problem_id: str) -> Path:
        return self.path / "problems" / f"{safe_name(problem_id)}.json"

    def is_done(self, problem_id: str) -> bool:
        return self.problem_path(problem_id).exists()

    def write_problem(self, record: dict) -> None:
        atomic_write_json(self.problem_path(record["id"]), record)
        err = self.error_path(record["id"])
        if err.exists():
            err.unlink()

    def load_problem(self, problem_id: str) -> dict:
        p = self.problem_path(problem_id)
        if not p.exists():
            ids = [r["id"] for r in self.iter_problems()][:5]
            raise KeyError(f"no finished problem {problem_id!r} in {self.path} (some ids: {ids})")
        return json.loads(p.read_text())

    def iter_problems(self) -> Iterator[dict]:
        """Finished problems, in file-name order."""
        d = self.path / "problems"
        if d.exists():
            for p in sorted(d.glob("*.json")):
                yield json.loads(p.read_text())

    # -- errors and sessions --------------------------------------------------------------------
    def error_path(self, problem_id: str) -> Path:
        return self.path / "errors" / f"{safe_name(problem_id)}.json"

    def write_error(self, problem_id: str, message: str) -> None:
        atomic_write_json(self.error_path(problem_id), {"id": problem_id, "error": message, "time": time.time()})

    def errors(self) -> list[dict]:
        d = self.path / "errors"
        return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.exists() else []

    def append_session(self, session: dict) -> None:
        # one short line per invocation; a torn last line (crash mid-append) is skipped on reading
        with open(self.path / "sessions.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(session) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def sessions(self) -> list[dict]:
        p = self.path / "sessions.jsonl"
        out = []
        if p.exists():
            for line in p.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.path / "summary.json", summary)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("ets", "torch", "transformers", "math-verify", "numpy", "scipy", "sentence-transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def summarize(records: list[dict], sessions: list[dict], n_selected: int | None = None,
              failed: int = 0) -> dict:
    """Run-level figures from the finished problems' records and the sessions' wall times.

    KV: `kv_mean` = mean over problems of each problem's mean-over-steps KV tokens; `kv_peak` =
    the largest per-problem peak (and `kv_peak_mean` their mean); the same for blocks.
    Throughput: problems and generated tokens computed in the sessions over those sessions' wall
    time, with `in_flight` = the largest concurrency used."""
    n = len(records)
    correct = sum(1 for r in records if r.get("correct"))

    def mean(key, sub="kv"):
        vals = [r[sub][key] for r in records if r.get(sub) and r[sub].get(key) is not None]
        return sum(vals) / len(vals) if vals else 0.0

    def peak(key, sub="kv"):
        return max((r[sub][key] for r in records if r.get(sub)), default=0)

    computed = sum(s.get("computed", 0) for s in sessions)
    wall = sum(s.get("wall_s", 0.0) for s in sessions if s.get("computed", 0))
    gen_session = sum(s.get("generated_tokens", 0) for s in sessions)
    embedders = sorted({t["info"]["embedder"] for r in records for t in r.get("trace", [])
                        if (t.get("info") or {}).get("embedder")})
    return {
        "problems": n, "selected": n_selected, "failed": failed, "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "kv_mean": mean("kv_mean"), "kv_peak": peak("kv_peak"), "kv_peak_mean": mean("kv_peak"),
        "kv_gen_mean": mean("kv_gen_mean"),
        "kv_blocks_mean": mean("kv_blocks_mean"), "kv_blocks_peak": peak("kv_blocks_peak"),
        "generated_tokens": sum(r["counters"].get("generated_tokens", 0) for r in records),
        "generated_tokens_mean": mean("generated_tokens", "counters"),
        "policy_calls": sum(r["counters"].get("policy_calls", 0) for r in records),
        "prm_calls": sum(r["counters"].get("prm_calls", 0) for r in records),
        "select_s": sum(r["counters"].get("select_s", 0.0) for r in records),
        "search_s": sum(r["counters"].get("wall_s", 0.0) for r in records),
        "wall_s": wall, "computed": computed,
        "problems_per_s": computed / wall if wall else 0.0,
        "tokens_per_s": gen_session / wall if wall else 0.0,
        "in_flight": max((s.get("concurrency", 1) for s in sessions), default=1),
        "embedder": ", ".join(embedders) or None,
    }
