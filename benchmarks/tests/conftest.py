"""Tests of the analysis code that only the benchmark scripts use (it lives beside them in
benchmarks/, not in the package): the scripts' folder is importable here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
