"""Searches on a real one-node Slurm (`make test-slurm` starts one: tests/slurm/cluster.sh), submitted with
submitit: the whole search as a chain of jobs gives the children a local run gives, a cancelled BLD array resumes
with only the missing units, and a failed task is named by `puzzle status` with its unit and log. Without a cluster these tests skip, except under PUZZLE_REQUIRE_SLURM=1
(CI), where a missing cluster is a failure that says why."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config
from safetensors.torch import load_file

from puzzle.distill.bld import read_unit_result, unit_path
from puzzle.errors import StageError
from puzzle.pipeline import open_run, run_bld, run_search

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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PUZZLE_QUIET": "1"}
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
    for name in ("1.5x", "2x"):
        a = load_file(local.paths.children / name / "model.safetensors")
        b = load_file(on_slurm.paths.children / name / "model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name  # bitwise, on CPU
        assert (local.paths.children / name / "config.json").read_text() == \
            (on_slurm.paths.children / name / "config.json").read_text()


def test_a_cancelled_array_resumes_with_only_the_missing_units(tmp_path):
    search = _library(tmp_path, "run", bld={"tokens_per_unit": 65536, "max_group_params": 30000, "checkpoint_every": 8})
    units = search.manifest().units
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PUZZLE_QUIET": "1"}
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PUZZLE_QUIET": "1"}
    run = subprocess.run([sys.executable, "-m", "puzzle", "search", "--out", str(search.paths.root), "--workers", "2",
                          "--launcher", "slurm", "--wait"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode != 0 and "bld task" in run.stderr, run.stderr[-2000:]
    capsys.readouterr()
    assert cli.run(["status", str(search.paths.root)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "failed: bld task 0" in out and "_log.out" in out and "0 of" in out, out


def test_the_dry_run_scripts_submitted_by_hand_make_the_children(tmp_path):
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = write_config(tmp_path / "search.yaml", tiny_search_config(corpus, **SEARCH))
    search = run_search(tmp_path / "run", parent=parent, config=config, workers=2, launcher="slurm", dry_run=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PUZZLE_QUIET": "1"}
    out = subprocess.run([str(search.scripts)], capture_output=True, text=True, env=env, check=True).stdout
    ids = [part.split()[-1] for part in out.strip().removeprefix("submitted: ").split(", ")]
    deadline = time.time() + 600
    while subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline
        time.sleep(1)
    for name in ("1.5x", "2x"):
        assert (tmp_path / "run" / "children" / name / "model.safetensors").exists()
    assert open_run(tmp_path / "run").is_done("report")
