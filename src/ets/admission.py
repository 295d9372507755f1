"""When a run stops starting problems (the ones running finish): at `--admit-until` (a time set in
advance) or from the moment close() is called (`kill -USR1 PID` under the CLI). A problem cut off
mid-search is lost (trees are saved whole), so a run that must end at a known time closes
admission early enough for the problems in flight to finish. Imported by the CLI at start-up:
keep it free of heavy imports."""

from __future__ import annotations

import time

_closed_at: list[float] = []  # when close() was first called in this process
_announced: set[float] = set()  # deadlines already reported on stderr


def close() -> None:
    """From now on no problem starts in this process. Only sets a flag: a signal handler may call it."""
    if not _closed_at:
        _closed_at.append(time.time())


def deadline(admit_until: float | None) -> float | None:
    """The earliest of `admit_until` and the time close() was called (None: admission open)."""
    return min([t for t in (admit_until, *_closed_at) if t is not None], default=None)


def first_notice(until: float) -> bool:
    """True the first time `until` is asked about in this process (to say it once, not per call)."""
    if until in _announced:
        return False
    _announced.add(until)
    return True


def reopen() -> None:
    """Admission open again (the CLI calls it as each command starts)."""
    _closed_at.clear()
