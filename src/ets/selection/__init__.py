"""The ETS selection program (SPEC 2.5): build it, solve it exactly in-process, check it."""

from ets.selection.program import SelectionProblem, build_problem, InfeasibleSelection
from ets.selection.solve import Solution, fix_variables, solve, solve_milp

__all__ = ["SelectionProblem", "build_problem", "solve", "solve_milp", "fix_variables", "Solution",
           "InfeasibleSelection"]
