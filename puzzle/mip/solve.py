"""Solve the Puzzle MIP: the lowest-score child that meets the targets, and Pareto sweeps over targets.

Puzzle (Bercovich et al. 2024), section "MIP": binary x[i,a], y[i,f], exactly one attention and one FFN
variant per layer, minimise the summed replace-one-block scores subject to linear targets. Back-ends:
PuLP + CBC (default) and OR-Tools CP-SAT; both are deterministic and both see only undominated options
(`puzzle.mip.dominance`). Every answer is re-added and re-checked in plain Python before it is returned.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from puzzle.errors import ConfigError, InfeasibleError
from puzzle.mip.diagnose import diagnose
from puzzle.mip.dominance import pruned
from puzzle.mip.metrics import evaluate
from puzzle.mip.model import Backend, build_constraints, score_expr
from puzzle.mip.problem import Problem, Targets
from puzzle.mip.solution import Solution
from puzzle.mip.verify import read_choice, verify


def _missing(package: str, other: str) -> ConfigError:
    return ConfigError(f"solver {package!r} is not installed in this Python: pip install {package}, "
                       f"or set solve.solver: {other} (--solver {other})")


def _solve_pulp(*args, **kwargs):
    try:  # imported on use: a GPU image may lack one of the solvers
        from puzzle.mip.backend_pulp import solve_pulp
    except ModuleNotFoundError as err:
        raise _missing("pulp", "ortools") from err
    return solve_pulp(*args, **kwargs)


def _solve_ortools(*args, **kwargs):
    try:
        from puzzle.mip.backend_ortools import solve_ortools
    except ModuleNotFoundError as err:
        raise _missing("ortools", "pulp") from err
    return solve_ortools(*args, **kwargs)


BACKENDS: dict[str, Backend] = {"pulp": _solve_pulp, "ortools": _solve_ortools}


def solve(problem: Problem, targets: Targets, solver: str = "pulp", previous: Sequence[Solution] = ()) -> Solution:
    """The child with the smallest summed score that meets every target in `targets`.

    Args:
        problem: options per layer with their scores and costs (option 0 = the parent's variant).
        targets: absolute targets at one operating point; resolve "2x" with `parent_metrics` first.
        solver: "pulp" (CBC, default) or "ortools" (CP-SAT).
        previous: earlier solutions that `targets.diversity` keeps this one apart from.

    Raises:
        InfeasibleError (a TargetInfeasibleError): no child meets the targets; the message names the binding
            target(s) and the best value reachable, and `.binding` holds them.
        ConfigError: unknown solver, or previous solutions from another search space.
        SolverCheckError: the back-end's answer failed the plain-Python re-check (a bug).
    """
    if solver not in BACKENDS:
        raise ConfigError(f"solver {solver!r} is unknown; use one of {', '.join(BACKENDS)}")
    backend = pruned(BACKENDS[solver])
    constraints = build_constraints(problem, targets, previous)
    start = time.perf_counter()
    result = backend(score_expr(problem), constraints)
    elapsed = time.perf_counter() - start
    if result is None:
        raise diagnose(problem, targets, constraints, backend)
    attention, ffn = read_choice(problem, result)
    metrics = evaluate(problem, attention, ffn, batch_size=targets.batch_size, context_len=targets.context_len,
                       generate_tokens=targets.generate_tokens)
    verify(problem, targets, previous, result, metrics, (attention, ffn))
    return Solution(
        attention=attention,
        ffn=ffn,
        attention_names=tuple(layer.attention[a].name for layer, a in zip(problem.layers, attention, strict=True)),
        ffn_names=tuple(layer.ffn[f].name for layer, f in zip(problem.layers, ffn, strict=True)),
        **vars(metrics),
        targets=targets,
        solver=result.solver,
        solve_time_s=elapsed,
    )


def pareto_sweep(
    problem: Problem, targets: Sequence[Targets], solver: str = "pulp", previous: Sequence[Solution] = ()
) -> list[Solution | InfeasibleError]:
    """`solve` for each target in order; an infeasible point is returned as its error, not raised.

    Typical use: the same memory bound with throughput targets 1.5x, 2x, 2.5x ... of the parent, to draw the
    score-vs-speed front. Configuration errors still raise, since they would fail every point.
    """
    out: list[Solution | InfeasibleError] = []
    for point in targets:
        try:
            out.append(solve(problem, point, solver, previous))
        except InfeasibleError as error:
            out.append(error)
    return out
