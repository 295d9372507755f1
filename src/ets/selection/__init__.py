"""The ETS selection program (SPEC 2.5): build it, solve it exactly in-process, check it."""

from ets.selection.program import SelectionProblem, build_problem, InfeasibleSelection
from ets.selection.solve import solve

__all__ = ["SelectionProblem", "build_problem", "solve", "InfeasibleSelection"]
