"""Searches on a real one-node Slurm (`make test-slurm` starts one: tests/slurm/cluster.sh), submitted with
submitit: the whole search as a chain of jobs gives the children a local run gives, also when a BLD task is
preempted and requeued; the distill job trains as two gloo ranks what one process trains; a cancelled BLD array
resumes with only the missing units, and a failed task is named by `puzzle status` with its unit and log.
Without a cluster these tests skip, except under PUZZLE_REQUIRE_SLURM=1 (CI), where a missing cluster is a
failure that says why."""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config
from safetensors.torch import load_file

from puzzle.blocks.library import Manifest
from puzzle.distill.bld import read_unit_result, unit_path
from puzzle.distill.gkd import GKDResult, run_gkd
from puzzle.errors import StageError
from puzzle.pipeline import open_run, run_bld, run_search
from puzzle.run import RunPaths

ROOT = Path(__file__).parents[1]


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (tests/slurm/cluster.sh start installs and starts a one-node Slurm)"
    info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"sinfo failed: {info.stderr.strip()} (is SLURM_CONF set to the test cluster's slurm.conf?)"
    if not info.stdout.strip():
        return "sinfo lists no node"
    return None


@pytest.fixture(autouse=True)
def slurm_cluster():
    problem = _cluster_problem()
    if problem and os.environ.get("PUZZLE_REQUIRE_SLURM"):
        pytest.fail(f"no usable Slurm cluster: {problem}")
    if problem:
        pytest.skip(problem)


pytestmark = pytest.mark.slow
SLURM = {"cpus_per_task": 1, "time": "00:20:00"}  # one thread per task, as local workers on 2 cores
# analytic profile: both runs must solve the same problem (CPU timings differ between runs)
SEARCH = dict(profile={"analytic": True, "batch_size": 4, "context_len": 96, "prompt_len": 32, "generate_tokens": 8},
              solve={"targets": [{"name": "1.5x", "throughput": "1.5x"}, {"name": "2x", "throughput": "2x"}],
                     "sweep": [1.5]},
              report={"eval_tokens": 512, "batch_size": 4}, slurm=SLURM)


# GKD of each child as two ranks of one process each: one window per rank and step (DDP's global batch of 2)
GKD = {"tokens": 1024, "batch_size": 1, "lr": 1e-3, "eval_tokens": 256, "checkpoint_every": 4}
TWO_RANKS = {**SLURM, "distill_tasks_per_node": 2}  # the test node has 2 CPUs: one per rank


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PUZZLE_QUIET": "1"}


def _same_children(a: Path, b: Path, names: tuple[str, ...]) -> None:
    for name in names:
        wa, wb = load_file(a / name / "model.safetensors"), load_file(b / name / "model.safetensors")
        assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa), name  # bitwise, on CPU
        assert (a / name / "config.json").read_text() == (b / name / "config.json").read_text(), name


def _library(tmp_path: Path, name: str, **sections):
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = write_config(tmp_path / f"{name}.yaml", tiny_search_config(corpus, slurm=SLURM, **sections))
    return run_search(tmp_path / name, parent=parent, config=config, stage="library")


def test_bld_as_a_slurm_array_trains_every_unit_once(tmp_path):
    search = _library(tmp_path, "run")
    run_bld(search.paths.root, workers=2, launcher="slurm")
    workers = {read_unit_result(unit_path(search.paths, u)).worker for u in search.manifest().units}
    assert workers == {"0/2", "1/2"}
    assert open_run(search.paths.root).is_done("bld")
    logs = sorted(p.name for p in (search.paths.logs / "slurm").glob("*_log.out"))
    assert len(logs) == 2 and logs[0].endswith("_0_0_log.out") and logs[1].endswith("_1_0_log.out"), logs


def test_a_search_on_slurm_makes_the_children_a_local_search_makes(tmp_path):
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=3)
    config = write_config(tmp_path / "search.yaml", tiny_search_config(corpus, **SEARCH))
    local = run_search(tmp_path / "local", parent=parent, config=config, workers=2, launcher="local")
    env = _env()
    run = subprocess.run([sys.executable, "-m", "puzzle", "search", str(parent), "--out", str(tmp_path / "slurm"),
                          "--config", str(config), "--workers", "2", "--launcher", "slurm", "--wait"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    on_slurm = open_run(tmp_path / "slurm")
    workers = {read_unit_result(unit_path(on_slurm.paths, u)).worker for u in on_slurm.manifest().units}
    assert workers == {"0/2", "1/2"}, "BLD ran as a two-task array"
    jobs = json.loads((tmp_path / "slurm" / "jobs.json").read_text())["jobs"]
    assert [(j["stage"], j["tasks"]) for j in jobs] == [("prepare", 1), ("bld", 2), ("score", 2), ("finish", 1)]
    assert (tmp_path / "slurm" / "report.md").exists()
    _same_children(local.paths.children, on_slurm.paths.children, ("1.5x", "2x"))


def test_the_distill_job_trains_as_two_ranks_what_one_process_trains(tmp_path):
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = write_config(tmp_path / "search.yaml", tiny_search_config(corpus, **dict(SEARCH, gkd=GKD, slurm=TWO_RANKS)))
    run = subprocess.run([sys.executable, "-m", "puzzle", "search", str(parent), "--out", str(tmp_path / "run"),
                          "--config", str(config), "--workers", "2", "--launcher", "slurm", "--wait"],
                         capture_output=True, text=True, env=_env(), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    search = open_run(tmp_path / "run")
    jobs = json.loads((tmp_path / "run" / "jobs.json").read_text())["jobs"]
    assert [(j["stage"], j["tasks"], j["ranks"]) for j in jobs] == [
        ("prepare", 1, 1), ("bld", 2, 1), ("score", 2, 1), ("select", 1, 1), ("distill", 1, 2), ("report", 1, 1)]
    distill = jobs[4]
    assert all((Path(distill["logs"]) / f"{distill['job_id']}_{rank}_log.out").exists() for rank in (0, 1))
    assert search.is_done("report") and "2x-kd" in (tmp_path / "run" / "report.md").read_text()
    for name in ("1.5x", "2x"):
        ranked = GKDResult.load(search.paths.children / f"{name}-kd" / "gkd.json")
        # one process with both ranks' windows in its batch: the same global batch, the same steps
        alone = run_gkd(search.paths.children / name, search.paths.parent, search.cfg.data, tmp_path / f"{name}-alone",
                        replace(search.cfg.gkd, batch_size=2))
        assert (ranked.world_size, ranked.global_batch, ranked.steps) == (2, alone.global_batch, alone.steps)
        a = load_file(search.paths.children / f"{name}-kd" / "model.safetensors")
        b = load_file(tmp_path / f"{name}-alone" / "model.safetensors")
        # DDP averages the ranks' gradients, one process the batch's: the same updates up to summation order
        # (measured: at most 2e-6 apart after 8 steps at lr 1e-3)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a), name
        assert abs(ranked.after.kl - alone.after.kl) < 1e-5 * max(1.0, alone.after.kl), name


def _start_once_requeued(job_id: str, timeout_s: float = 60) -> None:
    """Slurm gives a requeued job a begin time about two minutes ahead: start the job's requeued tasks now,
    once none of them is running any more."""
    deadline, released = time.time() + timeout_s, set()
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i %T"], capture_output=True, text=True).stdout
        states = dict(line.split() for line in queue.splitlines() if line.strip())
        for task in {t for t, state in states.items() if state == "PENDING"} - released:
            subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)
            released.add(task)
        if released and not any(state in ("RUNNING", "COMPLETING") for t, state in states.items() if t not in released):
            return
        time.sleep(0.1)
    raise AssertionError(f"the tasks of job {job_id} were not requeued within {timeout_s} s: {queue}")


def test_a_preempted_bld_task_is_requeued_and_the_search_ends_with_the_same_children(tmp_path):
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=3)
    slow = dict(SEARCH, bld={"tokens_per_unit": 16384, "max_group_params": 30000, "checkpoint_every": 8})
    config = write_config(tmp_path / "search.yaml", tiny_search_config(corpus, **slow))
    root, paths = tmp_path / "slurm", RunPaths(tmp_path / "slurm")
    proc = subprocess.Popen([sys.executable, "-m", "puzzle", "search", str(parent), "--out", str(root), "--config",
                             str(config), "--workers", "2", "--launcher", "slurm", "--wait"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, units, done = time.time() + 600, [], []
    while not (done and len(done) < len(units) - 2):  # preempt once some units are written and others are not
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, f"{len(done)} of {len(units)} units after 600 s"
        if not units and paths.manifest.exists():
            units = Manifest.load(paths.manifest).units
        done = [u for u in units if unit_path(paths, u).exists()]
        time.sleep(0.05)
    bld = json.loads((root / "jobs.json").read_text())["jobs"][1]
    assert bld["stage"] == "bld"
    before = {u.unit_id: unit_path(paths, u).stat().st_mtime_ns for u in units if unit_path(paths, u).exists()}
    # what Slurm sends before a time-out or a preemption (sbatch --signal=USR2@90): submitit's requeue signal
    subprocess.run(["scancel", "--signal=USR2", bld["job_id"]], check=True)
    _start_once_requeued(bld["job_id"])
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    logs = [(Path(bld["logs"]) / f"{bld['job_id']}_{task}_0_log.out").read_text() for task in range(2)]
    assert any("Requeued job" in log for log in logs), logs[0][-2000:]  # submitit requeued it; it ran again
    for unit_id, mtime in before.items():  # units finished before the requeue were not trained again
        u = next(x for x in units if x.unit_id == unit_id)
        assert unit_path(paths, u).stat().st_mtime_ns == mtime, unit_id
    assert len(before) < len(units)
    search = open_run(root)
    local = run_search(tmp_path / "local", parent=parent, config=config, workers=2, launcher="local")
    for u in units:  # every unit, also those resumed from a checkpoint after the requeue, as uninterrupted
        a, b = load_file(unit_path(search.paths, u)), load_file(unit_path(local.paths, u))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), u.unit_id
    _same_children(local.paths.children, search.paths.children, ("1.5x", "2x"))


def test_a_cancelled_array_resumes_with_only_the_missing_units(tmp_path):
    search = _library(tmp_path, "run", bld={"tokens_per_unit": 65536, "max_group_params": 30000, "checkpoint_every": 8})
    units = search.manifest().units
    env = _env()
    proc = subprocess.Popen([sys.executable, "-m", "puzzle", "bld", str(search.paths.root), "--workers", "2",
                             "--launcher", "slurm"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # cancel once some units are written and others are not
        done = [u for u in units if unit_path(search.paths, u).exists()]
        if done and len(done) < len(units) - 2:
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    subprocess.run(["scancel", "--name", "puzzle-bld"], check=True)  # the array
    # submitit lets a task finish its work after SIGTERM; kill the tasks' processes, as a lost node would
    subprocess.run(["pkill", "-KILL", "-f", f"submitit.*{search.paths.root / 'logs'}"], check=False)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "units were not trained" in " ".join(err.split()), err[-2000:]
    before = {u.unit_id: unit_path(search.paths, u).stat().st_mtime_ns for u in units if unit_path(search.paths, u).exists()}
    assert 0 < len(before) < len(units)
    run_bld(search.paths.root, workers=2, launcher="slurm")  # re-submitted
    assert all(unit_path(search.paths, u).exists() for u in units)
    for unit_id, mtime in before.items():  # finished units were not trained again
        u = next(x for x in units if x.unit_id == unit_id)
        assert unit_path(search.paths, u).stat().st_mtime_ns == mtime
    assert open_run(search.paths.root).is_done("bld")


def test_a_failed_task_is_named_with_its_unit_and_log(tmp_path, capsys):
    from puzzle.cli import app as cli

    search = _library(tmp_path, "run")
    for stats in search.paths.calibration.glob("L*.safetensors"):  # every worker fails to initialise its units
        stats.write_bytes(b"not a safetensors file")
    with pytest.raises(StageError) as err:
        run_bld(search.paths.root, workers=2, launcher="slurm")
    message = str(err.value)
    assert "bld task 0" in message and "bld task 1" in message and "_0_0_log.out" in message, message
    assert "units were not trained" in message and "L0" in message, message  # the unit that failed
    # the same through a submitted chain and `puzzle status`
    env = _env()
    run = subprocess.run([sys.executable, "-m", "puzzle", "search", "--out", str(search.paths.root), "--workers", "2",
                          "--launcher", "slurm", "--wait"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode != 0 and "bld task" in run.stderr, run.stderr[-2000:]
    capsys.readouterr()
    assert cli.run(["status", str(search.paths.root)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "failed: bld task 0" in out and "_log.out" in out and "0 of" in out, out


def test_the_dry_run_scripts_submitted_by_hand_make_the_children(tmp_path):
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = write_config(tmp_path / "search.yaml", tiny_search_config(corpus, **dict(SEARCH, gkd=GKD, slurm=TWO_RANKS)))
    search = run_search(tmp_path / "run", parent=parent, config=config, workers=2, launcher="slurm", dry_run=True)
    env = _env()
    out = subprocess.run([str(search.scripts)], capture_output=True, text=True, env=env, check=True).stdout
    ids = [part.split()[-1] for part in out.strip().removeprefix("submitted: ").split(", ")]
    deadline = time.time() + 600
    while subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline
        time.sleep(1)
    assert len(ids) == 6 and "#SBATCH --ntasks-per-node=2" in (search.scripts.parent / "5-distill.sbatch").read_text()
    for name in ("1.5x", "2x"):
        assert (tmp_path / "run" / "children" / name / "model.safetensors").exists()
        assert GKDResult.load(tmp_path / "run" / "children" / f"{name}-kd" / "gkd.json").world_size == 2  # srun's 2 ranks
    assert open_run(tmp_path / "run").is_done("report")
