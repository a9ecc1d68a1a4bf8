"""Blockwise local distillation: training lowers the loss, linear units are exact least squares,
a killed run resumes to identical tensors, and parallel workers split the units without overlap."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline_fixtures import tiny_run_inputs, tiny_search_config, write_config
from puzzle.blocks.init import least_squares
from puzzle.checkpoint import load_architecture
from puzzle.distill.activations import run_layers
from puzzle.distill.bld import read_unit_result, unit_path, worker_share
from puzzle.jobs import Shard
from puzzle.pipeline import open_run, run_bld, run_search

ROOT = Path(__file__).parents[2]


def _library(tmp_path, name, **sections):
    parent, corpus = tiny_run_inputs(tmp_path / "inputs") if not (tmp_path / "inputs").exists() else \
        (tmp_path / "inputs" / "parent", tmp_path / "inputs" / "corpus")
    config = write_config(tmp_path / f"{name}.yaml", tiny_search_config(corpus, **sections))
    return run_search(tmp_path / name, parent=parent, config=config, stage="library")


def test_gradient_units_improve_and_linear_units_are_least_squares(tmp_path):
    search = _library(tmp_path, "run", bld={"tokens_per_unit": 8192})
    run_bld(search.paths.root)
    manifest = search.manifest()
    for unit in manifest.units:
        result = read_unit_result(unit_path(search.paths, unit))
        assert result.tokens == 8192 and result.worker == "0/1"
        if not unit.variant.replace_with_linear:
            assert result.loss_final < result.loss_init, unit.unit_id
    # A linear FFN unit holds the exact least-squares map over the same training batches.
    unit = next(u for u in manifest.units if u.kind == "ffn" and u.variant.replace_with_linear)
    parent, data, cfg = search.parent_model(), search.data(), search.cfg.bld
    xtx = xty = 0
    layer = parent.model.layers[unit.layer]
    for batch in data.batches("train", cfg.batch_size, n_tokens=8192, seed=cfg.seed):
        _, io = run_layers(parent, batch, stop=unit.layer + 1, capture={unit.layer})
        x = layer.post_attention_layernorm(io[unit.layer].h).flatten(0, 1).double()
        y = io[unit.layer].ffn.flatten(0, 1).double()
        xtx, xty = xtx + x.T @ x, xty + x.T @ y
    weights = load_file(unit_path(search.paths, unit))
    stored = weights[f"model.layers.{unit.layer}.mlp.linear_mlp.weight"]
    torch.testing.assert_close(stored, least_squares(xtx, xty).float(), atol=1e-5, rtol=1e-4)


def _env(threads=1):
    return {**os.environ, "PYTHONPATH": str(ROOT), "PUZZLE_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
            "PUZZLE_QUIET": "1"}


def test_sigkilled_bld_resumes_and_matches_an_uninterrupted_run(tmp_path):
    sections = {"bld": {"tokens_per_unit": 16384, "max_group_params": 30000, "checkpoint_every": 8}}
    reference = _library(tmp_path, "reference", **sections)
    run_bld(reference.paths.root)
    killed = _library(tmp_path, "killed", **sections)
    proc = subprocess.Popen([sys.executable, "-m", "puzzle", "bld", str(killed.paths.root)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    units = killed.manifest().units
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once some units are written and a later group has a checkpoint
        done = [u for u in units if unit_path(killed.paths, u).exists()]
        if done and list(killed.paths.progress.glob("*.pt")) and len(done) < len(units):
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {u.unit_id: unit_path(killed.paths, u).stat().st_mtime_ns for u in done}
    assert 0 < len(before) < len(units)
    run_bld(killed.paths.root)
    for u in units:
        a, b = load_file(unit_path(reference.paths, u)), load_file(unit_path(killed.paths, u))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), u.unit_id
        ra, rb = read_unit_result(unit_path(reference.paths, u)), read_unit_result(unit_path(killed.paths, u))
        assert (ra.loss_init, ra.loss_final) == (rb.loss_init, rb.loss_final)
    for unit_id, mtime in before.items():  # finished units were not trained again
        u = next(x for x in units if x.unit_id == unit_id)
        assert unit_path(killed.paths, u).stat().st_mtime_ns == mtime
    assert not list(killed.paths.progress.glob("*.pt"))


def test_two_local_workers_split_the_units_without_overlap(tmp_path):
    search = _library(tmp_path, "run")
    run_bld(search.paths.root, workers=2)
    arch = load_architecture(search.paths.parent)
    units = search.manifest().units
    for rank in range(2):
        share = worker_share(units, arch, Shard(rank=rank, world_size=2))
        assert share, "each worker gets work"
        for u in share:
            assert read_unit_result(unit_path(search.paths, u)).worker == f"{rank}/2"
    assert open_run(search.paths.root).is_done("bld")
