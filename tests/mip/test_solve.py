"""solve() against brute-force enumeration of every child, for each target type and their combinations."""

from __future__ import annotations

import pytest

from puzzle.mip import DiversityTarget, Targets, solve
from puzzle.mip.metrics import evaluate

SOLVERS = ("pulp", "ortools")
POINT = dict(batch_size=8, context_len=2048, generate_tokens=128)  # the Reference operating point


def _targets(ref, case: str) -> Targets:
    def throughput(q):
        return ref.batch_size / ref.safe_quantile("decode", q)

    def latency(q):
        return ref.safe_quantile("latency", q)

    def memory(q):
        return int(ref.safe_quantile("memory", q))

    def kv(q):
        return int(ref.safe_quantile("kv", q))

    cases = {
        "throughput": lambda: dict(min_throughput=throughput(0.3)),
        "latency": lambda: dict(max_latency_s=latency(0.25)),
        "memory": lambda: dict(max_memory_bytes=memory(0.2)),
        "kv": lambda: dict(max_kv_bytes_per_token=kv(0.3)),
        "min_attention": lambda: dict(min_attention_layers=5, min_throughput=throughput(0.5)),
        "max_attention": lambda: dict(max_attention_layers=2),
        "attention_range": lambda: dict(min_attention_layers=2, max_attention_layers=3, max_memory_bytes=memory(0.4)),
        "throughput_memory": lambda: dict(min_throughput=throughput(0.4), max_memory_bytes=memory(0.4)),
        "latency_kv_attention": lambda: dict(max_latency_s=latency(0.5), max_kv_bytes_per_token=kv(0.6),
                                             max_attention_layers=4),
        "all": lambda: dict(min_throughput=throughput(0.6), max_latency_s=latency(0.6), max_memory_bytes=memory(0.6),
                            max_kv_bytes_per_token=kv(0.7), min_attention_layers=2, max_attention_layers=5),
    }
    return Targets(**POINT, **cases[case]())


CASES = ("throughput", "latency", "memory", "kv", "min_attention", "max_attention", "attention_range",
         "throughput_memory", "latency_kv_attention", "all")


@pytest.mark.parametrize("seed", (0, 1, 2))
@pytest.mark.parametrize("case", CASES)
def test_solve_matches_brute_force(references, seed, case):
    ref = references[seed]
    targets = _targets(ref, case)
    expected = ref.best(targets)
    assert expected is not None, "test instance should be feasible"
    assert expected > 0, "test targets should bind (the parent alone scores 0)"
    scores = {}
    for solver in SOLVERS:
        solution = solve(ref.problem, targets, solver=solver)
        assert solution.score == pytest.approx(expected, abs=1e-6), solver
        assert solution.score == pytest.approx(evaluate(ref.problem, solution.attention, solution.ffn).score)
        scores[solver] = solution.score
    assert scores["pulp"] == pytest.approx(scores["ortools"], abs=1e-6)


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_solve_diversity_matches_brute_force(references, seed):
    ref = references[seed]
    speed = dict(min_throughput=ref.batch_size / ref.safe_quantile("decode", 0.4))
    first = solve(ref.problem, Targets(**POINT, **speed))
    for fraction in (0.5, 0.25):
        targets = Targets(**POINT, **speed, diversity=DiversityTarget(max_shared_fraction=fraction))
        second = solve(ref.problem, targets, previous=(first,))
        assert second.score == pytest.approx(ref.best(targets, (first,)), abs=1e-6)
        assert solve(ref.problem, targets, "ortools", (first,)).score == pytest.approx(second.score, abs=1e-6)
        previous = (first, second)
        expected = ref.best(targets, previous)
        for solver in SOLVERS:
            assert solve(ref.problem, targets, solver, previous).score == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_solve_bound_exactly_at_a_child_admits_it(references, solver):
    ref = references[0]
    loose = solve(ref.problem, Targets(**POINT, min_throughput=ref.batch_size / ref.safe_quantile("decode", 0.3)))
    # The optimum sits at some throughput above the bound; asking for exactly that keeps it optimal.
    tight = Targets(**POINT, min_throughput=loose.throughput)
    assert solve(ref.problem, tight, solver=solver).score == pytest.approx(loose.score, abs=1e-9)
    exact = Targets(**POINT, max_latency_s=loose.latency_s, min_throughput=loose.throughput,
                    max_memory_bytes=loose.memory_bytes, max_kv_bytes_per_token=loose.kv_bytes_per_token)
    assert solve(ref.problem, exact, solver=solver).score == pytest.approx(loose.score, abs=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_solve_is_deterministic(references, solver):
    ref = references[1]
    targets = _targets(ref, "throughput_memory")
    first, second = (solve(ref.problem, targets, solver=solver) for _ in range(2))
    assert (first.attention, first.ffn) == (second.attention, second.ffn)


def test_solve_reports_metrics_of_the_chosen_child(references):
    ref = references[2]
    targets = _targets(ref, "all")
    solution = solve(ref.problem, targets)
    metrics = evaluate(ref.problem, solution.attention, solution.ffn, **POINT)
    assert solution.metrics == metrics
    assert solution.solver == "pulp-cbc" and solution.solve_time_s > 0
    assert solution.attention_names == tuple(ref.problem.layers[i].attention[a].name
                                             for i, a in enumerate(solution.attention))
    assert metrics.throughput >= targets.min_throughput * (1 - 1e-9)
    assert metrics.memory_bytes <= targets.max_memory_bytes
