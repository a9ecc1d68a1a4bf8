"""Speed on a Llama-70B-sized search space: 126 layers x (30 attention + 30 FFN) options, two binding targets.

The brief for the MIP stage asks for < 2 s with PuLP/CBC on the 2-core development machine; the assertion
keeps slack for loaded CI machines and the measured time is printed (pytest -s).
"""

from __future__ import annotations

import time

import pytest

from puzzle.mip import Targets, parent_metrics, solve

BUDGET_S = 10.0


@pytest.fixture(scope="module")
def targets(large) -> Targets:
    parent = parent_metrics(large, batch_size=64, context_len=4096)
    return Targets(batch_size=64, context_len=4096, min_throughput=1.8 * parent.throughput,
                   max_memory_bytes=int(0.45 * parent.memory_bytes))


@pytest.fixture(scope="module")
def timed(large, targets):
    out = {}
    for solver in ("pulp", "ortools"):
        start = time.perf_counter()
        out[solver] = (solve(large, targets, solver=solver), time.perf_counter() - start)
    return out


@pytest.mark.parametrize("solver", ("pulp", "ortools"))
def test_large_instance_solves_fast(large, targets, timed, solver):
    solution, elapsed = timed[solver]
    print(f"\n126 layers x 60 options, throughput + memory: {solver} solve() took {elapsed:.2f} s")
    assert elapsed < BUDGET_S
    assert solution.throughput >= targets.min_throughput * (1 - 1e-9)
    assert solution.memory_bytes <= targets.max_memory_bytes
    assert len(solution.attention) == large.num_layers


def test_large_instance_back_ends_agree(timed):
    assert timed["pulp"][0].score == pytest.approx(timed["ortools"][0].score, abs=1e-6)
