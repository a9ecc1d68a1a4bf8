"""Trust but verify: read a back-end's answer back and re-check it against the targets in plain Python.

Model-Optimizer's puzzletron re-adds the MIP's costs after solving; here every metric is recomputed by
`puzzle.mip.metrics.evaluate` (which shares no code with the linear model) and every target is checked with
the shared relative TOLERANCE. Any failure is a bug in puzzle or in a solver, raised as SolverCheckError.
"""

from __future__ import annotations

from collections.abc import Sequence

from puzzle.mip.metrics import Metrics, shared_blocks
from puzzle.mip.model import TOLERANCE, BackendResult, SolverCheckError
from puzzle.mip.problem import Problem, Targets
from puzzle.mip.solution import Solution

_BINARY_SLACK = 1e-6  # a solver's 0/1 may read 1e-9 off; anything further is not a choice


def read_choice(problem: Problem, result: BackendResult) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The option index per layer, after checking exactly one variable per layer and sub-block is 1."""
    chosen: dict[str, list[int]] = {"attention": [], "ffn": []}
    for kind, values in (("attention", result.attention), ("ffn", result.ffn)):
        if len(values) != problem.num_layers:
            raise SolverCheckError(f"{result.solver} returned {len(values)} {kind} layers for {problem.num_layers}")
        for layer, row in enumerate(values):
            ones = [index for index, value in enumerate(row) if abs(value - 1) <= _BINARY_SLACK]
            zeros = [index for index, value in enumerate(row) if abs(value) <= _BINARY_SLACK]
            if len(ones) != 1 or len(ones) + len(zeros) != len(row):
                raise SolverCheckError(f"{result.solver} chose {kind} values {row} in layer {layer}, not one option")
            chosen[kind].append(ones[0])
    return tuple(chosen["attention"]), tuple(chosen["ffn"])


def violations(
    problem: Problem,
    targets: Targets,
    previous: Sequence[Solution],
    attention: Sequence[int],
    ffn: Sequence[int],
    metrics: Metrics,
) -> list[str]:
    """The targets this child misses, one phrase each; empty when it meets them all."""
    out = []

    def at_most(name: str, value: float | None, bound: float | None) -> None:
        if bound is not None and (value is None or value > bound + TOLERANCE * abs(bound)):
            out.append(f"{name} {value} > {bound}")

    if targets.min_throughput is not None and metrics.throughput * (1 + TOLERANCE) < targets.min_throughput:
        out.append(f"throughput {metrics.throughput} < {targets.min_throughput}")
    at_most("latency_s", metrics.latency_s, targets.max_latency_s)
    at_most("memory_bytes", metrics.memory_bytes, targets.max_memory_bytes)
    at_most("kv_bytes_per_token", metrics.kv_bytes_per_token, targets.max_kv_bytes_per_token)
    at_most("attention_layers", metrics.attention_layers, targets.max_attention_layers)
    if targets.min_attention_layers is not None:
        at_most("-attention_layers", -metrics.attention_layers, -targets.min_attention_layers)
    if targets.diversity is not None:
        most = targets.diversity.max_shared_fraction * 2 * problem.num_layers
        for k, solution in enumerate(previous):
            at_most(f"shared with solution {k}", shared_blocks(attention, ffn, solution.attention, solution.ffn), most)
    return out


def verify(
    problem: Problem,
    targets: Targets,
    previous: Sequence[Solution],
    result: BackendResult,
    metrics: Metrics,
    choice: tuple[tuple[int, ...], tuple[int, ...]],
) -> None:
    """Raise SolverCheckError unless the answer meets every target and its objective matches the re-added score."""
    missed = violations(problem, targets, previous, choice[0], choice[1], metrics)
    if missed:
        raise SolverCheckError(f"{result.solver} returned a child that misses its targets: {'; '.join(missed)}")
    if abs(result.objective - metrics.score) > 1e-6 * max(1.0, abs(metrics.score)):
        raise SolverCheckError(f"{result.solver} objective {result.objective} != re-added score {metrics.score}")
