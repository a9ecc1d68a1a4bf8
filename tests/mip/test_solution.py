"""Solution JSON: a versioned round trip, and one-line errors for other versions and unknown keys."""

from __future__ import annotations

import json

import pytest

from puzzle.errors import ConfigError
from puzzle.mip import DiversityTarget, Solution, Targets, solve


@pytest.fixture(scope="module")
def solution(make_problem) -> Solution:
    problem = make_problem(seed=3)
    first = solve(problem, Targets(batch_size=8, context_len=2048, generate_tokens=64, min_throughput=3000.0))
    targets = Targets(batch_size=8, context_len=2048, generate_tokens=64, min_throughput=3000.0,
                      diversity=DiversityTarget(max_shared_fraction=0.5))
    return solve(problem, targets, solver="ortools", previous=(first,))


def test_solution_json_round_trip(solution):
    data = json.loads(json.dumps(solution.to_dict()))
    assert data["version"] == 1 and data["solver"] == "ortools-cp-sat"
    assert Solution.from_dict(data) == solution


def test_solution_rejects_other_versions_and_keys(solution):
    data = solution.to_dict()
    with pytest.raises(ConfigError, match="solution version 2 is not supported"):
        Solution.from_dict({**data, "version": 2})
    with pytest.raises(ConfigError, match="unknown key 'extra'"):
        Solution.from_dict({**data, "extra": 1})
    del data["score"]
    with pytest.raises(ConfigError, match="missing key 'score'"):
        Solution.from_dict(data)
