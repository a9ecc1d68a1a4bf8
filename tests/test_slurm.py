"""BLD as a real Slurm job array on a one-node cluster (needs sbatch and a running slurmctld / slurmd)."""

import shutil
import subprocess

import pytest
from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config

from puzzle.distill.bld import read_unit_result, unit_path
from puzzle.pipeline import open_run, run_bld, run_search

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0,
    reason="needs a running Slurm cluster (sbatch, sinfo)")]


def test_bld_as_a_slurm_array_trains_every_unit_once(tmp_path):
    parent, corpus = tiny_run_inputs(tmp_path / "inputs", layers=2)
    config = tiny_search_config(corpus)
    config["slurm"] = {"cpus_per_task": 1, "time": "00:20:00"}
    search = run_search(tmp_path / "run", parent=parent, config=write_config(tmp_path / "c.yaml", config), stage="library")
    run_bld(search.paths.root, workers=2, launcher="slurm")
    workers = {read_unit_result(unit_path(search.paths, u)).worker for u in search.manifest().units}
    assert workers == {"0/2", "1/2"}
    assert open_run(search.paths.root).is_done("bld")
    assert sorted(p.name for p in (search.paths.logs / "bld").glob("puzzle-bld-*.log")) == ["puzzle-bld-0.log", "puzzle-bld-1.log"]
