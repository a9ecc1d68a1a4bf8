"""Sharding from torchrun / Slurm variables, and contiguous, balanced, disjoint slices."""

import pytest

from puzzle.errors import ConfigError
from puzzle.jobs import Shard, shard_from_env, slurm_script, split_contiguous, SlurmConfig


@pytest.mark.parametrize("env,expected", [
    ({}, Shard(0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, Shard(3, 8, 3)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "6", "SLURM_ARRAY_TASK_MIN": "1"}, Shard(4, 6, 0)),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, Shard(1, 2, 0)),
])
def test_shard_from_env(monkeypatch, env, expected):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                 "SLURM_ARRAY_TASK_MIN", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert shard_from_env() == expected


def test_bad_rank_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="rank 4"):
        shard_from_env()


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 30])
def test_split_contiguous_covers_everything_once_in_order(parts):
    items = list(range(23))
    slices = split_contiguous(items, lambda i: 1 + (i % 5), parts)
    assert len(slices) == parts
    assert [i for s in slices for i in s] == items
    if parts <= 3:
        totals = [sum(1 + (i % 5) for i in s) for s in slices]
        assert max(totals) - min(totals) <= 5


def test_slurm_script_runs_one_worker_per_array_task(tmp_path):
    script = slurm_script(["bld", "runs/x", "--worker"], 4, tmp_path, SlurmConfig(gpus_per_task=1), "puzzle-bld")
    assert script.startswith("#!/bin/bash\n") and "#SBATCH --array=0-3" in script
    assert "#SBATCH --gpus-per-task=1" in script and script.rstrip().endswith("-m puzzle bld runs/x --worker")
