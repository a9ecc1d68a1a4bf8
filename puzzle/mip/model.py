"""The linear model every back-end solves: additive per-layer costs and `<=` rows over binary choices.

Variables are x[i,a] (attention option a in layer i) and y[i,f] (FFN option f), exactly one of each per
layer. Every target of `Targets` becomes one row `sum c[i,a] x[i,a] + sum d[i,f] y[i,f] + constant <= upper`
(Puzzle, section "MIP"); a `>=` target is negated or inverted (throughput T becomes decode time <= B / T).
A row holds when its left side is within TOLERANCE (relative to |upper|) of `upper`; the back-ends and the
plain-Python check in `puzzle.mip.verify` share that rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from puzzle.errors import ConfigError
from puzzle.mip.problem import LayerOptions, Option, Problem, Targets
from puzzle.mip.solution import Solution

TOLERANCE = 1e-9  # relative; float sums of a few hundred measured times are exact far below this


class SolverCheckError(RuntimeError):
    """A back-end answered something the plain-Python re-check rejects: a bug, not a user error."""


@dataclass(frozen=True, kw_only=True)
class LinearExpr:
    """sum_i attention[i][x_i] + ffn[i][y_i] + constant, for one choice (x_i, y_i) per layer."""

    attention: tuple[tuple[float, ...], ...]
    ffn: tuple[tuple[float, ...], ...]
    constant: float = 0.0
    integral: bool = False  # every coefficient and the constant is an int (bytes, counts): solve exactly

    def value(self, attention: Sequence[int], ffn: Sequence[int]) -> float:
        terms = [row[i] for row, i in zip(self.attention, attention, strict=True)]
        terms += [row[i] for row, i in zip(self.ffn, ffn, strict=True)]
        return self.constant + (sum(terms) if self.integral else math.fsum(terms))

    def layer_minima(self) -> list[float]:
        """Smallest attention plus smallest FFN coefficient of each layer."""
        return [min(a) + min(f) for a, f in zip(self.attention, self.ffn, strict=True)]

    def min_value(self) -> float:
        """The smallest value over all choices (the terms are independent across layers)."""
        minima = self.layer_minima()
        return self.constant + (sum(minima) if self.integral else math.fsum(minima))

    def shifted(self) -> tuple[LinearExpr, float]:
        """(expr with each row's minimum subtracted, so all coefficients are >= 0; the removed offset)."""
        def shift(rows: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
            return tuple(tuple(c - low for c in row) for row, low in ((row, min(row)) for row in rows))

        shifted = LinearExpr(attention=shift(self.attention), ffn=shift(self.ffn), integral=self.integral)
        return shifted, self.min_value()

    def span(self) -> float:
        """Largest value minus smallest value over all choices."""
        spans = [max(a) - min(a) + max(f) - min(f) for a, f in zip(self.attention, self.ffn, strict=True)]
        return sum(spans) if self.integral else math.fsum(spans)


@dataclass(frozen=True, kw_only=True)
class Constraint:
    """expr <= upper, named after the `Targets` field it comes from ("diversity[k]" for previous solution k)."""

    name: str
    expr: LinearExpr
    upper: float

    def slack_limit(self) -> float:
        """How far above `upper` the left side may go and still count as holding."""
        return TOLERANCE * abs(self.upper)


def _expr(
    problem: Problem, cost: Callable[[Option], float], constant: float = 0.0, integral: bool = False
) -> LinearExpr:
    def rows(kind: str) -> tuple[tuple[float, ...], ...]:
        layers: Sequence[LayerOptions] = problem.layers
        return tuple(tuple(cost(option) for option in getattr(layer, kind)) for layer in layers)

    return LinearExpr(attention=rows("attention"), ffn=rows("ffn"), constant=constant, integral=integral)


def score_expr(problem: Problem) -> LinearExpr:
    """The objective: summed quality costs."""
    return _expr(problem, lambda option: option.score)


def _diversity_expr(problem: Problem, previous: Solution) -> LinearExpr:
    def rows(kind: str, chosen: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        return tuple(
            tuple(int(index == choice) for index in range(len(getattr(layer, kind))))
            for layer, choice in zip(problem.layers, chosen, strict=True)
        )

    return LinearExpr(attention=rows("attention", previous.attention), ffn=rows("ffn", previous.ffn), integral=True)


def check_previous(problem: Problem, targets: Targets, previous: Sequence[Solution]) -> None:
    """Previous solutions must come from this search space and need a diversity target to matter."""
    if previous and targets.diversity is None:
        raise ConfigError("previous solutions were given but targets.diversity is None; set a DiversityTarget")
    for k, solution in enumerate(previous):
        if not isinstance(solution, Solution) or solution.num_layers != problem.num_layers:
            raise ConfigError(
                f"previous solution {k} is not a Solution of {problem.num_layers} layers; pass this problem's"
            )
        for i, layer in enumerate(problem.layers):
            for kind, index, name in (
                ("attention", solution.attention[i], solution.attention_names[i]),
                ("ffn", solution.ffn[i], solution.ffn_names[i]),
            ):
                options = getattr(layer, kind)
                if not 0 <= index < len(options) or options[index].name != name:
                    raise ConfigError(
                        f"previous solution {k}: layer {i} {kind} {name!r} is not option {index} of this search "
                        "space; pass solutions of this problem"
                    )


def build_constraints(problem: Problem, targets: Targets, previous: Sequence[Solution] = ()) -> tuple[Constraint, ...]:
    """One `<=` row per target that is set (and per previous solution for diversity)."""
    check_previous(problem, targets, previous)
    rows: list[Constraint] = []
    decode = _expr(problem, lambda option: option.decode_time_s, problem.fixed_decode_time_s)
    if targets.min_throughput is not None:
        rows.append(Constraint(name="min_throughput", expr=decode, upper=targets.batch_size / targets.min_throughput))
    if targets.max_latency_s is not None:
        steps = targets.generate_tokens
        assert steps is not None  # Targets checks this
        latency = _expr(
            problem,
            lambda option: option.prefill_time_s + steps * option.decode_time_s,
            problem.fixed_prefill_time_s + steps * problem.fixed_decode_time_s,
        )
        rows.append(Constraint(name="max_latency_s", expr=latency, upper=targets.max_latency_s))
    if targets.max_memory_bytes is not None:
        context, batch = targets.context_len, targets.batch_size
        assert context is not None  # Targets checks this
        memory = _expr(
            problem,
            lambda option: option.param_bytes + batch * (option.kv_bytes_per_token * option.kv_tokens(context)
                                                         + option.state_bytes),
            problem.fixed_param_bytes,
            integral=True,
        )
        rows.append(Constraint(name="max_memory_bytes", expr=memory, upper=targets.max_memory_bytes))
    if targets.max_kv_bytes_per_token is not None:
        kv = _expr(problem, lambda option: option.kv_bytes_per_token, integral=True)
        rows.append(Constraint(name="max_kv_bytes_per_token", expr=kv, upper=targets.max_kv_bytes_per_token))
    if targets.min_attention_layers is not None:
        fewer = _expr(problem, lambda option: -int(option.has_attention), integral=True)
        rows.append(Constraint(name="min_attention_layers", expr=fewer, upper=-targets.min_attention_layers))
    if targets.max_attention_layers is not None:
        count = _expr(problem, lambda option: int(option.has_attention), integral=True)
        rows.append(Constraint(name="max_attention_layers", expr=count, upper=targets.max_attention_layers))
    if targets.diversity is not None:
        most_shared = targets.diversity.max_shared_fraction * 2 * problem.num_layers
        for k, solution in enumerate(previous):
            rows.append(Constraint(name=f"diversity[{k}]", expr=_diversity_expr(problem, solution), upper=most_shared))
    return tuple(rows)


@dataclass(frozen=True, kw_only=True)
class BackendResult:
    """What a back-end found: the value of every x[i,a] and y[i,f], and its objective value."""

    attention: tuple[tuple[float, ...], ...]
    ffn: tuple[tuple[float, ...], ...]
    objective: float  # in the units of the objective expr, constant included
    solver: str  # e.g. "pulp-cbc"


# A back-end minimises `objective` subject to `constraints` and one choice per layer; None = infeasible.
Backend = Callable[[LinearExpr, Sequence[Constraint]], "BackendResult | None"]
