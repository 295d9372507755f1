"""Checks of command-line input that need no model and no network, run before anything is made.

Contract: every check raises BadInput (a ValueError) whose one-line message names the flag and
the value and says what to pass instead; nothing is created, loaded or contacted. URLs are
shown with their credentials redacted (ets.engines.server.redact_url).
"""

from __future__ import annotations

import argparse
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
    """A well-formed http(s) URL with a host and a valid port (ets.prm.registry.check_url)."""
    from ets.prm.registry import SpecError, check_url

    try:
        check_url(url, flag)
    except SpecError as e:
        raise BadInput(str(e)) from None


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
    from ets.prm.registry import SpecError, check_model_config

    try:
        check_model_config(path, f"{flag} {spec}")
    except SpecError as e:
        raise BadInput(str(e)) from None


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


# Upper bounds of the sizes a user sets. Past them a run cannot be done on any machine this is
# for (a width-10^9 tree grows memory by ~20 MB/s and never gets to its first step), and a typo
# of a few zeros should say so at once instead of filling memory. flag -> (attribute, bound, why).
SIZE_LIMITS = {
    "--width": ("width", 4096, "the tree of one problem holds W paths at once; 4096 already needs "
                "thousands of sequences in flight"),
    "--max-tokens": ("max_tokens", 1 << 20, "tokens of one trajectory; no model's context is longer"),
    "--max-step-tokens": ("max_step_tokens", 1 << 20, "tokens of one step; no model's context is longer"),
    "--max-depth": ("max_depth", 100_000, "steps of one trajectory"),
    "--concurrency": ("concurrency", 4096, "problems in flight at once, each with its own tree"),
    "--kv-block-size": ("kv_block_size", 4096, "tokens per KV block"),
    "--kv-capacity": ("kv_capacity", 1 << 36, "KV tokens of the embedded engine"),
    "--max-requests": ("max_requests", 65_536, "HTTP requests in flight per server (each a socket)"),
    "--threads": ("threads", 4096, "torch threads"),
    "--samples": ("samples", 4096, "rollouts per problem"),
}


def check_sizes(a, widths=None) -> None:
    """Every size flag set on `a` (and each of `widths`) within its SIZE_LIMITS bound."""
    for flag, (attr, bound, why) in SIZE_LIMITS.items():
        values = widths if attr == "width" and widths is not None else [getattr(a, attr, None)]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and v > bound:
                shown = "--widths" if widths is not None and attr == "width" else flag
                raise BadInput(f"{shown} {v}: at most {bound} ({why}); give a smaller number")


def int_list(text: str, flag: str) -> list[int]:
    """A comma list of integers as given to `flag`: every entry a number, none empty."""
    parts = [x.strip() for x in str(text).split(",")]
    if any(not x for x in parts):
        raise BadInput(f"{flag} {text!r}: an empty entry; give integers separated by single commas (e.g. 4,8)")
    out = []
    for x in parts:
        try:
            out.append(int(x))
        except ValueError:
            raise BadInput(f"{flag} {text!r}: {x!r} is not an integer") from None
    return out


def flag_values(argv, flag: str) -> list[str]:
    """The raw values `flag` was given in `argv` (`FLAG V` or `FLAG=V`), in order."""
    argv, out = list(argv or []), []
    for i, x in enumerate(argv):
        if x == flag and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif x.startswith(flag + "="):
            out.append(x[len(flag) + 1:])
    return out


def check_method(method) -> None:
    """A parsed `--methods` entry (ets.experiment.Method): every parameter of a numeric field
    given a finite number (of the right kind)."""
    import typing
    from dataclasses import fields

    from ets.strategies import STRATEGIES

    cls = STRATEGIES[method.strategy].Config
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for k, v in method.params.items():
        t = hints.get(k) if k in names else None
        if t not in (int, float, int | None, float | None):
            continue
        if v is None and t in (int | None, float | None):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadInput(f"--methods {method.label}: {k}={v!r} is not a number; give e.g. {k}=1")
        if isinstance(v, float) and not math.isfinite(v):
            raise BadInput(f"--methods {method.label}: {k}={v!r} is not a finite number")
        if t in (int, int | None) and isinstance(v, float) and not v.is_integer():
            raise BadInput(f"--methods {method.label}: {k}={v!r} is not an integer")


def validate_compare_args(a, prm_specs, widths) -> None:
    """`ets compare`'s checks before anything is made: the policy, every PRM spec of the comma
    list, every width, the sizes (as `ets run`'s) and --runs-dir."""
    _check_policy(a.policy)
    for spec in prm_specs:
        _check_prm(spec)
    check_sizes(a, widths)
    _check_writable_dir(Path(a.runs_dir), "--runs-dir")


def validate_run_args(a) -> None:
    """Every check that needs no model and no network, so bad input fails before anything is
    made: --policy/--prm specs (URLs well formed; local models exist with a readable
    config.json), sizes within SIZE_LIMITS, --runs-dir writable, --resume an existing run
    directory, --device."""
    _check_policy(a.policy)
    _check_prm(a.prm)
    check_sizes(a)
    tok = getattr(a, "tokenizer", None)
    if tok is not None and not (Path(tok).expanduser() / "tokenizer_config.json").is_file():
        raise BadInput(f"--tokenizer {tok}: no tokenizer folder there (no tokenizer_config.json); give the local "
                       "folder of the served model's tokenizer")
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
