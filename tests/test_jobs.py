"""Sharding from torchrun / Slurm variables, contiguous, balanced, disjoint slices, and local workers."""

import os
from pathlib import Path

import pytest

from puzzle import jobs
from puzzle.errors import ConfigError, StageError
from puzzle.jobs import Shard, SlurmConfig, shard_from_env, split_contiguous


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


def test_slurm_config_becomes_the_sbatch_options_of_every_task(tmp_path, monkeypatch):
    from puzzle import slurm
    from puzzle.run import RunPaths

    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")  # a login node, without submitting
    cfg = SlurmConfig(partition="gpu", account="proj", qos="high", time="1-02:00:30", cpus_per_task=16, gpus_per_task=1,
                      mem="200G", array_parallelism=4, extra_args=("--constraint=h100", "--exclusive"),
                      setup=("module load cuda/12.4",))
    text = slurm.executor(RunPaths(tmp_path / "run"), cfg, "bld")._make_submission_file_text("CMD", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --time=1561",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --gpus-per-node=1", "#SBATCH --mem=200G",
                 "#SBATCH --constraint=h100", "#SBATCH --exclusive", "#SBATCH --job-name=puzzle-bld",
                 "module load cuda/12.4", "export OMP_NUM_THREADS=16 PUZZLE_NUM_THREADS=16"):
        assert line in text, (line, text)
    with pytest.raises(ConfigError, match="slurm.time"):
        slurm.executor(RunPaths(tmp_path / "run"), SlurmConfig(time="soon"), "bld")


def test_the_distill_job_spans_its_nodes_with_one_rank_per_gpu(tmp_path, monkeypatch):
    from puzzle import slurm
    from puzzle.run import RunPaths

    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    cfg = SlurmConfig(gpus_per_task=1, nodes=2, distill_tasks_per_node=8)
    text = slurm.executor(RunPaths(tmp_path / "run"), cfg, "distill")._make_submission_file_text("CMD", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"):
        assert line in text, (line, text)
    assert slurm.ranks(cfg, "distill") == 16 and slurm.ranks(cfg, "bld") == 1
    bld = slurm.executor(RunPaths(tmp_path / "run"), cfg, "bld")._make_submission_file_text("CMD", "uid")
    assert "#SBATCH --nodes=1" in bld and "#SBATCH --ntasks-per-node=1" in bld and "#SBATCH --gpus-per-node=1" in bld
    with pytest.raises(ConfigError, match="slurm.distill_tasks_per_node must be a positive integer"):
        SlurmConfig(distill_tasks_per_node=0)
    with pytest.raises(ConfigError, match="slurm.executor: local runs on this machine only"):
        SlurmConfig(nodes=2, executor="local")


def test_a_distill_task_exports_its_rank_as_torchrun_would(monkeypatch):
    from puzzle import slurm

    slurm_env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
                 "SLURM_NODEID": "1", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[3-4]",
                 "RANK": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}  # RANK: left over from the submitting shell
    for name, value in slurm_env.items():
        monkeypatch.setenv(name, value)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that the test's exports are undone after it
        monkeypatch.delenv(name)
    assert slurm.export_torch_distributed() == 9
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert env == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu3"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # the rank takes cuda:LOCAL_RANK of them
    assert shard_from_env() == Shard(9, 16, 1)


def _makespan(slices, cost, reach):
    return max(sum(cost(i) for i in s) + reach(s[-1]) for s in slices if s)


@pytest.mark.parametrize("seed", range(20))
def test_split_contiguous_minimises_the_largest_slice_counting_reach(seed):
    import itertools
    import random

    rng = random.Random(seed)
    items = list(range(rng.randint(1, 9)))
    costs = {i: rng.uniform(0.1, 5) for i in items}
    reaches = dict(zip(items, sorted(rng.uniform(0, 4) for _ in items)))  # non-decreasing along the items
    parts = rng.randint(1, 4)
    slices = split_contiguous(items, costs.get, parts, reaches.get)
    assert len(slices) == parts and [i for s in slices for i in s] == items
    best = min(_makespan([items[a:b] for a, b in zip((0, *cuts), (*cuts, len(items)))], costs.get, reaches.get)
               for k in range(min(parts, len(items)))
               for cuts in itertools.combinations(range(1, len(items)), k))
    assert _makespan(slices, costs.get, reaches.get) <= best * (1 + 1e-9)


def test_the_deeper_worker_gets_fewer_units_when_reaching_them_costs():
    # 8 equal layers; reaching layer i costs 3 (i + 1) (the parent's forward): the cut moves past the middle.
    slices = split_contiguous(list(range(8)), lambda i: 4.0, 2, lambda i: 3.0 * (i + 1))
    assert [len(s) for s in slices] == [5, 3]  # costs 35 and 36; an even cut would cost 28 and 40


@pytest.mark.parametrize("fork", ["1", "0"])
def test_local_workers_forked_or_fresh_do_the_same_work_and_a_failure_names_its_log(tmp_path, monkeypatch, fork):
    """A forked (single-threaded) worker calls the core's entry function, a fresh one runs `puzzle <argv>` (the same
    work): output goes to logs/rank{N}.log with RANK set, and a failed worker stops the wait naming that log."""
    import functools

    from puzzle.pipeline import run_bld

    monkeypatch.setenv("PUZZLE_NO_FORK", "0" if fork == "1" else "1")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))
    with jobs.LocalWorkers(["--help"], 2, tmp_path / "ok", threads_per_worker=1,
                           entry=lambda: print(f"Usage: rank {os.environ['RANK']}")) as local:
        local.wait()
    for rank in range(2):
        assert "Usage" in (tmp_path / "ok" / f"rank{rank}.log").read_text()
    missing = tmp_path / "missing"
    with pytest.raises(StageError, match="rank0.log"):
        with jobs.LocalWorkers(["bld", str(missing), "--worker"], 1, tmp_path / "bad", 1,
                               entry=functools.partial(run_bld, str(missing), as_worker=True)) as local:
            local.wait()
    log = (tmp_path / "bad" / "rank0.log").read_text()
    assert "error:" in log and "missing" in log


def test_only_single_threaded_workers_are_forked():
    # A child forked after this process used OpenMP hangs in its first parallel region with > 1 thread.
    assert not jobs._can_fork(2)


def test_local_workers_get_disjoint_cores_only_when_there_are_enough(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert [jobs.worker_cpus(r, 2, 2) for r in range(2)] == [[0, 1], [2, 3]]
    assert jobs.worker_cpus(0, 2, 3) == [], "oversubscribed: no binding"
    assert jobs.worker_cpus(0, 1, 4) == [], "a single worker is not bound"
