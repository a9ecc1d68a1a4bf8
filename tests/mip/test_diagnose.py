"""Infeasible targets: the error names the binding target(s) and the best reachable value (vs brute force)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from puzzle.errors import ConfigError, InfeasibleError
from puzzle.mip import (
    DiversityTarget,
    LayerOptions,
    Option,
    Problem,
    TargetInfeasibleError,
    Targets,
    pareto_sweep,
    solve,
)
from puzzle.mip.metrics import parent_metrics

SOLVERS = ("pulp", "ortools")
POINT = dict(batch_size=8, context_len=2048, generate_tokens=128)


def _raise(problem, targets, solver, previous=()) -> TargetInfeasibleError:
    with pytest.raises(TargetInfeasibleError) as info:
        solve(problem, targets, solver=solver, previous=previous)
    message = str(info.value)
    assert "\n" not in message
    return info.value


@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_throughput_alone_names_it_with_the_fastest_child(references, solver):
    ref = references[0]
    fastest = ref.batch_size / ref.grid("decode").min()
    error = _raise(ref.problem, Targets(**POINT, min_throughput=1.05 * fastest), solver)
    (binding,) = error.binding
    assert binding.name == "min_throughput" and not binding.under_other_targets
    assert binding.best == pytest.approx(fastest, rel=1e-9)
    parent = parent_metrics(ref.problem, batch_size=8).throughput
    assert binding.parent == pytest.approx(parent)
    message = str(error)
    assert message.startswith("throughput >= ") and "lower --target-throughput" in message
    assert f"{fastest:.6g} tok/s ({fastest / parent:.2f}x the parent)" in message


@pytest.mark.parametrize("seed", (0, 1))
@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_throughput_and_attention_together_names_both(references, seed, solver):
    ref = references[seed]
    decode, attention = ref.grid("decode"), ref.grid("attention")
    fastest_with_4 = ref.batch_size / decode[attention >= 4].min()
    fastest = ref.batch_size / decode.min()
    assert fastest_with_4 < fastest
    bound = float(np.sqrt(fastest_with_4 * fastest))  # each target alone is feasible, not both
    error = _raise(ref.problem, Targets(**POINT, min_throughput=bound, min_attention_layers=4), solver)
    found = {b.name: b for b in error.binding}
    assert set(found) == {"min_throughput", "min_attention_layers"}
    assert found["min_throughput"].best == pytest.approx(fastest_with_4, rel=1e-9)
    assert found["min_attention_layers"].best == attention[ref.batch_size / decode >= bound].max()
    assert all(b.under_other_targets for b in error.binding)
    assert "that meets min_attention_layers" in str(error) and "lower --target-throughput" in str(error)


@pytest.mark.parametrize("seed", (0, 1))
@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_memory_and_attention_together_names_both(references, seed, solver):
    ref = references[seed]
    memory, attention = ref.grid("memory"), ref.grid("attention")
    smallest_with_5, smallest = int(memory[attention >= 5].min()), int(memory.min())
    bound = (smallest + smallest_with_5) // 2
    error = _raise(ref.problem, Targets(**POINT, max_memory_bytes=bound, min_attention_layers=5), solver)
    found = {b.name: b for b in error.binding}
    assert set(found) == {"max_memory_bytes", "min_attention_layers"}
    assert found["max_memory_bytes"].best == smallest_with_5
    assert found["min_attention_layers"].best == attention[memory <= bound].max()
    assert "raise --max-memory" in str(error) and "GiB" not in str(error) and "MiB" in str(error)


@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_each_alone_reports_both_over_the_whole_space(references, solver):
    ref = references[1]
    fastest = ref.batch_size / ref.grid("decode").min()
    smallest = int(ref.grid("memory").min())
    targets = Targets(**POINT, min_throughput=1.1 * fastest, max_memory_bytes=smallest - 1000)
    error = _raise(ref.problem, targets, solver)
    found = {b.name: b for b in error.binding}
    assert found["min_throughput"].best == pytest.approx(fastest, rel=1e-9)
    assert found["max_memory_bytes"].best == smallest
    assert not any(b.under_other_targets for b in error.binding)
    assert "in the search space" in str(error)


@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_attention_layer_counts(references, solver):
    ref = references[2]
    error = _raise(ref.problem, Targets(**POINT, min_attention_layers=7), solver)
    assert [(b.name, b.best) for b in error.binding] == [("min_attention_layers", 6)]
    assert str(error).startswith("at least 7 attention layers is infeasible: children in the search space keep "
                                 "at most 6")
    error = _raise(_one_ffn_problem(no_op=False), Targets(max_attention_layers=2), solver)
    assert [(b.name, b.best) for b in error.binding] == [("max_attention_layers", 4)]
    assert "keep at least 4; raise --max-attention-layers or add no-op/linear attention variants" in str(error)


def _one_ffn_problem(layers: int = 4, no_op: bool = True) -> Problem:
    """Two attention options per layer (the second a no-op, or else GQA) and a single FFN option."""

    def option(name, score, attention):
        return Option(name=name, score=score, decode_time_s=1e-3, prefill_time_s=1e-2, param_bytes=10,
                      has_attention=attention)

    other = option("noop", 1.0, False) if no_op else option("gqa", 0.5, True)
    layer = LayerOptions(attention=(option("parent", 0.0, True), other), ffn=(option("parent", 0.0, False),))
    return Problem(layers=(layer,) * layers)


@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_diversity_names_the_previous_solution(solver):
    problem = _one_ffn_problem()
    first = solve(problem, Targets(max_attention_layers=4), solver=solver)
    targets = Targets(max_attention_layers=4, diversity=DiversityTarget(max_shared_fraction=0.25))
    error = _raise(problem, targets, solver, previous=(first,))
    (binding,) = error.binding
    assert (binding.name, binding.bound, binding.best) == ("diversity[0]", 2.0, 4)  # the FFNs are always shared
    assert "previous solution 0" in str(error) and "raise --max-shared-fraction" in str(error)
    half = Targets(max_attention_layers=4, diversity=DiversityTarget(max_shared_fraction=0.5))
    assert solve(problem, half, solver=solver, previous=(first,)).attention == (1, 1, 1, 1)


def test_infeasible_error_survives_pickling(references):
    ref = references[0]
    error = _raise(ref.problem, Targets(**POINT, min_attention_layers=7), "pulp")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.binding == error.binding


@pytest.mark.parametrize("solver", SOLVERS)
def test_pareto_sweep_reports_infeasible_points_and_goes_on(references, solver):
    ref = references[0]
    fastest = ref.batch_size / ref.grid("decode").min()
    points = [Targets(**POINT, min_throughput=f * fastest) for f in (0.6, 1.2, 0.8)]
    results = pareto_sweep(ref.problem, points, solver=solver)
    assert isinstance(results[1], InfeasibleError) and "throughput" in str(results[1])
    for point, result in zip((points[0], points[2]), (results[0], results[2]), strict=True):
        assert result.score == pytest.approx(ref.best(point), abs=1e-6)
    assert results[0].score <= results[2].score  # a faster target never scores better


def test_solve_rejects_bad_calls(references, make_problem):
    ref = references[0]
    targets = Targets(**POINT, max_attention_layers=3)
    with pytest.raises(ConfigError, match="solver 'gurobi' is unknown"):
        solve(ref.problem, targets, solver="gurobi")
    first = solve(ref.problem, targets)
    with pytest.raises(ConfigError, match=r"targets\.diversity is None"):
        solve(ref.problem, targets, previous=(first,))
    other = make_problem(seed=7, layers=6, n_attention=3)
    diverse = Targets(**POINT, max_attention_layers=3, diversity=DiversityTarget(max_shared_fraction=0.5))
    with pytest.raises(ConfigError, match="previous solution 0"):
        solve(other, diverse, previous=(first,))
