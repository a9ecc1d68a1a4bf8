"""MIP stage of Puzzle: choose one attention and one FFN variant per layer under deployment targets.

    from puzzle.mip import Option, LayerOptions, Problem, Targets, solve
    solution = solve(problem, Targets(batch_size=64, min_throughput=5200.0), solver="pulp")

Modules: problem (inputs), metrics (plain-Python costs), solution (versioned JSON result), model (linear
rows), dominance (option pruning), backend_pulp / backend_ortools, verify (re-check), diagnose
(infeasible targets), solve.
"""

from puzzle.mip.diagnose import BindingTarget, TargetInfeasibleError
from puzzle.mip.metrics import Metrics, evaluate, parent_metrics
from puzzle.mip.model import SolverCheckError
from puzzle.mip.problem import DiversityTarget, LayerOptions, Option, Problem, Targets
from puzzle.mip.solution import Solution
from puzzle.mip.solve import BACKENDS, pareto_sweep, solve

__all__ = [
    "BACKENDS",
    "BindingTarget",
    "DiversityTarget",
    "LayerOptions",
    "Metrics",
    "Option",
    "Problem",
    "Solution",
    "SolverCheckError",
    "TargetInfeasibleError",
    "Targets",
    "evaluate",
    "parent_metrics",
    "pareto_sweep",
    "solve",
]
