"""Checks of command-line input that need no model and no network, run before anything is made.

Contract: every check raises BadInput (a ValueError) whose one-line message names the flag and
the value and says what to pass instead; nothing is created, loaded or contacted. URLs are
shown with their credentials redacted (ets.engines.server.redact_url).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


class BadInput(ValueError):
    """A command-line value or input file that cannot be used; the message says what to do."""


def finite(text: str) -> float:
    """argparse type for float flags: finite numbers only (NaN and infinities would be written to
    config.json as invalid JSON)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return x


def seconds(text: str) -> float:
    """argparse type: a positive finite number of seconds."""
    x = finite(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return x


def clock_time(text: str, now: float | None = None) -> float:
    """argparse type of `--admit-until`: "HH:MM" (UTC; today's, or tomorrow's when today's has
    passed) or "YYYY-MM-DDTHH:MM" (UTC) as a Unix time."""
    import calendar
    import time

    now = time.time() if now is None else now
    try:
        if "T" in text:
            return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M")))
        hm = time.strptime(text, "%H:%M")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give HH:MM or YYYY-MM-DDTHH:MM (UTC)") from None
    day = now - now % 86400
    t = day + hm.tm_hour * 3600 + hm.tm_min * 60
    return float(t if t > now else t + 86400)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: ... (see `ets VERB --help`)`, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def safe(text) -> str:
    """`text` with URL credentials redacted."""
    from ets.http import redact_url

    return redact_url(str(text))


def _check_url(url: str, flag: str) -> None:
    import httpx

    try:
        u = httpx.URL(url)
        port = u.port
    except Exception as e:  # noqa: BLE001  (httpx raises several kinds for bad URLs)
        raise BadInput(f"{flag}: {safe(url)!r} is not a valid URL ({safe(e)}); use http://HOST:PORT") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise BadInput(f"{flag}: {safe(url)!r} is not an http(s) URL with a host; use http://HOST:PORT")
    if port is not None and not 0 < port < 65536:
        raise BadInput(f"{flag}: port {port} out of range in {safe(url)!r}")


def _check_model_dir(path: Path, flag: str, spec: str) -> None:
    """A local model: a folder with a readable config.json naming its model_type, or a .gguf file."""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BadInput(f"{flag} {spec}: no such GGUF file")
        return
    if not path.is_dir():
        raise BadInput(f"{flag} {spec}: no such model folder or file. Use a local model folder or .gguf file "
                       "(models are never downloaded), or: " + ("default, mock, http://HOST:PORT"
                                                                if flag == "--policy" else
                                                                "a PRM spec (see `ets prms`)"))
    cfg = path / "config.json"
    if not cfg.is_file():
        raise BadInput(f"{flag} {spec}: {path} has no config.json, so it is not a transformers model folder")
    try:
        obj = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{flag} {spec}: {cfg} is not valid JSON ({e}); fix or replace the model folder") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model_type"), str):
        raise BadInput(f"{flag} {spec}: {cfg} names no model_type; it is not a transformers model config")


def _check_policy(spec: str) -> None:
    if spec in ("default", "mock"):
        return
    if "://" in spec:
        for u in [x.strip() for x in spec.split(",") if x.strip()] or [spec]:
            _check_url(u, "--policy")
        return
    if "," not in spec and ":" in spec and spec.rsplit(":", 1)[1].isdigit() and not Path(spec).exists():
        raise BadInput(f"--policy {spec}: a server address needs its scheme: --policy http://{spec}")
    _check_model_dir(Path(spec).expanduser(), "--policy", spec)


def _check_prm(spec: str) -> None:
    """--prm: a spec the PRM registry can parse, whose target exists (ets.prm.registry.check)."""
    from ets.prm import registry

    try:
        registry.check(registry.parse(spec))
    except registry.SpecError as e:
        msg = str(e)
        raise BadInput(safe(msg if msg.startswith("--prm") else f"--prm {spec}: {msg}")) from None


def _check_writable_dir(path: Path, flag: str) -> None:
    """`path` is, or can be made as, a directory this process may write in."""
    if path.exists() and not path.is_dir():
        raise BadInput(f"{flag} {path}: is a file, not a directory; give a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"{flag} {path}: {probe} is a file, so the directory cannot be made")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {path}: {probe} is not writable; choose another directory")


def validate_run_args(a) -> None:
    """Every check that needs no model and no network, so bad input fails before anything is
    made: --policy/--prm specs (URLs well formed; local models exist with a readable
    config.json), --runs-dir writable, --resume an existing run directory, --device."""
    _check_policy(a.policy)
    _check_prm(a.prm)
    _check_writable_dir(Path(a.runs_dir), "--runs-dir")
    resume = getattr(a, "resume", None)
    if resume is not None:
        r = Path(resume)
        if not r.exists():
            raise BadInput(f"--resume {resume}: no such run directory; drop --resume to start a new run")
        if not r.is_dir():
            raise BadInput(f"--resume {resume}: is a file; give a run directory (runs/<strategy>-w<width>-<hash>)")
        if not (r / "config.json").is_file():
            raise BadInput(f"--resume {resume}: not a run directory (no config.json)")
    if a.device:
        try:
            import torch

            torch.device(a.device)
        except ImportError:
            pass
        except (RuntimeError, ValueError):
            raise BadInput(f"--device {a.device}: not a device name; use cpu, cuda or cuda:N") from None
