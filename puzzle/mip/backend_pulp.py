"""The default MIP back-end: PuLP with CBC, single-threaded and therefore deterministic.

CBC is the `cbc` on PATH (`pip install 'pulp[cbc]'`) or else the binary PuLP 3 bundles; it is driven through
`COIN_CMD`, since `PULP_CBC_CMD` is deprecated for PuLP 4.

Rows are shifted so every coefficient is >= 0 and divided by |upper|, so CBC's absolute tolerances act as
relative ones; they are set below the shared TOLERANCE (1e-9) so that any answer CBC accepts also passes the
plain-Python re-check. The objective is scaled to a span of 1e6, far above CBC's absolute optimality
tolerances, so its optimum matches CP-SAT's and brute force's to 1e-6 (see _OBJECTIVE_SPAN).
"""

from __future__ import annotations

from collections.abc import Sequence

import pulp
from pulp.apis import coin_api

from puzzle.errors import ConfigError
from puzzle.mip.model import BackendResult, Constraint, LinearExpr, SolverCheckError

SOLVER_NAME = "pulp-cbc"
# Tighter than CBC's defaults (1e-7 / 1e-6): a binary at 1 - 1e-6 could hide a 1e-6 relative overrun.
# CBC's tolerances are absolute (dual 1e-7, cutoff increment 1e-10): with an objective of span ~1, reduced-cost
# fixing dropped a 6e-7 better child on the 126-layer test; at span 1e6 such gaps are far above them.
_OBJECTIVE_SPAN = 1e6
_CBC_OPTIONS = ["primalTolerance 1e-10", "integerTolerance 1e-10", "preprocess off"]


def _cbc() -> pulp.COIN_CMD:
    command = pulp.COIN_CMD(msg=False, options=_CBC_OPTIONS)
    if command.available():
        return command
    bundled = getattr(coin_api, "pulp_cbc_path", None)
    if bundled and command.executable(bundled):
        return pulp.COIN_CMD(path=bundled, msg=False, options=_CBC_OPTIONS)
    raise ConfigError("CBC is not installed; run pip install 'pulp[cbc]' or pass solver='ortools'")


def _binary(model: pulp.LpProblem, name: str) -> pulp.LpVariable:
    if hasattr(model, "add_variable"):  # PuLP >= 3.3, where a bare LpVariable(...) is deprecated
        return model.add_variable(name, 0, 1, cat=pulp.LpBinary)
    return pulp.LpVariable(name, 0, 1, cat=pulp.LpBinary)


def _terms(expr: LinearExpr, x: list[list[pulp.LpVariable]], y: list[list[pulp.LpVariable]], scale: float
           ) -> list[tuple[pulp.LpVariable, float]]:
    """(variable, coefficient / scale) for every non-zero coefficient of `expr`."""
    return [
        (var, coef / scale)
        for rows, variables in ((expr.attention, x), (expr.ffn, y))
        for row, layer_vars in zip(rows, variables, strict=True)
        for coef, var in zip(row, layer_vars, strict=True)
        if coef
    ]


def solve_pulp(objective: LinearExpr, constraints: Sequence[Constraint]) -> BackendResult | None:
    """Minimise `objective` under `constraints` with one attention and one FFN option per layer."""
    model = pulp.LpProblem("puzzle_mip", pulp.LpMinimize)
    x = [[_binary(model, f"x_{i}_{a}") for a in range(len(row))] for i, row in enumerate(objective.attention)]
    y = [[_binary(model, f"y_{i}_{f}") for f in range(len(row))] for i, row in enumerate(objective.ffn)]
    for i, (layer_x, layer_y) in enumerate(zip(x, y, strict=True)):
        model += (pulp.lpSum(layer_x) == 1, f"one_attention_{i}")
        model += (pulp.lpSum(layer_y) == 1, f"one_ffn_{i}")
    shifted, offset = objective.shifted()
    scale = (shifted.span() or 1.0) / _OBJECTIVE_SPAN
    model += pulp.LpAffineExpression(_terms(shifted, x, y, scale))
    for j, constraint in enumerate(constraints):
        row, row_offset = constraint.expr.shifted()
        room = constraint.upper - row_offset
        if room < -constraint.slack_limit():
            return None  # even the cheapest option in every layer overruns this row
        row_scale = abs(constraint.upper) or 1.0
        terms = _terms(row, x, y, row_scale)
        if terms:
            model += (pulp.LpAffineExpression(terms) <= max(room, 0.0) / row_scale, f"target_{j}")
    status = model.solve(_cbc())
    if status == pulp.LpStatusInfeasible:
        return None
    if status != pulp.LpStatusOptimal or model.sol_status != pulp.LpSolutionOptimal:
        raise SolverCheckError(f"CBC ended with status {pulp.LpStatus[status]!r} on a model without limits")
    return BackendResult(
        attention=tuple(tuple(var.varValue or 0.0 for var in layer) for layer in x),
        ffn=tuple(tuple(var.varValue or 0.0 for var in layer) for layer in y),
        objective=offset + scale * (pulp.value(model.objective) or 0.0),
        solver=SOLVER_NAME,
    )
