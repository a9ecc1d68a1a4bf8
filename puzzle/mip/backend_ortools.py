"""The OR-Tools MIP back-end: CP-SAT on an integer-scaled copy of the model, exact in integer arithmetic.

CP-SAT needs integer coefficients; the scaling is chosen so that it returns the same optimum as CBC:
- Byte and count rows are integers already and are passed unchanged.
- Time rows are shifted to >= 0, multiplied by s = 8 (L + 1) / (TOLERANCE |upper|) and rounded *up*, and their
  right side (upper + TOLERANCE |upper|, times s) is rounded down. A choice CP-SAT accepts therefore meets the
  real row within the shared tolerance, and a choice that meets it exactly is always accepted: its 2L rounded
  terms plus the right side lose at most 2L + 1 units of the 8 (L + 1) that the tolerance band is wide.
- The objective is shifted to >= 0 and scaled to 2^50 units over its span, rounded to nearest: a child's
  scaled score is off by at most L units, so the optimum is exact to about L * 2^-49 of the span (2e-13 for
  L = 126), far inside the 1e-6 at which the tests compare back-ends.
One worker keeps the answer deterministic, ties included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ortools.sat.python import cp_model

from puzzle.mip.model import TOLERANCE, BackendResult, Constraint, LinearExpr, SolverCheckError

SOLVER_NAME = "ortools-cp-sat"
_OBJECTIVE_UNITS = 2**50  # objective span in integer units
_EXACT_LIMIT = 2**53  # integral rows whose values stay below this are passed unscaled
_INT64_ROOM = 2**60  # scaled rows stay below this, so CP-SAT's int64 sums cannot overflow


def _int_rows(expr: LinearExpr, scale: float | None, rounding) -> tuple[list[list[int]], list[list[int]]]:
    def convert(rows: tuple[tuple[float, ...], ...]) -> list[list[int]]:
        if scale is None:
            return [[int(c) for c in row] for row in rows]
        return [[int(rounding(c * scale)) for c in row] for row in rows]

    return convert(expr.attention), convert(expr.ffn)


def _weighted(coefs: tuple[list[list[int]], list[list[int]]], x, y) -> cp_model.LinearExpr:
    variables, weights = [], []
    for rows, layer_vars in zip(coefs, (x, y), strict=True):
        for row, row_vars in zip(rows, layer_vars, strict=True):
            for coef, var in zip(row, row_vars, strict=True):
                if coef:
                    variables.append(var)
                    weights.append(coef)
    return cp_model.LinearExpr.weighted_sum(variables, weights)


def _add_row(model: cp_model.CpModel, constraint: Constraint, x, y) -> bool:
    """Add one `<=` row; False when it cannot hold for any choice."""
    row, offset = constraint.expr.shifted()
    room = constraint.upper - offset + constraint.slack_limit()
    if room < 0:
        return False
    span = row.span()
    if row.integral and span + room < _EXACT_LIMIT:
        coefs, rhs = _int_rows(row, None, round), math.floor(room)
    else:
        layers = len(row.attention)
        scale = 8 * (layers + 1) / (TOLERANCE * abs(constraint.upper)) if constraint.upper else math.inf
        scale = min(scale, _INT64_ROOM / max(span + room, 1e-300))
        coefs, rhs = _int_rows(row, scale, math.ceil), math.floor(room * scale)
    model.add(_weighted(coefs, x, y) <= rhs)
    return True


def solve_ortools(objective: LinearExpr, constraints: Sequence[Constraint]) -> BackendResult | None:
    """Minimise `objective` under `constraints` with one attention and one FFN option per layer."""
    model = cp_model.CpModel()
    x = [[model.new_bool_var(f"x_{i}_{a}") for a in range(len(row))] for i, row in enumerate(objective.attention)]
    y = [[model.new_bool_var(f"y_{i}_{f}") for f in range(len(row))] for i, row in enumerate(objective.ffn)]
    for layer_x, layer_y in zip(x, y, strict=True):
        model.add_exactly_one(layer_x)
        model.add_exactly_one(layer_y)
    for constraint in constraints:
        if not _add_row(model, constraint, x, y):
            return None
    shifted, offset = objective.shifted()
    span = shifted.span()
    if shifted.integral and span < _EXACT_LIMIT:
        scale, coefs = 1.0, _int_rows(shifted, None, round)
    else:
        scale = _OBJECTIVE_UNITS / span if span else 1.0
        coefs = _int_rows(shifted, scale, round)
    model.minimize(_weighted(coefs, x, y))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE:
        return None
    if status != cp_model.OPTIMAL:
        raise SolverCheckError(f"CP-SAT ended with status {solver.status_name(status)} on a model without limits")
    return BackendResult(
        attention=tuple(tuple(float(solver.value(var)) for var in layer) for layer in x),
        ffn=tuple(tuple(float(solver.value(var)) for var in layer) for layer in y),
        objective=offset + solver.objective_value / scale,
        solver=SOLVER_NAME,
    )
