"""docs/api.md's examples run as they are, and `ets` exposes what it says."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_every_example_runs(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "each example prints what it made"


def test_the_public_names_resolve_without_loading_torch():
    code = ("import sys, ets\n"
            "names = [n for n in ets.__all__ if n != '__version__']\n"
            "[getattr(ets, n) for n in names if n not in ('make_policy',)]\n"
            "assert 'torch' not in sys.modules, 'importing the API loaded torch'\n"
            "print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) >= 20


def test_the_version_is_the_packages():
    import tomllib

    import ets

    meta = tomllib.loads((DOC.parent.parent / "pyproject.toml").read_text())
    assert ets.__version__ == meta["project"]["version"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ets.nope  # noqa: B018
