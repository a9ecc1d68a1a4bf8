"""Why a target set is infeasible: the binding target(s) and the best value reachable for each.

A target is binding when dropping it makes the rest feasible; its best reachable value is the optimum of
its own metric under the other targets (fastest child for a throughput target, smallest for a memory
target, ...). When no single target is to blame, the targets that fail even alone are reported with the
best value over the whole search space. The message is one line and says which flag to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from puzzle.errors import InfeasibleError
from puzzle.mip.metrics import Metrics, parent_metrics
from puzzle.mip.model import Backend, Constraint, SolverCheckError
from puzzle.mip.problem import Problem, Targets
from puzzle.mip.verify import read_choice


@dataclass(frozen=True, kw_only=True)
class BindingTarget:
    """One target that cannot be met, with the best value of its metric that can."""

    name: str  # the Targets field ("min_throughput", ...) or "diversity[k]" for previous solution k
    bound: float  # the target in its own units (tokens/s, s, bytes, bytes/token, layers, shared sub-blocks)
    best: float  # best value of that metric reachable, same units
    parent: float | None  # the parent's value of that metric, when it has one
    under_other_targets: bool  # best is under all other targets (True) or over the whole search space


class TargetInfeasibleError(InfeasibleError):
    """InfeasibleError that also carries the binding targets for programs (the CLI shows the message)."""

    def __init__(self, message: str, binding: tuple[BindingTarget, ...] = ()) -> None:
        super().__init__(message)
        self.binding = binding

    def __reduce__(self):  # keep `binding` through pickling (process pools)
        return type(self), (str(self), self.binding)


def _bytes(value: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.6g} {unit}"
    return f"{value:.0f} B"


def _ratio(best: float, parent: float | None) -> str:
    return f" ({best / parent:.2f}x the parent)" if parent else ""


def _metric(constraint: Constraint, row_value: float, targets: Targets) -> float:
    """Turn a row value back into the target's own units."""
    if constraint.name == "min_throughput":
        return targets.batch_size / row_value if row_value > 0 else float("inf")
    if constraint.name == "min_attention_layers":
        return 0 - row_value  # not -row_value: that prints 0 as "-0"
    return row_value


def _parent_value(name: str, parent: Metrics) -> float | None:
    return {
        "min_throughput": parent.throughput,
        "max_latency_s": parent.latency_s,
        "max_memory_bytes": parent.memory_bytes,
        "max_kv_bytes_per_token": parent.kv_bytes_per_token,
        "min_attention_layers": parent.attention_layers,
        "max_attention_layers": parent.attention_layers,
    }.get(name)


def _phrase(target: BindingTarget, targets: Targets, others: str) -> str:
    constrained = target.under_other_targets and others
    where = f"that meets {others}" if constrained else "in the search space"
    best, bound, ratio = target.best, target.bound, _ratio(target.best, target.parent)
    widen = "or widen the search space"
    if target.name == "min_throughput":
        return (f"throughput >= {bound:.6g} tok/s is infeasible: the fastest child {where} reaches "
                f"{best:.6g} tok/s{ratio}; lower --target-throughput {widen}")
    if target.name == "max_latency_s":
        return (f"latency <= {bound:.6g} s is infeasible: the quickest child {where} takes {best:.6g} s{ratio}; "
                f"raise --max-latency {widen}")
    if target.name == "max_memory_bytes":
        return (f"memory <= {_bytes(bound)} is infeasible: the smallest child {where} needs {_bytes(best)} at batch "
                f"{targets.batch_size} x {targets.context_len} tokens{ratio}; raise --max-memory, lower the batch "
                f"size or context, {widen}")
    if target.name == "max_kv_bytes_per_token":
        return (f"KV cache <= {bound:.0f} bytes/token is infeasible: the smallest KV cache {where} is {best:.0f} "
                f"bytes/token{ratio}; raise --max-kv-bytes-per-token {widen}")
    children = "children in the search space" + (f" that meet {others}" if constrained else "")
    if target.name == "min_attention_layers":
        return (f"at least {bound:.0f} attention layers is infeasible: {children} keep at most "
                f"{best:.0f}; lower --min-attention-layers {widen}")
    if target.name == "max_attention_layers":
        return (f"at most {bound:.0f} attention layers is infeasible: {children} keep at least "
                f"{best:.0f}; raise --max-attention-layers or add no-op/linear attention variants")
    k = target.name.removeprefix("diversity[").removesuffix("]")
    return (f"sharing <= {bound:.6g} sub-blocks with previous solution {k} is infeasible: the least similar child "
            f"{where} shares {best:.0f}; raise --max-shared-fraction {widen}")


def _optimise_alone(problem: Problem, backend: Backend, constraints: Sequence[Constraint], j: int) -> float | None:
    """Best (smallest) value of row j under the other rows; None when the others are infeasible too."""
    target, others = constraints[j], [c for i, c in enumerate(constraints) if i != j]
    result = backend(target.expr, others)
    if result is None:
        return None
    attention, ffn = read_choice(problem, result)
    for other in others:
        if other.expr.value(attention, ffn) > other.upper + other.slack_limit():
            raise SolverCheckError(f"{result.solver} broke target {other.name} while diagnosing {target.name}")
    return target.expr.value(attention, ffn)


def diagnose(
    problem: Problem, targets: Targets, constraints: Sequence[Constraint], backend: Backend
) -> TargetInfeasibleError:
    """Explain why no child meets `constraints` (which the back-end has just found infeasible)."""
    parent = parent_metrics(
        problem, batch_size=targets.batch_size, context_len=targets.context_len, generate_tokens=targets.generate_tokens
    )

    def binding(constraint: Constraint, row_value: float, under_others: bool) -> BindingTarget:
        bound = _metric(constraint, constraint.upper, targets)
        if constraint.name == "min_throughput":
            bound = targets.min_throughput  # not B / (B / T), which can be off in the last bit
        return BindingTarget(name=constraint.name, bound=bound, best=_metric(constraint, row_value, targets),
                             parent=_parent_value(constraint.name, parent), under_other_targets=under_others)

    found = []
    for j, constraint in enumerate(constraints):
        best = _optimise_alone(problem, backend, constraints, j)
        if best is not None:
            found.append(binding(constraint, best, under_others=len(constraints) > 1))
    if not found:  # no single target to blame: report those that fail even alone
        found = [binding(c, c.expr.min_value(), under_others=False)
                 for c in constraints if c.expr.min_value() > c.upper + c.slack_limit()]
    names = [c.name for c in constraints]
    if not found:
        return TargetInfeasibleError(
            f"targets {', '.join(names)} cannot all hold together, though each can alone and dropping any one "
            "still leaves the rest infeasible; relax several of them or widen the search space"
        )
    phrases = [_phrase(t, targets, ", ".join(n for n in names if n != t.name)) for t in found]
    return TargetInfeasibleError("; ".join(phrases), tuple(found))
