"""Run directories: the full config, one file per finished problem, a summary; resumable.

Layout (see docs/harness.md):

    runs/<strategy>-w<width>-<hash8>/
      config.json            # {"name", "hash", "identity": {...}, "run": {...}}; hash = sha256(identity)[:8]
      problems/<id>.json     # one finished problem: tree, trace, counters, KV, answer, correct
      errors/<id>.json       # the last failure of a problem not finished (removed once it finishes)
      claims/<id>.claim      # a problem being computed now: {"pid", "host", "start", "time"}
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
- Two processes never compute the same problem: a problem is claimed (claims/<id>.claim,
  created with O_EXCL) before it starts and released after; a claim whose process is dead
  (same host: no such pid, or another process now has that pid) is taken over, and so is a claim
  of another host whose heartbeat stopped: a holder touches its claims every HEARTBEAT_S (a
  daemon thread, so a busy event loop does not stop it), and a claim marked "heartbeat" that has
  not been touched for HEARTBEAT_STALE_S is a dead host's. A claim without the mark (made before
  heartbeats) is taken over after CLAIM_STALE_S.
- config.json is written once, when the directory is made; it is never rewritten.
- A problem file that cannot be read (corrupt) is moved aside (renamed *.corrupt-<time>) by
  `prepare`, so `ets run` recomputes it; readers (`iter_problems`) skip it with a warning.
- Files are created with the process umask (like any `open`), not mkstemp's 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

FORMAT = 1
CLAIM_STALE_S = 6 * 3600  # a claim of another host without a heartbeat, older than this, is taken over
HEARTBEAT_S = 20.0  # how often a holder touches its claims
HEARTBEAT_STALE_S = 180.0  # a heartbeat claim untouched this long is a dead host's
MAX_NAME = 200  # longest problem file stem (file systems allow 255 bytes)
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class RunFileError(ValueError):
    """A run file (config.json, a problem file) that cannot be read; the message names it."""


def read_json(path: Path):
    """The JSON in `path`; RunFileError naming the file when it is not valid UTF-8 JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFileError(f"{path}: not valid JSON ({e}); move it away or delete it") from e


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a
    part. The file gets the permissions `open` would give it (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


NAMED_BY = "named_by.json"  # in a run directory adopted under a newer naming (RunDir.prepare's legacy)


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
    if safe != problem_id or safe.startswith(".") or len(safe) > MAX_NAME:
        safe = f"{safe.lstrip('.')[:MAX_NAME]}-{hashlib.sha1(problem_id.encode()).hexdigest()[:8]}"
    return safe


class RunMismatch(RuntimeError):
    """--resume DIR with a configuration that is not the one the directory was made with."""


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.claimed_elsewhere: dict[str, dict] = {}  # problem id -> the live claim that kept us off

    @property
    def name(self) -> str:
        return self.path.name

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, root: str | Path, identity: dict, run: dict, resume: str | Path | None = None,
                legacy: dict | None = None) -> RunDir:
        """The run directory for `identity` under `root` (or exactly `resume`), created or
        resumed. Raises RunMismatch when `resume` was made with another identity.
        legacy: the identity the same run had under an older naming (a served policy named by its
        URL, before runs were named by model): when only that directory exists it is resumed,
        and the new identity is recorded in its NAMED_BY file, so that another model on the same
        URL, later, is refused there instead of mixed in."""
        h = config_hash(identity)
        rd = cls(resume if resume is not None else Path(root) / run_name(identity))
        if resume is None and legacy is not None and not (rd.path / "config.json").exists():
            old = cls(Path(root) / run_name(legacy))
            if (old.path / "config.json").exists() and old.config().get("hash") == config_hash(legacy):
                return old._adopt(identity, h)
        cfg_path = rd.path / "config.json"
        if cfg_path.exists():
            old = rd.config()
            if old.get("hash") != h:
                diff = _diff(old.get("identity", {}), _redacted(identity))
                raise RunMismatch(f"{rd.path} was made with another configuration (hash {old.get('hash')} "
                                  f"!= {h}); differing: {diff}. Resume it with its own flags, or drop --resume "
                                  "to start a new run directory.")
            rd.quarantine_corrupt()
            return rd  # written once, when made: never rewritten
        elif resume is not None and rd.path.exists() and any(rd.path.iterdir()):
            raise RunMismatch(f"{rd.path} is not a run directory (no config.json)")
        # the hash (hence the name) is of the identity as given; the file never holds URL credentials
        atomic_write_json(cfg_path, {"format": FORMAT, "name": rd.name, "hash": h, "identity": _redacted(identity),
                                     "run": _redacted(run)})
        return rd

    def _adopt(self, identity: dict, h: str) -> RunDir:
        named = self.path / NAMED_BY
        if named.exists():
            was = read_json(named)
            if was.get("hash") != h:
                diff = _diff(was.get("identity", {}), _redacted(identity))
                raise RunMismatch(f"{self.path} (named by its policy URL) was resumed with another model before "
                                  f"({diff}); this model gets its own run: move that directory aside, or serve "
                                  "the model it was made with")
        else:
            atomic_write_json(named, {"hash": h, "identity": _redacted(identity)})
            warn(f"resuming {self.path}: named by its policy URL before runs were named by model; "
                 f"recorded this model in {NAMED_BY}")
        self.quarantine_corrupt()
        return self

    def config(self) -> dict:
        """config.json, checked for the shape every reader relies on; FileNotFoundError when
        absent, RunFileError naming the file when unreadable or of the wrong shape."""
        p = self.path / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.json)")
        cfg = read_json(p)
        search = cfg.get("identity", {}).get("search") if isinstance(cfg, dict) and isinstance(
            cfg.get("identity"), dict) else None
        if not isinstance(search, dict) or not isinstance(search.get("strategy"), str) or "width" not in search \
                or not isinstance(cfg.get("hash"), str):
            raise RunFileError(f"{p}: not an ets run config (expected {{\"hash\", \"identity\": {{\"search\": "
                               "{\"strategy\", \"width\", ...}}}}); is this a run directory?")
        return cfg

    def quarantine_corrupt(self) -> list[Path]:
        """Move every unreadable problem file aside (renamed <file>.corrupt-<time>, kept) so the
        problem runs again; returns the new paths. A warning names each."""
        moved = []
        d = self.path / "problems"
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                rec = read_json(p)
                if not isinstance(rec, dict) or "id" not in rec or "tree" not in rec:
                    raise RunFileError(f"{p}: not a problem record")
            except (RunFileError, OSError) as e:
                new = p.with_name(f"{p.name}.corrupt-{int(time.time())}")
                try:
                    os.replace(p, new)
                except OSError:
                    continue  # read-only: readers skip it anyway
                warn(f"{e}: moved aside to {new.name}; the problem will be computed again")
                moved.append(new)
        return moved

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
        """The record of a finished problem: KeyError when there is none, RunFileError naming
        the file when it cannot be read."""
        p = self.problem_path(problem_id)
        if not p.exists():
            ids = [r["id"] for r in self.iter_problems()][:5]
            raise KeyError(f"no finished problem {problem_id!r} in {self.path} (some ids: {ids})")
        return read_json(p)

    def iter_problems(self) -> Iterator[dict]:
        """Finished problems, in file-name order; an unreadable file is skipped with a warning
        that names it."""
        d = self.path / "problems"
        if d.exists():
            for p in sorted(d.glob("*.json")):
                try:
                    rec = read_json(p)
                except (RunFileError, OSError) as e:
                    warn(f"skipped {e}")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or "tree" not in rec:
                    warn(f"skipped {p}: not a problem record")
                    continue
                yield rec

    # -- claims ---------------------------------------------------------------------------------
    def claim_path(self, problem_id: str) -> Path:
        return self.path / "claims" / f"{safe_name(problem_id)}.claim"

    def claim(self, problem_id: str) -> bool:
        """Claim `problem_id` for this process. False when it is finished, or claimed by a live
        process (recorded in `claimed_elsewhere`). A stale claim (see the module docstring) is
        taken over; the takeover itself is serialised by an O_EXCL lock file."""
        path = self.claim_path(problem_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if _create_exclusive(path, json.dumps(_me())):
                if self.is_done(problem_id):  # finished by another process before we claimed
                    self.release(problem_id)
                    return False
                _HEARTBEAT.hold(path)
                return True
            holder = _read_claim(path)
            if holder is not None and not _stale(holder, path):
                self.claimed_elsewhere[problem_id] = holder
                return False
            lock = path.with_name(path.name + ".takeover")
            if _create_exclusive(lock, json.dumps(_me())):
                try:
                    if _read_claim(path) == holder:  # still the stale one: remove it
                        path.unlink(missing_ok=True)
                finally:
                    lock.unlink(missing_ok=True)
            else:
                _drop_if_old(lock, 60.0)  # a taker-over that died mid-takeover
                time.sleep(0.05)
        return False

    def release(self, problem_id: str) -> None:
        """Drop this process's claim on `problem_id` (another process's claim is left alone)."""
        path = self.claim_path(problem_id)
        _HEARTBEAT.drop(path)
        holder = _read_claim(path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            path.unlink(missing_ok=True)

    # -- errors and sessions --------------------------------------------------------------------
    def error_path(self, problem_id: str) -> Path:
        return self.path / "errors" / f"{safe_name(problem_id)}.json"

    def write_error(self, problem_id: str, message: str) -> None:
        atomic_write_json(self.error_path(problem_id), {"id": problem_id, "error": message, "time": time.time()})

    def errors(self) -> list[dict]:
        """Recorded failures; an unreadable error file is skipped."""
        d = self.path / "errors"
        out = []
        for p in sorted(d.glob("*.json")) if d.exists() else []:
            try:
                rec = read_json(p)
            except (RunFileError, OSError):
                continue
            if isinstance(rec, dict) and "id" in rec:
                out.append(rec)
        return out

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


def _redacted(obj):
    """A JSON copy of `obj` with every URL's credentials replaced (http://user:pw@h -> http://***@h)."""
    from ets.http import redact_url

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return redact_url(x) if isinstance(x, str) else x

    return walk(json.loads(json.dumps(obj, default=_jsonable)))


def _proc_start(pid: int) -> str | None:
    """Start time of process `pid` (Linux /proc; None elsewhere or when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
            "time": time.time(), "heartbeat": HEARTBEAT_S}


class _Heartbeat:
    """Touches every claim this process holds, every HEARTBEAT_S, from a daemon thread that runs
    while any is held."""

    def __init__(self):
        self.held: set[Path] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def hold(self, path: Path) -> None:
        with self.lock:
            self.held.add(path)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="ets-claims", daemon=True)
                self.thread.start()

    def drop(self, path: Path) -> None:
        with self.lock:
            self.held.discard(path)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:
                if not self.held:
                    self.thread = None
                    return
                paths = list(self.held)
            for p in paths:
                try:
                    os.utime(p)
                except OSError:  # released meanwhile, or the directory went away
                    pass


_HEARTBEAT = _Heartbeat()


def _create_exclusive(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists (atomic: O_CREAT | O_EXCL)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _read_claim(path: Path) -> dict | None:
    """A claim's content; {} for an unreadable one (being written, or torn); None when absent."""
    try:
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _stale(holder: dict, path: Path) -> bool:
    """Whether a claim's process is gone (see the module docstring)."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid():
            return False
        start = _proc_start(pid)
        if start is None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        return holder.get("start") is not None and start != holder["start"]  # pid reused
    try:  # another host, or a torn claim: by the age of its last heartbeat (or of the claim)
        limit = HEARTBEAT_STALE_S if holder.get("heartbeat") else CLAIM_STALE_S if holder else 60.0
        return time.time() - path.stat().st_mtime > limit
    except FileNotFoundError:
        return True


def _drop_if_old(path: Path, age_s: float) -> None:
    try:
        if time.time() - path.stat().st_mtime > age_s:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


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
    time, with `in_flight` = the largest concurrency used. Compute (ets.measures.compute_summary,
    tolerating records made before it): prompt/prefilled/PRM tokens and FLOPs, totals and per
    problem, parameter counts, latency_p50/p90/p99 over the problems' wall times."""
    from ets.measures import compute_summary

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
        **compute_summary(records),
    }
